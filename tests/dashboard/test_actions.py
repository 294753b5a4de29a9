"""Directive page actions: directive and step buttons, and answering a paused task."""

from __future__ import annotations

import re

import pytest
from django.template.loader import render_to_string
from django.test import Client, RequestFactory
from django.urls import reverse

from contracts.models import Task
from contracts.services import TASK_MESSAGE_MAX_CHARS, task_transition
from daemons.models import DaemonCommand
from daemons.services import command_ack, command_claim
from directives.models import Chain, Directive, DirectiveEvent, Step
from directives.services import directive_pause, directive_start, directive_stop
from makima.state import SYSTEM
from tests.factories import make_daemon, make_directive, make_steps, make_task

pytestmark = pytest.mark.django_db

XSS = "<script>alert(1)</script><img src=x onerror=alert(1)>"


def act(client: Client, directive: Directive, action: str, **data: str):
    return client.post(reverse("directive-action", args=[directive.pk, action]), data)


def step_act(client: Client, step: Step, action: str, **data: str):
    return client.post(reverse("step-action", args=[step.directive_id, step.pk, action]), data)


def answer(client: Client, task: Task, message: str = "Use port 8080.", **data: str):
    return client.post(reverse("task-answer", args=[task.pk]), {"message": message, **data})


def flashed(response) -> list[str]:
    return [str(m) for m in response.wsgi_request._messages]


def shown_messages(response) -> str:
    """The flash messages as the next page shows them (``includes/messages.html``)."""
    return render_to_string("includes/messages.html", {"messages": response.wsgi_request._messages})


def detail_url(directive: Directive) -> str:
    return reverse("directive-detail", args=[directive.pk])


def fresh(instance):
    instance.refresh_from_db()
    return instance


@pytest.fixture
def planned(alice):
    """alice's draft directive with two hand-authored steps (A → B)."""
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]})
    return directive


@pytest.fixture
def active(planned):
    return directive_start(directive=planned, actor=SYSTEM)


@pytest.fixture
def shared(alice, platform):
    """A directive alice shares with the "platform" team (carol is in it)."""
    directive = make_directive(alice, team=platform)
    make_steps(directive, {"name": "A"})
    return directive


def paused_task(directive: Directive, **fields) -> Task:
    """A task of ``directive`` whose agent waits for an answer on alice's daemon."""
    daemon = make_daemon(directive.owner)
    task = make_task(directive, daemon=daemon, status=Task.Status.RUNNING, **fields)
    task_transition(task=task, to=Task.Status.PAUSED, updates={"question": "Which port should it listen on?"})
    return task


# --------------------------------------------------------------------------- directive actions


def test_starting_a_draft_with_steps_makes_it_active_and_returns_to_the_directive_page(client_as, alice, planned):
    response = act(client_as(alice), planned, "start")
    assert response.status_code == 302
    assert response["Location"] == detail_url(planned)
    assert fresh(planned).status == Directive.Status.ACTIVE
    assert flashed(response) == ["Directive started."]


def test_pausing_records_the_reason_in_the_event_log(client_as, alice, active):
    act(client_as(alice), active, "pause", reason="Waiting for the API freeze.")
    assert fresh(active).status == Directive.Status.PAUSED
    event = DirectiveEvent.objects.filter(directive=active, event_type="directive_paused").get()
    assert event.message == "Waiting for the API freeze."
    assert event.actor == "alice"


def test_a_paused_directive_resumes(client_as, alice, active):
    directive_pause(directive=active, actor=SYSTEM)
    act(client_as(alice), active, "resume")
    assert fresh(active).status == Directive.Status.ACTIVE


def test_stopping_fails_the_directive(client_as, alice, active):
    response = act(client_as(alice), active, "stop", reason="Wrong repository.")
    assert fresh(active).status == Directive.Status.FAILED
    assert "stopped" in flashed(response)[0]


def test_replanning_sends_an_active_directive_back_to_planning(client_as, alice, active):
    act(client_as(alice), active, "replan")
    assert fresh(active).status == Directive.Status.PLANNING


def test_regenerating_supersedes_the_chain_and_counts_the_regeneration(client_as, alice, active):
    chain_id = fresh(active).current_chain_id
    act(client_as(alice), active, "regenerate")
    directive = fresh(active)
    assert directive.status == Directive.Status.PLANNING
    assert directive.chain_generation_count == 1
    assert Chain.objects.get(pk=chain_id).status == Chain.Status.SUPERSEDED


def test_a_failed_directive_is_archived(client_as, alice, active):
    directive_stop(directive=active, actor=SYSTEM)
    act(client_as(alice), active, "archive")
    assert fresh(active).status == Directive.Status.ARCHIVED


