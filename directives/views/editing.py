"""Dashboard pages: the directive list (home page), the new/edit directive form
and the chain editor of a draft directive."""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import OuterRef, Prefetch, Q, QuerySet, Subquery
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path, reverse
from django.views.decorators.http import require_POST

from directives.forms import DirectiveFilterForm, DirectiveForm, StepForm, add_service_errors
from directives.models import Directive, DirectiveEvent, Step, StepDependency
from directives.selectors import LIVE_CHAIN_STATUSES, directives_visible_to, live_step_counts, steps_visible_to
from directives.services import StepSpec, directive_create, directive_update, step_remove, step_update, steps_add
from makima.errors import DomainError
from makima.state import Actor

PER_PAGE = 25

# Left to right: done work first, then work in flight, then what waits or went wrong.
PROGRESS_ORDER = (
    Step.Status.PASSED,
    Step.Status.SKIPPED,
    Step.Status.AWAITING_APPROVAL,
    Step.Status.EVALUATING,
    Step.Status.RUNNING,
    Step.Status.READY,
    Step.Status.PENDING,
    Step.Status.BLOCKED,
    Step.Status.FAILED,
)

# The statuses in which a new goal sends the directive back to planning (see ``directive_update``).
REPLANS_ON_GOAL = frozenset({Directive.Status.ACTIVE, Directive.Status.PAUSED, Directive.Status.COMPLETED})
NOT_EDITABLE = frozenset({Directive.Status.FAILED, Directive.Status.ARCHIVED})

# Steps of the live plan: those of superseded chains are history.


def _visible_directive(request: HttpRequest, pk: uuid.UUID) -> Directive:
    return get_object_or_404(directives_visible_to(request.user).select_related("owner", "team"), pk=pk)


def _actor(request: HttpRequest) -> Actor:
    return Actor.for_user(request.user)


# --------------------------------------------------------------------------- list


def _last_event_annotations() -> dict[str, Subquery]:
    newest = DirectiveEvent.objects.filter(directive=OuterRef("pk")).order_by("-id")
    fields = {"type": "event_type", "message": "message", "severity": "severity", "at": "created_at"}
    return {f"last_event_{alias}": Subquery(newest.values(field)[:1]) for alias, field in fields.items()}


def directive_rows(user: Any) -> QuerySet[Directive]:
    """The directives ``user`` may see, with step counts and newest event, in one query."""
    return (
        directives_visible_to(user)
        .select_related("team", "owner")
        .annotate(**live_step_counts("steps_"))
        .annotate(**_last_event_annotations())
        .order_by("-updated_at", "-created_at", "pk")
    )


def progress_of(directive: Directive) -> dict[str, Any]:
    """Segments of the progress bar and the sentence that says the same in words."""
    total = directive.steps_total
    segments = []
    for status in PROGRESS_ORDER:
        count = getattr(directive, f"steps_{status}")
        if count:
            label = status.replace("_", " ")
            segments.append(
                {"status": status, "count": count, "label": f"{count} {label}", "width": f"{100 * count / total:.2f}"}
            )
    summary = f"{', '.join(s['label'] for s in segments)} of {total}" if total else "No steps yet"
    return {"segments": segments, "summary": summary, "total": total}


@login_required
def directive_list(request: HttpRequest) -> HttpResponse:
    """The home page: every directive the user may see, newest activity first."""
    filters = DirectiveFilterForm(request.GET or None, user=request.user)
    queryset = directive_rows(request.user)
    chosen: dict[str, Any] = {}
    if filters.is_bound:
        filters.is_valid()  # an invalid filter is shown as such and ignored; the valid ones still apply
        chosen = {k: v for k, v in filters.cleaned_data.items() if v}
    if chosen.get("status"):
        queryset = queryset.filter(status=chosen["status"])
    if chosen.get("team"):
        queryset = queryset.filter(team=chosen["team"])
    page = Paginator(queryset, PER_PAGE).get_page(request.GET.get("page"))
    rows = [{"directive": d, "progress": progress_of(d)} for d in page.object_list]
    return render(
        request,
        "directives/list.html",
        {"nav": "directives", "filters": filters, "filtered": bool(chosen), "page": page, "rows": rows},
    )


