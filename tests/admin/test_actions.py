"""Admin actions call the services, log who acted, and report refusals per object."""

from __future__ import annotations

import pytest

from contracts.models import Task
from daemons.models import ApiToken
from directives.models import ApprovalRequest, Directive, DirectiveEvent, Step
from directives.services import directive_pause, directive_start, step_transition
from makima.state import SYSTEM
from tests.admin.helpers import changelist, run_action
from tests.factories import make_approval, make_directive, make_steps, make_task, make_token

pytestmark = pytest.mark.django_db


def active_directive(owner, title: str = "Add a health endpoint") -> Directive:
    directive = make_directive(owner, title=title)
    make_steps(directive, {"name": "Design"}, {"name": "Build", "depends_on": ["Design"]})
    return directive_start(directive=directive, actor=SYSTEM)


def step_in(directive: Directive, name: str, *path: str) -> Step:
    """The step ``name`` moved along ``path`` by the orchestrator's own transitions."""
    step = Step.objects.get(directive=directive, name=name)
    for status in path:
        step_transition(step=step, to=status, actor=SYSTEM)
    return step


def user_event(subject_id, event_type: str) -> DirectiveEvent:
    return DirectiveEvent.objects.get(subject_id=str(subject_id), event_type=event_type, actor_type="user")


def messages_of(response) -> list[tuple[str, str]]:
    return [(message.level_tag, message.message) for message in response.context["messages"]]


def test_start_sends_a_draft_without_steps_to_planning_as_the_admin_user(staff, alice):
    directive = make_directive(alice)

    response = run_action(staff, Directive, "start_directives", directive)

    directive.refresh_from_db()
    assert directive.status == Directive.Status.PLANNING
    assert user_event(directive.pk, "directive_planning").actor == "root"
    assert ("success", "1 directive started.") in messages_of(response)


def test_start_makes_a_draft_with_steps_active(staff, alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "Design"})

    run_action(staff, Directive, "start_directives", directive)

    directive.refresh_from_db()
    assert directive.status == Directive.Status.ACTIVE
    assert directive.started_at is not None
    assert user_event(directive.pk, "directive_active").data == {"from": "draft", "to": "active"}


def test_pause_then_resume_an_active_directive(staff, alice):
    directive = active_directive(alice)

    run_action(staff, Directive, "pause_directives", directive)
    directive.refresh_from_db()
    assert directive.status == Directive.Status.PAUSED
    assert user_event(directive.pk, "directive_paused").actor == "root"

    run_action(staff, Directive, "resume_directives", directive)
    directive.refresh_from_db()
    assert directive.status == Directive.Status.ACTIVE
    assert user_event(directive.pk, "directive_active").data == {"from": "paused", "to": "active"}


def test_stop_fails_the_directive_and_cancels_its_tasks(staff, alice):
    directive = active_directive(alice)
    task = make_task(directive, step=Step.objects.get(directive=directive, name="Design"))

    response = run_action(staff, Directive, "stop_directives", directive)

    directive.refresh_from_db()
    task.refresh_from_db()
    assert directive.status == Directive.Status.FAILED
    assert task.status == Task.Status.CANCELLED
    event = user_event(directive.pk, "directive_failed")
    assert (event.severity, event.actor) == ("warn", "root")
    assert ("success", "1 directive stopped.") in messages_of(response)


def test_a_refused_transition_is_reported_and_the_other_directives_still_change(staff, alice):
    draft = make_directive(alice, title="Still a draft")
    running = active_directive(alice, title="Already running")
    events_before = DirectiveEvent.objects.filter(directive=running).count()

    response = run_action(staff, Directive, "start_directives", draft, running)

    draft.refresh_from_db()
    running.refresh_from_db()
    assert draft.status == Directive.Status.PLANNING
    assert running.status == Directive.Status.ACTIVE
    assert DirectiveEvent.objects.filter(directive=running).count() == events_before
    shown = messages_of(response)
    assert (
        "warning",
        "Could not start “Already running”: directive cannot go from 'active' to 'planning': "
        "only a draft can be started",
    ) in shown
    assert ("success", "1 directive started.") in shown
    assert 'class="warning"' in response.content.decode()


def test_repeating_a_transition_changes_nothing_and_says_so(staff, alice):
    directive = active_directive(alice)
    directive_pause(directive=directive, actor=SYSTEM)
    events_before = DirectiveEvent.objects.filter(directive=directive).count()

    response = run_action(staff, Directive, "pause_directives", directive)

    assert DirectiveEvent.objects.filter(directive=directive).count() == events_before
    assert ("info", "1 directive left as they were (already in that state).") in messages_of(response)