def test_a_refused_transition_shows_the_services_error_and_changes_nothing(client_as, alice, active):
    events = DirectiveEvent.objects.count()
    response = act(client_as(alice), active, "resume")
    assert response.status_code == 302
    assert response["Location"] == detail_url(active)
    assert flashed(response) == ["directive cannot go from 'active' to 'active': only a paused directive can resume"]
    assert fresh(active).status == Directive.Status.ACTIVE
    assert DirectiveEvent.objects.count() == events


def test_the_refusal_is_shown_as_an_alert(client_as, alice, active):
    html = shown_messages(act(client_as(alice), active, "start"))
    assert 'role="alert"' in html and "only a draft can be started" in html


def test_regenerating_past_the_limit_is_refused_with_the_limit_named(client_as, alice):
    directive = make_directive(alice, max_chain_regenerations=0)
    make_steps(directive, {"name": "A"})
    directive_start(directive=directive, actor=SYSTEM)
    response = act(client_as(alice), directive, "regenerate")
    assert flashed(response) == ["max_chain_regenerations reached (0 of 0)"]
    assert fresh(directive).status == Directive.Status.ACTIVE


def test_an_overlong_reason_is_refused_and_the_directive_keeps_running(client_as, alice, active):
    response = act(client_as(alice), active, "pause", reason="x" * 1001)
    assert "at most 1000 characters" in flashed(response)[0]
    assert fresh(active).status == Directive.Status.ACTIVE


def test_a_forged_unknown_action_is_404(client_as, alice, active):
    assert act(client_as(alice), active, "delete").status_code == 404
    assert fresh(active).status == Directive.Status.ACTIVE


def test_a_stranger_gets_404_and_changes_nothing(client_as, bob, active):
    assert act(client_as(bob), active, "stop").status_code == 404
    assert fresh(active).status == Directive.Status.ACTIVE


def test_a_teammate_can_steer_a_shared_directive(client_as, carol, shared):
    act(client_as(carol), shared, "start")
    directive = fresh(shared)
    assert directive.status == Directive.Status.ACTIVE
    assert DirectiveEvent.objects.filter(directive=directive, event_type="directive_active", actor="carol").exists()


def test_an_anonymous_visitor_is_sent_to_the_login_page(client, active):
    response = act(client, active, "stop")
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert fresh(active).status == Directive.Status.ACTIVE


def test_actions_only_accept_post(client_as, alice, active):
    client = client_as(alice)
    assert client.get(reverse("directive-action", args=[active.pk, "stop"])).status_code == 405
    step = active.steps.first()
    assert client.get(reverse("step-action", args=[active.pk, step.pk, "skip"])).status_code == 405
    assert client.get(reverse("task-answer", args=[paused_task(active).pk])).status_code == 405
    assert fresh(active).status == Directive.Status.ACTIVE


def test_actions_need_the_csrf_token(alice, active):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert act(client, active, "stop").status_code == 403
    assert fresh(active).status == Directive.Status.ACTIVE


def test_a_safe_next_url_is_followed(client_as, alice, active):
    response = act(client_as(alice), active, "pause", next="/directives/?status=paused")
    assert response["Location"] == "/directives/?status=paused"


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/x", "javascript:alert(1)"])
def test_a_next_url_elsewhere_is_ignored(client_as, alice, active, target):
    response = act(client_as(alice), active, "pause", next=target)
    assert response["Location"] == detail_url(active)


# --------------------------------------------------------------------------- step actions


def test_a_failed_step_is_retried(client_as, alice, active):
    step = active.steps.get(name="A")
    Step.objects.filter(pk=step.pk).update(status=Step.Status.FAILED)
    response = step_act(client_as(alice), step, "retry")
    assert response["Location"] == detail_url(active)
    assert fresh(step).status == Step.Status.PENDING
    assert flashed(response) == ["Step “A” will run again."]


def test_a_pending_step_is_skipped(client_as, alice, active):
    step = active.steps.get(name="B")
    step_act(client_as(alice), step, "skip")
    assert fresh(step).status == Step.Status.SKIPPED


def test_retrying_a_step_that_did_not_fail_is_refused(client_as, alice, active):
    step = active.steps.get(name="B")
    response = step_act(client_as(alice), step, "retry")
    assert flashed(response) == ["step cannot go from 'pending' to 'pending': only a failed step can be retried"]
    assert fresh(step).status == Step.Status.PENDING