# --------------------------------------------------------------------------- create / edit


@login_required
def directive_create_view(request: HttpRequest) -> HttpResponse:
    """A new draft directive. "Create and add steps" opens the chain editor next;
    plain "Create" opens the directive's page, from where it can be started."""
    form = DirectiveForm(request.POST if request.method == "POST" else None, user=request.user)
    if form.is_bound and form.is_valid():
        try:
            directive = directive_create(owner=request.user, actor=_actor(request), **form.service_fields())
        except ValidationError as exc:
            add_service_errors(form, exc)
        except DomainError as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, "Directive created as a draft.")
            if request.POST.get("next") == "chain":
                return redirect("directive-chain", pk=directive.pk)
            return redirect("directive-detail", pk=directive.pk)
    return render(request, "directives/form.html", {"nav": "directives", "form": form, "directive": None})


@login_required
def directive_edit_view(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    """Edit a directive. Anyone who may see it may edit it, as in the API; only
    the owner may change its team."""
    directive = _visible_directive(request, pk)
    if directive.status in NOT_EDITABLE:
        messages.error(request, f"A {directive.status} directive cannot be edited.")
        return redirect("directive-detail", pk=directive.pk)
    form = DirectiveForm(request.POST if request.method == "POST" else None, user=request.user, directive=directive)
    if form.is_bound and form.is_valid():
        try:
            updated = directive_update(directive=directive, actor=_actor(request), **form.service_fields())
        except ValidationError as exc:
            add_service_errors(form, exc)
        except DomainError as exc:
            form.add_error(None, str(exc))
        else:
            goal_changed = updated.goal != directive.goal
            if goal_changed and directive.status in REPLANS_ON_GOAL and updated.status == Directive.Status.PLANNING:
                messages.success(request, "Saved. The goal changed, so re-planning started.")
            else:
                messages.success(request, "Saved.")
            return redirect("directive-detail", pk=directive.pk)
    return render(
        request,
        "directives/form.html",
        {
            "nav": "directives",
            "form": form,
            "directive": directive,
            "goal_replans": directive.status in REPLANS_ON_GOAL,
            "goal_while_planning": directive.status == Directive.Status.PLANNING,
        },
    )


# --------------------------------------------------------------------------- chain editor


def _chain_steps(directive: Directive, user: Any) -> list[Step]:
    """The live steps of a directive with their ordered dependencies (two queries)."""
    links = StepDependency.objects.select_related("depends_on")
    return list(
        steps_visible_to(user)
        .filter(directive=directive)
        .filter(Q(chain__isnull=True) | Q(chain__status__in=LIVE_CHAIN_STATUSES))
        .prefetch_related(Prefetch("dependency_links", queryset=links.order_by("position")))
        .order_by("order_index", "created_at", "pk")
    )


def _chain_editable(directive: Directive) -> bool:
    return directive.status == Directive.Status.DRAFT


def _render_chain(
    request: HttpRequest,
    directive: Directive,
    steps: list[Step],
    *,
    add_form: StepForm | None = None,
    edit_form: StepForm | None = None,
) -> HttpResponse:
    editable = _chain_editable(directive)
    if editable and add_form is None:
        add_form = StepForm(steps=steps)
    return render(
        request,
        "directives/chain.html",
        {
            "nav": "directives",
            "directive": directive,
            "steps": steps,
            "editable": editable,
            "add_form": add_form if editable else None,
            "edit_form": edit_form if editable else None,
        },
    )


@login_required
def directive_chain(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    """The steps of a directive and, while it is a draft, forms to author them.
    ``?edit=<step id>`` opens that step's edit form."""
    directive = _visible_directive(request, pk)
    steps = _chain_steps(directive, request.user)
    edit_form = None
    editing = request.GET.get("edit", "")
    step = next((s for s in steps if str(s.pk) == editing), None)
    if step is not None and _chain_editable(directive):
        edit_form = StepForm(steps=steps, step=step)
    return _render_chain(request, directive, steps, edit_form=edit_form)


def _refuse_unless_editable(request: HttpRequest, directive: Directive) -> HttpResponse | None:
    if _chain_editable(directive):
        return None
    messages.error(
        request, f"Steps can be authored here only while the directive is a draft; it is {directive.status}."
    )
    return redirect("directive-chain", pk=directive.pk)


@login_required
@require_POST
def chain_step_add(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    directive = _visible_directive(request, pk)
    if refused := _refuse_unless_editable(request, directive):
        return refused
    steps = _chain_steps(directive, request.user)
    form = StepForm(request.POST, steps=steps)
    if form.is_valid():
        try:
            steps_add(directive=directive, specs=[StepSpec(**form.service_fields())], actor=_actor(request))
        except ValidationError as exc:
            add_service_errors(form, exc)
        except DomainError as exc:
            messages.error(request, str(exc))
            return redirect("directive-chain", pk=directive.pk)
        else:
            messages.success(request, f"Step “{form.cleaned_data['name']}” added.")
            return redirect("directive-chain", pk=directive.pk)
    return _render_chain(request, directive, steps, add_form=form)


@login_required
@require_POST
def chain_step_edit(request: HttpRequest, pk: uuid.UUID, step: uuid.UUID) -> HttpResponse:
    directive = _visible_directive(request, pk)
    if refused := _refuse_unless_editable(request, directive):
        return refused
    steps = _chain_steps(directive, request.user)
    target = next((s for s in steps if s.pk == step), None)
    if target is None:
        return _step_not_found(request, directive)
    form = StepForm(request.POST, steps=steps, step=target)
    if form.is_valid():
        fields = form.service_fields()
        depends_on = fields.pop("depends_on")
        try:
            step_update(step=target, actor=_actor(request), depends_on=depends_on, **fields)
        except ValidationError as exc:
            add_service_errors(form, exc, aliases={"steps[1]": "__all__"})
        except DomainError as exc:
            messages.error(request, str(exc))
            return redirect("directive-chain", pk=directive.pk)
        else:
            messages.success(request, f"Step “{target.name}” saved.")
            return redirect("directive-chain", pk=directive.pk)
    return _render_chain(request, directive, steps, edit_form=form)


@login_required
@require_POST
def chain_step_remove(request: HttpRequest, pk: uuid.UUID, step: uuid.UUID) -> HttpResponse:
    directive = _visible_directive(request, pk)
    if refused := _refuse_unless_editable(request, directive):
        return refused
    target = steps_visible_to(request.user).filter(directive=directive, pk=step).first()
    if target is None:
        return _step_not_found(request, directive)
    try:
        step_remove(step=target, actor=_actor(request))
    except DomainError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Step “{target.name}” removed.")
    return redirect("directive-chain", pk=directive.pk)


def _step_not_found(request: HttpRequest, directive: Directive) -> HttpResponse:
    # The directive is visible, so say what happened rather than a bare 404.
    messages.error(request, "That step no longer exists.")
    return redirect(reverse("directive-chain", kwargs={"pk": directive.pk}))


urlpatterns = [
    path("", directive_list, name="directive-list"),
    path("directives/new/", directive_create_view, name="directive-create"),
    path("directives/<uuid:pk>/edit/", directive_edit_view, name="directive-edit"),
    path("directives/<uuid:pk>/chain/", directive_chain, name="directive-chain"),
    path("directives/<uuid:pk>/chain/steps/", chain_step_add, name="chain-step-add"),
    path("directives/<uuid:pk>/chain/steps/<uuid:step>/edit/", chain_step_edit, name="chain-step-edit"),
    path("directives/<uuid:pk>/chain/steps/<uuid:step>/remove/", chain_step_remove, name="chain-step-remove"),
]