def test_a_completed_directive_cannot_be_stopped(staff, alice):
    directive = active_directive(alice)
    Directive.objects.filter(pk=directive.pk).update(status=Directive.Status.COMPLETED)

    response = run_action(staff, Directive, "stop_directives", directive)

    directive.refresh_from_db()
    assert directive.status == Directive.Status.COMPLETED
    [(level, text)] = messages_of(response)
    assert level == "warning"
    assert text.startswith("Could not stop “Add a health endpoint”: directive cannot go from 'completed' to 'failed'")


def test_retry_sends_a_failed_step_back_to_pending(staff, alice):
    directive = active_directive(alice)
    step = step_in(directive, "Design", "ready", "running", "failed")

    run_action(staff, Step, "retry_steps", step)

    step.refresh_from_db()
    assert step.status == Step.Status.PENDING
    assert user_event(step.pk, "step_pending").data == {"from": "failed", "to": "pending", "reason": "retry"}


def test_retry_refuses_a_step_that_has_not_failed(staff, alice):
    directive = active_directive(alice)
    step = step_in(directive, "Design", "ready", "running")

    response = run_action(staff, Step, "retry_steps", step)

    step.refresh_from_db()
    assert step.status == Step.Status.RUNNING
    assert messages_of(response) == [
        (
            "warning",
            "Could not retry “Design”: step cannot go from 'running' to 'pending': only a failed step can be retried",
        )
    ]


def test_skip_skips_pending_steps_and_refuses_passed_ones(staff, alice):
    directive = active_directive(alice)
    passed = step_in(directive, "Design", "ready", "running", "evaluating", "passed")
    pending = Step.objects.get(directive=directive, name="Build")

    response = run_action(staff, Step, "skip_steps", passed, pending)

    passed.refresh_from_db()
    pending.refresh_from_db()
    assert (passed.status, pending.status) == (Step.Status.PASSED, Step.Status.SKIPPED)
    assert user_event(pending.pk, "step_skipped").actor == "root"
    shown = messages_of(response)
    assert ("warning", "Could not skip “Design”: step cannot go from 'passed' to 'skipped'") in shown
    assert ("success", "1 step skipped.") in shown


def test_revoke_sets_revoked_at_and_logs_it(staff, alice):
    token = make_token(alice).token

    run_action(staff, ApiToken, "revoke_tokens", token)

    token.refresh_from_db()
    assert token.revoked_at is not None
    assert user_event(token.pk, "token_revoked").actor == "root"


def test_revoking_a_revoked_token_keeps_its_first_revocation(staff, alice):
    token = make_token(alice).token
    run_action(staff, ApiToken, "revoke_tokens", token)
    token.refresh_from_db()
    first = token.revoked_at

    response = run_action(staff, ApiToken, "revoke_tokens", token)

    token.refresh_from_db()
    assert token.revoked_at == first
    assert ("info", "1 api token left as they were (already in that state).") in messages_of(response)


def test_approving_a_step_review_passes_the_step(staff, alice, root):
    directive = active_directive(alice)
    step = step_in(directive, "Design", "ready", "running", "evaluating", "awaiting_approval")
    approval = make_approval(step)

    run_action(staff, ApprovalRequest, "approve_requests", approval)

    approval.refresh_from_db()
    step.refresh_from_db()
    assert (approval.status, approval.responded_by) == (ApprovalRequest.Status.APPROVED, root)
    assert step.status == Step.Status.PASSED


def test_denying_a_step_review_sends_the_step_back_for_rework(staff, alice):
    directive = active_directive(alice)
    step = step_in(directive, "Design", "ready", "running", "evaluating", "awaiting_approval")
    approval = make_approval(step)

    run_action(staff, ApprovalRequest, "deny_requests", approval)

    approval.refresh_from_db()
    step.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.DENIED
    assert (step.status, step.rework_count) == (Step.Status.PENDING, 1)


def test_the_action_bar_offers_the_service_actions(staff, alice):
    make_directive(alice)
    make_token(alice)

    directive_actions = staff.get(changelist(Directive)).content.decode()
    token_actions = staff.get(changelist(ApiToken)).content.decode()

    for action in ("start_directives", "pause_directives", "resume_directives", "stop_directives"):
        assert f'value="{action}"' in directive_actions
    assert 'value="revoke_tokens"' in token_actions