def test_evaluating_a_step_that_never_ran_is_refused(client_as, alice, active):
    step = active.steps.get(name="A")
    response = step_act(client_as(alice), step, "evaluate")
    assert "has not been executed yet" in flashed(response)[0]
    assert fresh(step).status == step.status


def test_an_executed_step_is_evaluated_again(client_as, alice, active):
    step = active.steps.get(name="A")
    task = make_task(active, step=step, status=Task.Status.DONE)
    Step.objects.filter(pk=step.pk).update(status=Step.Status.PASSED, execution_task=task)
    step_act(client_as(alice), step, "evaluate")
    assert fresh(step).status == Step.Status.EVALUATING


def test_a_step_of_another_directive_is_404(client_as, alice, active):
    other = make_directive(alice, title="Other")
    (foreign,) = make_steps(other, {"name": "X"})
    url = reverse("step-action", args=[active.pk, foreign.pk, "skip"])
    assert client_as(alice).post(url).status_code == 404
    assert fresh(foreign).status == Step.Status.PENDING


def test_step_actions_are_404_for_strangers_and_unknown_actions(client_as, alice, bob, active):
    step = active.steps.get(name="B")
    assert step_act(client_as(bob), step, "skip").status_code == 404
    assert step_act(client_as(alice), step, "delete").status_code == 404
    assert fresh(step).status == Step.Status.PENDING


# --------------------------------------------------------------------------- answering a paused task


def test_answering_a_paused_task_queues_exactly_one_send_message_for_its_daemon(client_as, alice, active):
    task = paused_task(active)
    response = answer(client_as(alice), task, "Use port 8080.")
    assert response["Location"] == detail_url(active)
    command = DaemonCommand.objects.get(task=task)
    assert command.command_type == DaemonCommand.CommandType.SEND_MESSAGE
    assert command.daemon_id == task.daemon_id
    assert command.status == DaemonCommand.Status.QUEUED
    assert command.payload == {"task_id": str(task.pk), "message": "Use port 8080."}
    event = DirectiveEvent.objects.get(event_type="task_answered")
    assert (event.actor, event.message, event.directive_id) == ("alice", "Use port 8080.", active.pk)
    assert fresh(task).status == Task.Status.PAUSED  # until the daemon has delivered it
    assert "Answer sent" in flashed(response)[0]


def test_the_task_runs_again_when_its_daemon_acknowledges_the_answer(client_as, alice, active):
    task = paused_task(active)
    daemon = task.daemon
    daemon.connection_id = "c1"
    daemon.save(update_fields=["connection_id"])
    answer(client_as(alice), task)
    delivery = command_claim(daemon_id=daemon.pk, connection_id="c1")
    (message,) = delivery.messages
    assert (message["type"], message["task_id"], message["message"]) == ("send_message", str(task.pk), "Use port 8080.")
    command_ack(daemon=daemon, command_id=message["command_id"], ok=True)
    task = fresh(task)
    assert task.status == Task.Status.RUNNING
    assert task.question == ""


def test_a_task_that_is_not_paused_is_not_answered(client_as, alice, active):
    task = make_task(active, daemon=make_daemon(alice), status=Task.Status.RUNNING)
    response = answer(client_as(alice), task)
    assert flashed(response) == ["only a paused task can be answered; this one is running"]
    assert not DaemonCommand.objects.exists()


def test_a_second_answer_is_refused_while_the_first_is_on_its_way(client_as, alice, active):
    task = paused_task(active)
    client = client_as(alice)
    answer(client, task, "first")
    response = answer(client, task, "second")
    # The first answer's confirmation was never shown (no page in between), so it is still queued too.
    assert flashed(response)[-1] == "an answer to this task is already on its way to its daemon"
    assert DaemonCommand.objects.filter(task=task).count() == 1


@pytest.mark.parametrize("message", ["", "   ", "x" * (TASK_MESSAGE_MAX_CHARS + 1)])
def test_an_empty_or_overlong_answer_is_refused(client_as, alice, active, message):
    task = paused_task(active)
    response = answer(client_as(alice), task, message)
    assert response.status_code == 302
    assert len(flashed(response)) == 1 and "answer" in flashed(response)[0].lower()
    assert not DaemonCommand.objects.exists()


def test_a_stranger_cannot_answer_and_learns_nothing(client_as, bob, active):
    task = paused_task(active)
    assert answer(client_as(bob), task).status_code == 404
    assert not DaemonCommand.objects.exists()


def test_a_teammate_can_answer_a_task_of_a_shared_directive(client_as, carol, shared):
    task = paused_task(shared)
    answer(client_as(carol), task)
    assert DaemonCommand.objects.filter(task=task, command_type="send_message").count() == 1


