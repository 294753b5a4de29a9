"""Dashboard actions: buttons on the directive page that change state.

Every action is a POST that calls the same service as the REST API and then
redirects back to the directive page (or a safe ``next`` URL on this site).
A refused action (an invalid transition, a limit, bad input) becomes an error
message; nothing is changed and nothing answers 500.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.views.decorators.http import require_POST

from contracts.selectors import tasks_visible_to
from contracts.services import TASK_MESSAGE_MAX_CHARS, task_answer
from directives.models import Directive, Step
from directives.selectors import directives_visible_to, steps_visible_to
from directives.services import (
    directive_archive,
    directive_pause,
    directive_regenerate,
    directive_replan,
    directive_resume,
    directive_start,
    directive_stop,
    step_request_evaluation,
    step_retry,
    step_skip,
)
from directives.views.common import redirect_back, refusal_text
from makima.errors import DomainError
from makima.state import Actor

# A pause or stop reason goes to the event log; a page form has no business sending a novel.
REASON_MAX_CHARS = 1000


@dataclass(frozen=True)
class Action:
    """One button: the service it calls, what to say when it worked, and
    whether the service takes the optional ``reason`` of the form."""

    service: Callable[..., Any]
    done: str
    takes_reason: bool = False


DIRECTIVE_ACTIONS: dict[str, Action] = {
    "start": Action(directive_start, "Directive started."),
    "pause": Action(directive_pause, "Directive paused: running tasks finish, nothing new starts.", True),
    "resume": Action(directive_resume, "Directive resumed."),
    "stop": Action(directive_stop, "Directive stopped: its running tasks were interrupted.", True),
    "replan": Action(directive_replan, "Re-planning: a planner will revise the steps."),
    "regenerate": Action(directive_regenerate, "The chain was superseded; a new plan is on its way."),
    "archive": Action(directive_archive, "Directive archived."),
}

STEP_ACTIONS: dict[str, Action] = {
    "retry": Action(step_retry, "Step “{name}” will run again."),
    "skip": Action(step_skip, "Step “{name}” skipped."),
    "evaluate": Action(step_request_evaluation, "A new evaluation of step “{name}” was requested."),
}


def run(request: HttpRequest, call: Callable[[], Any], done: str) -> bool:
    """Call a service in one transaction; report success or the refusal as a message."""
    try:
        with transaction.atomic():
            call()
    except (DomainError, ValidationError) as exc:
        messages.error(request, refusal_text(exc))
        return False
    messages.success(request, done)
    return True


def reason_of(request: HttpRequest) -> str:
    reason = request.POST.get("reason", "").strip()
    if len(reason) > REASON_MAX_CHARS:
        raise ValidationError(f"The reason may hold at most {REASON_MAX_CHARS} characters.")
    return reason


@login_required
@require_POST
def directive_action(request: HttpRequest, pk: Any, action: str) -> HttpResponse:
    """``start``, ``pause``, ``resume``, ``stop``, ``replan``, ``regenerate`` or ``archive``."""
    directive: Directive = get_object_or_404(directives_visible_to(request.user), pk=pk)
    chosen = DIRECTIVE_ACTIONS.get(action)
    if chosen is None:
        raise Http404("No such action.")
    actor = Actor.for_user(request.user)

    def call() -> None:
        kwargs: dict[str, Any] = {"reason": reason_of(request)} if chosen.takes_reason else {}
        chosen.service(directive=directive, actor=actor, **kwargs)

    run(request, call, chosen.done)
    return redirect_back(request, reverse("directive-detail", args=[directive.pk]))


@login_required
@require_POST
def step_action(request: HttpRequest, pk: Any, step: Any, action: str) -> HttpResponse:
    """``retry``, ``skip`` or ``evaluate`` a step of a directive."""
    directive: Directive = get_object_or_404(directives_visible_to(request.user), pk=pk)
    target: Step = get_object_or_404(steps_visible_to(request.user), pk=step, directive=directive)
    chosen = STEP_ACTIONS.get(action)
    if chosen is None:
        raise Http404("No such action.")
    actor = Actor.for_user(request.user)
    run(request, lambda: chosen.service(step=target, actor=actor), chosen.done.format(name=target.name))
    return redirect_back(request, reverse("directive-detail", args=[directive.pk]))


@login_required
@require_POST
def task_answer_view(request: HttpRequest, pk: Any) -> HttpResponse:
    """Answer the question of a paused task; the answer goes to its daemon."""
    task = get_object_or_404(tasks_visible_to(request.user).select_related("directive"), pk=pk)
    fallback = reverse("directive-detail", args=[task.directive_id]) if task.directive_id else reverse("directive-list")
    message = request.POST.get("message", "")
    if not message.strip():
        messages.error(request, "Write an answer before sending it.")
        return redirect_back(request, fallback)
    if len(message) > TASK_MESSAGE_MAX_CHARS:
        messages.error(request, f"An answer may hold at most {TASK_MESSAGE_MAX_CHARS} characters.")
        return redirect_back(request, fallback)
    actor = Actor.for_user(request.user)
    run(
        request,
        lambda: task_answer(task=task, message=message, actor=actor),
        f"Answer sent to “{task.name}”; it continues once its daemon has passed it on.",
    )
    return redirect_back(request, fallback)


urlpatterns = [
    path("directives/<uuid:pk>/actions/<str:action>/", directive_action, name="directive-action"),
    path("directives/<uuid:pk>/steps/<uuid:step>/actions/<str:action>/", step_action, name="step-action"),
    path("tasks/<uuid:pk>/answer/", task_answer_view, name="task-answer"),
]