def test_an_answer_with_an_unsafe_next_goes_back_to_the_directive(client_as, alice, active):
    task = paused_task(active)
    response = answer(client_as(alice), task, next="https://evil.example/")
    assert response["Location"] == detail_url(active)


# --------------------------------------------------------------------------- the partials


def render(template: str, user, **context) -> str:
    request = RequestFactory().get("/")
    request.user = user
    return render_to_string(f"directives/partials/{template}", context, request=request)


def buttons(html: str) -> list[str]:
    return [re.sub(r"\s+", " ", b).strip() for b in re.findall(r"<button[^>]*>(.*?)</button>", html, re.S)]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("draft", ["Start", "Stop"]),
        ("planning", ["Pause", "Stop"]),
        ("active", ["Pause", "Re-plan", "Regenerate chain", "Stop"]),
        ("paused", ["Resume", "Re-plan", "Regenerate chain", "Stop"]),
        ("completing", ["Pause", "Stop"]),
        ("completed", ["Re-plan", "Regenerate chain", "Archive"]),
        ("failed", ["Archive"]),
        ("archived", []),
    ],
)
def test_the_directive_offers_only_the_actions_its_status_allows(alice, status, expected):
    directive = Directive(owner=alice, title="t", status=status)  # unsaved: the partial needs no queries
    assert buttons(render("actions.html", alice, directive=directive)) == expected


def test_destructive_directive_actions_ask_for_confirmation(alice, active):
    html = render("actions.html", alice, directive=active)
    for action in ("stop", "replan", "regenerate"):
        form = re.search(rf'actions/{action}/".*?</form>', html, re.S).group(0)
        assert "data-confirm=" in form, action
    assert 'name="csrfmiddlewaretoken"' in html


def test_regeneration_is_not_offered_past_the_limit(alice, active):
    active.max_chain_regenerations = 2
    active.chain_generation_count = 2
    html = render("actions.html", alice, directive=active)
    assert "Regenerate chain" not in buttons(html)
    assert "Regeneration limit reached (2 of 2)" in html


@pytest.mark.parametrize(
    ("status", "executed", "expected"),
    [
        ("pending", False, ["Skip"]),
        ("blocked", False, ["Skip"]),
        ("running", True, []),
        ("failed", True, ["Retry", "Skip", "Evaluate again"]),
        ("failed", False, ["Retry", "Skip"]),
        ("passed", True, ["Evaluate again"]),
        ("skipped", False, []),
    ],
)
def test_a_step_offers_only_the_actions_its_status_allows(alice, active, status, executed, expected):
    step = active.steps.get(name="A")
    step.status = status
    if executed:
        step.execution_task = make_task(active, step=step)
    assert buttons(render("step_actions.html", alice, directive=active, step=step)) == expected


def test_a_step_awaiting_approval_links_to_the_inbox(alice, active):
    step = active.steps.get(name="A")
    step.status = Step.Status.AWAITING_APPROVAL
    html = render("step_actions.html", alice, directive=active, step=step)
    assert f'href="{reverse("approval-inbox")}"' in html
    assert buttons(html) == []


def test_rendering_step_actions_for_many_steps_needs_no_queries(alice, active, django_assert_num_queries):
    steps = list(Step.objects.filter(directive=active)) * 50
    with django_assert_num_queries(0):
        for step in steps:
            render("step_actions.html", alice, directive=active, step=step)


def test_step_names_in_the_step_actions_are_escaped(alice, active):
    step = active.steps.get(name="A")
    step.name = XSS
    html = render("step_actions.html", alice, directive=active, step=step)
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;" in html


def test_the_answer_form_shows_the_question_escaped(alice, active):
    task = paused_task(active, name=XSS)
    task.question = XSS
    html = render("task_answer.html", alice, directive=active, task=task)
    assert "<script>" not in html and "<img" not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2  # the name and the question
    assert f'action="{reverse("task-answer", args=[task.pk])}"' in html
    assert f'<label for="task-answer-message-{task.pk}">' in html
    assert f'maxlength="{TASK_MESSAGE_MAX_CHARS}"' in html


def test_the_answer_form_is_only_shown_for_a_paused_task(alice, active):
    task = make_task(active, status=Task.Status.RUNNING)
    assert render("task_answer.html", alice, directive=active, task=task).strip() == ""


def test_a_message_naming_an_agent_written_step_is_escaped(client_as, alice, active):
    step = active.steps.get(name="B")
    Step.objects.filter(pk=step.pk).update(name=XSS)
    html = shown_messages(step_act(client_as(alice), fresh(step), "skip"))
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
