"""Business rules of the directive, step, approval, evaluation and order services."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import time_machine
from django.core.exceptions import ValidationError
from django.db import models
from django.test import override_settings

from contracts.models import Task
from daemons.models import ApiToken, DaemonCommand
from directives.models import (
    ApprovalRequest,
    Chain,
    Directive,
    DirectiveEvent,
    Evaluation,
    GoalHistory,
    Order,
    Step,
    StepDependency,
)
from directives.services import (
    StepSpec,
    approval_approve,
    approval_deny,
    approval_request,
    directive_clean,
    directive_regenerate,
    directive_resume,
    directive_start,
    directive_stop,
    directive_update,
    evaluation_record,
    order_cancel,
    order_link,
    order_unlink,
    step_dependency_ids,
    step_remove,
    step_retry,
    step_rework,
    step_update,
    steps_add,
)
from makima.errors import Conflict
from makima.state import Actor, InvalidTransition
from tests.factories import (
    make_approval,
    make_daemon,
    make_directive,
    make_order,
    make_steps,
    make_task,
    make_token,
)

T0 = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def as_alice(alice) -> Actor:
    return Actor.for_user(alice)


def put(row: models.Model, status: str) -> models.Model:
    """Set a row's status behind the services' back and reload it."""
    type(row).objects.filter(pk=row.pk).update(status=status)
    row.refresh_from_db()
    return row


def reload(row: models.Model) -> models.Model:
    row.refresh_from_db()
    return row


def statuses(*steps: Step) -> list[str]:
    return [reload(step).status for step in steps]


def snapshot() -> dict[str, int]:
    """Row counts that a refused change must leave alone."""
    return {
        model.__name__: model.objects.count()
        for model in (Step, StepDependency, Chain, DirectiveEvent, GoalHistory, Evaluation)
    }


def events(directive: Directive, event_type: str) -> list[DirectiveEvent]:
    return list(DirectiveEvent.objects.filter(directive=directive, event_type=event_type))


def specs(*items: dict[str, Any]) -> list[StepSpec]:
    return [StepSpec(**item) for item in items]


# --------------------------------------------------------------------------- start, resume, stop


def test_starting_a_directive_without_steps_sends_it_to_planning(alice, as_alice):
    directive = make_directive(alice)

    with time_machine.travel(T0, tick=False):
        directive_start(directive=directive, actor=as_alice)

    reload(directive)
    assert directive.status == Directive.Status.PLANNING
    assert directive.started_at == T0
    [event] = events(directive, "directive_planning")
    assert (event.actor_type, event.actor) == ("user", "alice")


def test_starting_a_directive_with_hand_authored_steps_makes_it_active(alice, as_alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]})

    with time_machine.travel(T0, tick=False):
        directive_start(directive=reload(directive), actor=as_alice)

    reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    assert directive.started_at == T0


def test_a_directive_paused_before_it_was_planned_can_be_started(alice, as_alice):
    directive = put(make_directive(alice), Directive.Status.PAUSED)

    directive_start(directive=directive, actor=as_alice)

    assert reload(directive).status == Directive.Status.PLANNING


@pytest.mark.parametrize("status", [Directive.Status.COMPLETED, Directive.Status.ACTIVE, Directive.Status.FAILED])
def test_it_refuses_to_start_a_directive_that_is_not_a_draft(alice, as_alice, status):
    directive = put(make_directive(alice), status)
    before = snapshot()

    with pytest.raises(InvalidTransition):
        directive_start(directive=directive, actor=as_alice)

    assert reload(directive).status == status
    assert reload(directive).started_at is None
    assert snapshot() == before


def test_it_refuses_to_start_a_paused_directive_that_has_a_plan_and_says_to_resume(alice, as_alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"})
    directive = put(reload(directive), Directive.Status.PAUSED)

    with pytest.raises(InvalidTransition, match="resume"):
        directive_start(directive=directive, actor=as_alice)

    assert reload(directive).status == Directive.Status.PAUSED


def test_resuming_a_planned_directive_makes_it_active(alice, as_alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"})
    directive = put(reload(directive), Directive.Status.PAUSED)

    directive_resume(directive=directive, actor=as_alice)

    assert reload(directive).status == Directive.Status.ACTIVE


def test_resuming_a_directive_without_a_live_plan_goes_back_to_planning(alice, as_alice):
    directive = make_directive(alice)
    [step] = make_steps(directive, {"name": "A"})
    # Its only chain was superseded: those steps no longer count as a plan.
    Chain.objects.filter(pk=step.chain_id).update(status=Chain.Status.SUPERSEDED)
    directive = put(reload(directive), Directive.Status.PAUSED)

    directive_resume(directive=directive, actor=as_alice)

    assert reload(directive).status == Directive.Status.PLANNING


def test_it_refuses_to_resume_a_directive_that_is_not_paused(alice, as_alice):
    directive = put(make_directive(alice), Directive.Status.ACTIVE)

    with pytest.raises(InvalidTransition, match="only a paused directive"):
        directive_resume(directive=directive, actor=as_alice)


def test_stopping_a_directive_fails_it_cancels_its_tasks_and_interrupts_running_ones(alice, as_alice):
    directive = put(make_directive(alice), Directive.Status.ACTIVE)
    daemon = make_daemon(alice)
    pending = make_task(directive, name="waiting")
    running = put(make_task(directive, name="working", daemon=daemon), Task.Status.RUNNING)
    done = put(make_task(directive, name="finished", daemon=daemon), Task.Status.DONE)
    token = make_token(alice, ApiToken.Kind.TASK, task=running)

    directive_stop(directive=directive, actor=as_alice, reason="wrong repository")

    assert reload(directive).status == Directive.Status.FAILED
    assert [reload(t).status for t in (pending, running, done)] == ["cancelled", "cancelled", "done"]
    [command] = DaemonCommand.objects.all()
    assert (command.daemon_id, command.task_id) == (daemon.pk, running.pk)
    assert command.command_type == DaemonCommand.CommandType.INTERRUPT_TASK
    assert command.status == DaemonCommand.Status.QUEUED
    assert command.payload == {"task_id": str(running.pk), "reason": "wrong repository"}
    assert reload(token.token).revoked_at is not None
    [event] = events(directive, "directive_failed")
    assert event.severity == DirectiveEvent.Severity.WARN
    assert event.message == "wrong repository"


def test_it_refuses_to_stop_a_completed_directive_and_leaves_its_tasks_alone(alice, as_alice):
    directive = put(make_directive(alice), Directive.Status.COMPLETED)
    task = make_task(directive)

    with pytest.raises(InvalidTransition):
        directive_stop(directive=directive, actor=as_alice)

    assert reload(task).status == Task.Status.PENDING
    assert not DaemonCommand.objects.exists()


# --------------------------------------------------------------------------- editing the goal


def test_a_new_goal_is_kept_in_the_goal_history(alice, as_alice):
    directive = put(make_directive(alice, goal="Old goal"), Directive.Status.ACTIVE)

    with time_machine.travel(T0, tick=False):
        updated = directive_update(directive=directive, actor=as_alice, goal="New goal")

    assert updated.goal == "New goal"
    reload(directive)
    # An active directive re-plans for the new goal (spec 4.5).
    assert (directive.goal, directive.goal_updated_at, directive.status) == ("New goal", T0, "planning")
    assert directive.planning_reason == Directive.PlanningReason.REPLAN
    assert list(directive.goal_history.values_list("previous_goal", flat=True)) == ["Old goal"]
    assert len(events(directive, "goal_updated")) == 1
    assert events(directive, "directive_updated")[0].data == {"fields": ["goal"]}


def test_a_new_goal_sends_a_completed_directive_back_to_planning(alice, as_alice):
    directive = put(make_directive(alice), Directive.Status.COMPLETED)

    directive_update(directive=directive, actor=as_alice, goal="Also expose /readyz")

    assert reload(directive).status == Directive.Status.PLANNING
    assert len(events(directive, "directive_planning")) == 1


def test_the_same_goal_again_changes_nothing(alice, as_alice):
    directive = put(make_directive(alice), Directive.Status.COMPLETED)
    before = snapshot()

    directive_update(directive=directive, actor=as_alice, goal=directive.goal)

    assert snapshot() == before
    assert reload(directive).status == Directive.Status.COMPLETED


def test_other_edits_do_not_touch_the_goal_history(alice, as_alice):
    directive = put(make_directive(alice), Directive.Status.COMPLETED)

    directive_update(directive=directive, actor=as_alice, title="Health and readiness")

    assert reload(directive).title == "Health and readiness"
    assert reload(directive).status == Directive.Status.COMPLETED
    assert not GoalHistory.objects.exists()


@pytest.mark.parametrize("status", [Directive.Status.FAILED, Directive.Status.ARCHIVED])
def test_it_refuses_to_edit_a_failed_or_archived_directive(alice, as_alice, status):
    directive = put(make_directive(alice), status)

    with pytest.raises(Conflict):
        directive_update(directive=directive, actor=as_alice, goal="Something else")

    assert not GoalHistory.objects.exists()


def test_it_refuses_to_edit_fields_that_are_not_editable(alice, as_alice):
    directive = make_directive(alice)

    with pytest.raises(ValidationError) as excinfo:
        directive_update(directive=directive, actor=as_alice, status="active", total_cost_usd=0)

    assert set(excinfo.value.message_dict) == {"status", "total_cost_usd"}
    assert reload(directive).status == Directive.Status.DRAFT


def test_an_edit_is_validated_against_the_stored_thresholds(alice, as_alice):
    directive = make_directive(alice, confidence_threshold_green=0.7, confidence_threshold_yellow=0.4)
    before = snapshot()

    with pytest.raises(ValidationError) as excinfo:
        directive_update(directive=directive, actor=as_alice, confidence_threshold_yellow=0.75, goal="New")

    assert "confidence_threshold_yellow" in excinfo.value.message_dict
    assert reload(directive).confidence_threshold_yellow == 0.4
    assert snapshot() == before


# --------------------------------------------------------------------------- regenerate


@pytest.fixture
def planned(alice) -> dict[str, Any]:
    """An active directive with a chain whose steps sit in every interesting state."""
    directive = make_directive(alice)
    steps = dict(
        zip(
            "ABCDE",
            make_steps(directive, {"name": "A"}, {"name": "B"}, {"name": "C"}, {"name": "D"}, {"name": "E"}),
            strict=True,
        )
    )
    for name, status in zip("ABCDE", ["passed", "pending", "ready", "blocked", "running"], strict=True):
        put(steps[name], status)
    directive = put(reload(directive), Directive.Status.ACTIVE)
    return {"directive": directive, "chain": Chain.objects.get(pk=directive.current_chain_id), **steps}


def test_regenerating_supersedes_the_chain_and_skips_its_steps_that_have_not_started(planned, as_alice):
    directive, chain = planned["directive"], planned["chain"]

    directive_regenerate(directive=directive, actor=as_alice)

    assert reload(chain).status == Chain.Status.SUPERSEDED
    assert statuses(*(planned[n] for n in "ABCDE")) == ["passed", "skipped", "skipped", "skipped", "running"]
    reload(directive)
    assert directive.status == Directive.Status.PLANNING
    assert directive.chain_generation_count == 1
    assert directive.current_chain_id is None
    [event] = events(directive, "directive_planning")
    assert event.data["reason"] == "regenerate"
    assert len(events(directive, "chain_superseded")) == 1


def test_regenerating_counts_against_max_chain_regenerations(planned, as_alice):
    directive = planned["directive"]
    Directive.objects.filter(pk=directive.pk).update(max_chain_regenerations=2, chain_generation_count=1)

    directive_regenerate(directive=reload(directive), actor=as_alice)
    assert reload(directive).chain_generation_count == 2

    directive = put(directive, Directive.Status.ACTIVE)
    with pytest.raises(Conflict, match=r"max_chain_regenerations reached \(2 of 2\)"):
        directive_regenerate(directive=directive, actor=as_alice)
    assert reload(directive).chain_generation_count == 2


def test_it_refuses_to_regenerate_at_the_limit_and_changes_nothing(planned, as_alice):
    directive, chain = planned["directive"], planned["chain"]
    Directive.objects.filter(pk=directive.pk).update(max_chain_regenerations=0)
    before = snapshot()

    with pytest.raises(Conflict, match="max_chain_regenerations"):
        directive_regenerate(directive=reload(directive), actor=as_alice)

    assert reload(chain).status == Chain.Status.ACTIVE
    assert statuses(planned["B"]) == ["pending"]
    assert reload(directive).status == Directive.Status.ACTIVE
    assert snapshot() == before


def test_it_refuses_to_regenerate_a_draft(alice, as_alice):
    directive = make_directive(alice)

    with pytest.raises(InvalidTransition):
        directive_regenerate(directive=directive, actor=as_alice)


# --------------------------------------------------------------------------- adding steps


def test_steps_are_added_with_their_dependencies_in_the_order_given(alice, as_alice):
    directive = make_directive(alice)
    [a] = steps_add(directive=directive, specs=specs({"name": "A"}), actor=as_alice)

    b, c, d = steps_add(
        directive=reload(directive),
        specs=specs(
            {"name": "B", "depends_on": [str(a.pk)]},
            {"name": "C", "depends_on": ["A"]},
            {"name": "D", "depends_on": ["C", "B", "A"]},
        ),
        actor=as_alice,
    )

    assert step_dependency_ids(b) == [a.pk]
    assert step_dependency_ids(c) == [a.pk]
    assert step_dependency_ids(d) == [c.pk, b.pk, a.pk]
    assert {s.chain_id for s in (a, b, c, d)} == {reload(directive).current_chain_id}
    assert len(events(directive, "step_added")) == 4


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (
            [{"name": "A", "depends_on": ["B"]}, {"name": "B", "depends_on": ["A"]}],
            "dependency cycle: 'A' → 'B' → 'A'",
        ),
        (
            [
                {"name": "A", "depends_on": ["C"]},
                {"name": "B", "depends_on": ["A"]},
                {"name": "C", "depends_on": ["B"]},
            ],
            "dependency cycle: 'A' → 'C' → 'B' → 'A'",
        ),
        ([{"name": "A", "depends_on": ["A"]}], "step 'A': depends on itself"),
        ([{"name": "A", "depends_on": ["Z"]}], "step 'A': unknown dependency 'Z'"),
        (
            [{"name": "A"}, {"name": "B", "depends_on": ["A", "A"]}],
            "step 'B': depends on 'A' more than once",
        ),
        ([{"name": "A"}, {"name": "A"}], "step 'A': the name appears more than once in the batch"),
        ([{"name": "Existing"}], "step 'Existing': the directive already has a step with this name"),
    ],
    ids=["2-cycle", "3-cycle", "self", "unknown", "twice", "duplicate-in-batch", "duplicate-existing"],
)
def test_it_refuses_a_bad_batch_and_creates_nothing(alice, as_alice, batch, message):
    directive = make_directive(alice)
    make_steps(directive, {"name": "Existing"})
    directive = reload(directive)
    before = snapshot()

    with pytest.raises(ValidationError) as excinfo:
        steps_add(directive=directive, specs=specs(*batch), actor=as_alice)

    assert message in excinfo.value.message_dict["steps"]
    assert snapshot() == before


def test_a_refused_first_batch_does_not_leave_an_empty_chain_behind(alice, as_alice):
    directive = make_directive(alice)

    with pytest.raises(ValidationError):
        steps_add(directive=directive, specs=specs({"name": "A", "depends_on": ["nope"]}), actor=as_alice)

    assert not Chain.objects.exists()
    assert reload(directive).current_chain_id is None


def test_it_refuses_a_dependency_on_another_directives_step(alice, as_alice):
    mine = make_directive(alice)
    [other] = make_steps(make_directive(alice, title="Other"), {"name": "Other"})
    before = snapshot()

    with pytest.raises(ValidationError) as excinfo:
        steps_add(directive=mine, specs=specs({"name": "A", "depends_on": [str(other.pk)]}), actor=as_alice)

    assert f"step 'A': dependency '{other.pk}' belongs to another directive" in excinfo.value.message_dict["steps"]
    assert snapshot() == before


def test_another_users_step_is_an_unknown_dependency_which_does_not_reveal_that_it_exists(alice, bob, as_alice):
    mine = make_directive(alice)
    [theirs] = make_steps(make_directive(bob), {"name": "Theirs"})
    before = snapshot()

    with pytest.raises(ValidationError) as excinfo:
        steps_add(directive=mine, specs=specs({"name": "A", "depends_on": [str(theirs.pk)]}), actor=as_alice)

    assert excinfo.value.message_dict["steps"] == [f"step 'A': unknown dependency '{theirs.pk}'"]
    assert snapshot() == before
    [step] = make_steps(mine, {"name": "B"})
    with pytest.raises(ValidationError) as excinfo:
        step_update(step=step, actor=as_alice, depends_on=[str(theirs.pk)])
    assert f"unknown dependency '{theirs.pk}'" in str(excinfo.value)


def test_it_reports_every_problem_of_a_batch_at_once(alice, as_alice):
    directive = make_directive(alice)

    with pytest.raises(ValidationError) as excinfo:
        steps_add(
            directive=directive,
            specs=specs({"name": "A", "depends_on": ["X"]}, {"name": "B", "depends_on": ["Y"]}),
            actor=as_alice,
        )

    assert excinfo.value.message_dict["steps"] == [
        "step 'A': unknown dependency 'X'",
        "step 'B': unknown dependency 'Y'",
    ]


def test_it_refuses_an_empty_batch(alice, as_alice):
    directive = make_directive(alice)

    with pytest.raises(ValidationError) as excinfo:
        steps_add(directive=directive, specs=[], actor=as_alice)

    assert "at least one step" in str(excinfo.value.message_dict["steps"])
    assert snapshot()["Chain"] == 0


@override_settings(MAKIMA_MAX_STEPS_PER_BATCH=2)
def test_it_refuses_a_batch_larger_than_the_limit(alice, as_alice):
    directive = make_directive(alice)
    before = snapshot()

    with pytest.raises(ValidationError) as excinfo:
        steps_add(directive=directive, specs=specs({"name": "A"}, {"name": "B"}, {"name": "C"}), actor=as_alice)

    assert excinfo.value.message_dict["steps"] == ["at most 2 steps may be added at once, got 3"]
    assert snapshot() == before
    steps_add(directive=directive, specs=specs({"name": "A"}, {"name": "B"}), actor=as_alice)


@override_settings(MAKIMA_MAX_STEPS_PER_DIRECTIVE=3)
def test_it_refuses_steps_beyond_the_per_directive_limit(alice, as_alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"}, {"name": "B"})
    before = snapshot()

    with pytest.raises(ValidationError, match="at most 3 steps"):
        steps_add(directive=reload(directive), specs=specs({"name": "C"}, {"name": "D"}), actor=as_alice)

    assert snapshot() == before


@pytest.mark.parametrize("status", [Directive.Status.COMPLETED, Directive.Status.FAILED, Directive.Status.ARCHIVED])
def test_it_refuses_steps_for_a_finished_directive(alice, as_alice, status):
    directive = put(make_directive(alice), status)

    with pytest.raises(Conflict):
        steps_add(directive=directive, specs=specs({"name": "A"}), actor=as_alice)

    assert not Step.objects.exists()


# --------------------------------------------------------------------------- editing and removing steps


@pytest.fixture
def line(alice) -> tuple[Step, Step, Step]:
    """A ← B ← C."""
    directive = make_directive(alice)
    return tuple(
        make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]}, {"name": "C", "depends_on": ["B"]})
    )


def test_it_refuses_new_dependencies_that_close_a_cycle_through_existing_steps(line, as_alice):
    a, _b, c = line
    before = snapshot()

    with pytest.raises(ValidationError) as excinfo:
        step_update(step=a, actor=as_alice, depends_on=[str(c.pk)])

    [message] = excinfo.value.message_dict["depends_on"]
    assert message.startswith("dependency cycle:")
    assert "'A'" in message and "'B'" in message and "'C'" in message
    assert step_dependency_ids(a) == []
    assert snapshot() == before


def test_it_refuses_a_step_depending_on_itself_on_update(line, as_alice):
    a, _b, _c = line

    with pytest.raises(ValidationError, match="depends on itself"):
        step_update(step=a, actor=as_alice, depends_on=["A"])


def test_new_dependencies_replace_the_old_ones_in_the_order_given(alice, as_alice):
    directive = make_directive(alice)
    _a, b, c, d = make_steps(directive, {"name": "A"}, {"name": "B"}, {"name": "C"}, {"name": "D", "depends_on": ["A"]})

    step_update(step=d, actor=as_alice, depends_on=["C", str(b.pk)], description="Now after C and B")

    assert step_dependency_ids(d) == [c.pk, b.pk]
    assert reload(d).description == "Now after C and B"
    assert events(directive, "step_updated")[0].data == {"fields": ["depends_on", "description"]}


def test_it_refuses_to_edit_a_running_step_but_lets_it_move_in_the_editor(line, as_alice):
    a = put(line[0], Step.Status.RUNNING)

    with pytest.raises(Conflict):
        step_update(step=a, actor=as_alice, task_plan="Something else")
    step_update(step=a, actor=as_alice, editor_x=10.0, editor_y=20.0)

    assert (reload(a).editor_x, a.editor_y) == (10.0, 20.0)


def test_it_refuses_to_remove_a_step_that_others_depend_on(line, as_alice):
    a, _b, _c = line

    with pytest.raises(Conflict, match="other steps depend on it: 'B'"):
        step_remove(step=a, actor=as_alice)

    assert Step.objects.filter(pk=a.pk).exists()


@pytest.mark.parametrize("status", [Step.Status.RUNNING, Step.Status.EVALUATING, Step.Status.PASSED])
def test_it_refuses_to_remove_a_step_that_has_started(line, as_alice, status):
    c = put(line[2], status)

    with pytest.raises(Conflict, match=f"a {status} step cannot be removed"):
        step_remove(step=c, actor=as_alice)

    assert Step.objects.filter(pk=c.pk).exists()


def test_removing_a_step_that_nothing_depends_on_deletes_it_and_logs_it(line, as_alice):
    _a, b, c = line
    directive = c.directive

    step_remove(step=c, actor=as_alice)

    assert not Step.objects.filter(pk=c.pk).exists()
    assert not StepDependency.objects.filter(step_id=c.pk).exists()
    [event] = events(directive, "step_removed")
    assert event.data == {"name": "C"}
    # B has no dependents any more, so it can go too.
    step_remove(step=b, actor=as_alice)


def test_retrying_a_failed_step_unblocks_its_dependents_transitively(alice, as_alice):
    directive = make_directive(alice)
    a, b, c, d, other_failed, other_blocked = make_steps(
        directive,
        {"name": "A"},
        {"name": "B", "depends_on": ["A"]},
        {"name": "C", "depends_on": ["B"]},
        {"name": "D", "depends_on": ["C"]},
        {"name": "Y"},
        {"name": "X", "depends_on": ["Y"]},
    )
    put(a, Step.Status.FAILED)
    put(other_failed, Step.Status.FAILED)
    for step in (b, c, d, other_blocked):
        put(step, Step.Status.BLOCKED)

    step_retry(step=a, actor=as_alice)

    assert statuses(a, b, c, d) == ["pending"] * 4
    assert statuses(other_failed, other_blocked) == ["failed", "blocked"]
    reasons = [e.data["reason"] for e in events(directive, "step_pending")]
    assert sorted(reasons) == ["retry", "unblocked", "unblocked", "unblocked"]


@pytest.mark.parametrize("status", [Step.Status.PENDING, Step.Status.PASSED, Step.Status.BLOCKED])
def test_it_refuses_to_retry_a_step_that_has_not_failed(line, as_alice, status):
    a = put(line[0], status)

    with pytest.raises(InvalidTransition, match="only a failed step can be retried"):
        step_retry(step=a, actor=as_alice)

    assert reload(a).status == status


def test_rework_sends_a_step_back_with_its_instructions(line, as_alice):
    a = put(line[0], Step.Status.EVALUATING)
    Step.objects.filter(pk=a.pk).update(finished_at=T0)

    step_rework(step=reload(a), instructions="Return JSON, not text.", actor=as_alice)

    reload(a)
    assert (a.status, a.rework_count, a.rework_instructions) == ("pending", 1, "Return JSON, not text.")
    assert a.finished_at is None
    [event] = events(a.directive, "step_pending")
    assert event.data["reason"] == "rework"


def test_rework_fails_the_step_when_its_rework_cycles_are_used_up(line, as_alice):
    a = put(line[0], Step.Status.EVALUATING)
    Directive.objects.filter(pk=a.directive_id).update(max_rework_cycles=2)
    Step.objects.filter(pk=a.pk).update(rework_count=2, rework_instructions="Earlier advice")

    step_rework(step=reload(a), instructions="More advice", actor=as_alice)

    reload(a)
    assert (a.status, a.rework_count, a.rework_instructions) == ("failed", 2, "Earlier advice")
    [event] = events(a.directive, "step_failed")
    assert event.severity == DirectiveEvent.Severity.ERROR
    assert "2 of 2" in event.message


def test_with_no_rework_cycles_the_first_rework_fails_the_step(line, as_alice):
    a = put(line[0], Step.Status.EVALUATING)
    Directive.objects.filter(pk=a.directive_id).update(max_rework_cycles=0)

    step_rework(step=reload(a), instructions="Try again", actor=as_alice)

    assert reload(a).status == Step.Status.FAILED


# --------------------------------------------------------------------------- approvals


@pytest.fixture
def waiting(line) -> tuple[Step, ApprovalRequest]:
    step = put(line[0], Step.Status.AWAITING_APPROVAL)
    return step, make_approval(step)


def test_approving_a_step_review_passes_the_step(waiting, alice, as_alice):
    step, approval = waiting

    with time_machine.travel(T0, tick=False):
        approval_approve(approval=approval, actor=as_alice, note="Looks right")

    reload(approval)
    assert approval.status == ApprovalRequest.Status.APPROVED
    assert (approval.response_note, approval.responded_by, approval.responded_at) == ("Looks right", alice, T0)
    assert reload(step).status == Step.Status.PASSED
    assert reload(step).finished_at == T0


def test_denying_a_step_review_reworks_the_step_with_the_note(waiting, as_alice):
    step, approval = waiting

    approval_deny(approval=approval, actor=as_alice, note="Handle the empty case")

    assert reload(approval).status == ApprovalRequest.Status.DENIED
    reload(step)
    assert (step.status, step.rework_count, step.rework_instructions) == ("pending", 1, "Handle the empty case")


def test_denying_without_a_note_still_gives_rework_instructions(waiting, as_alice):
    step, approval = waiting

    approval_deny(approval=approval, actor=as_alice)

    assert reload(step).rework_instructions == "A reviewer denied this step."


def test_denying_a_step_without_rework_cycles_left_fails_it(waiting, as_alice):
    step, approval = waiting
    Directive.objects.filter(pk=step.directive_id).update(max_rework_cycles=1)
    Step.objects.filter(pk=step.pk).update(rework_count=1)

    approval_deny(approval=approval, actor=as_alice, note="Still wrong")

    assert reload(step).status == Step.Status.FAILED


def test_approving_a_plan_review_activates_the_planning_directive(alice, as_alice):
    directive = put(make_directive(alice, require_plan_approval=True), Directive.Status.PLANNING)
    approval = approval_request(directive=directive, kind=ApprovalRequest.Kind.PLAN_REVIEW, description="Plan")

    approval_approve(approval=approval, actor=as_alice)

    assert reload(directive).status == Directive.Status.ACTIVE
    [event] = events(directive, "directive_active")
    assert event.data["approval"] == str(approval.pk)


def test_approving_twice_is_a_no_op(waiting, as_alice):
    step, approval = waiting
    approval_approve(approval=approval, actor=as_alice, note="first")

    approval_approve(approval=approval, actor=as_alice, note="second")

    assert reload(approval).response_note == "first"
    assert len(events(step.directive, "approval_approved")) == 1
    assert len(events(step.directive, "step_passed")) == 1


def test_it_refuses_to_approve_a_denied_request_and_leaves_the_step_alone(waiting, as_alice):
    step, approval = waiting
    approval_deny(approval=approval, actor=as_alice, note="No")

    with pytest.raises(InvalidTransition):
        approval_approve(approval=approval, actor=as_alice)

    assert reload(approval).status == ApprovalRequest.Status.DENIED
    assert reload(step).status == Step.Status.PENDING


def test_an_approval_for_a_step_that_moved_on_does_not_move_it_again(waiting, as_alice):
    step, approval = waiting
    put(step, Step.Status.FAILED)

    approval_approve(approval=approval, actor=as_alice)

    assert reload(approval).status == ApprovalRequest.Status.APPROVED
    assert reload(step).status == Step.Status.FAILED


# --------------------------------------------------------------------------- evaluations


@pytest.fixture
def evaluated(alice) -> Step:
    directive = make_directive(alice, confidence_threshold_green=0.9, confidence_threshold_yellow=0.6)
    [step] = make_steps(directive, {"name": "A"})
    return put(step, Step.Status.EVALUATING)


@pytest.mark.parametrize(
    ("score", "level"),
    [(1.0, "green"), (0.9, "green"), (0.89, "yellow"), (0.6, "yellow"), (0.59, "red"), (0.0, "red")],
)
def test_the_confidence_level_follows_the_directive_thresholds(evaluated, score, level):
    evaluation = evaluation_record(step=evaluated, kind="agent", passed=True, overall_score=score)

    assert evaluation.confidence_level == level
    reload(evaluated)
    assert (evaluated.confidence_score, evaluated.confidence_level) == (score, level)
    assert evaluated.last_evaluation_id == evaluation.pk


def test_a_stated_confidence_level_is_kept(evaluated):
    evaluation = evaluation_record(
        step=evaluated, kind="manual", passed=False, overall_score=0.95, confidence_level="red"
    )

    assert evaluation.confidence_level == "red"


def test_an_evaluation_is_stored_with_everything_it_found(evaluated):
    evaluation = evaluation_record(
        step=evaluated,
        kind="verifiers",
        passed=False,
        overall_score=0.5,
        verifier_results=[{"name": "pytest", "command": "pytest -q", "passed": False, "exit_code": 1}],
        summary_feedback="Two tests fail.",
        rework_instructions="Fix the failing tests.",
    )

    stored = Evaluation.objects.get(pk=evaluation.pk)
    assert (stored.directive_id, stored.chain_id, stored.step_id) == (
        evaluated.directive_id,
        evaluated.chain_id,
        evaluated.pk,
    )
    assert stored.verifier_results[0]["exit_code"] == 1
    [event] = events(evaluated.directive, "evaluation_recorded")
    assert event.severity == DirectiveEvent.Severity.WARN
    assert event.data == {"kind": "verifiers", "passed": False, "score": 0.5, "confidence": "red"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"overall_score": 1.2}, "overall_score"),
        ({"overall_score": -0.1}, "overall_score"),
        ({"confidence_level": "blue"}, "confidence_level"),
    ],
)
def test_it_refuses_an_evaluation_with_a_bad_score_or_level(evaluated, fields, field):
    values = {"overall_score": 0.5, **fields}
    before = snapshot()

    with pytest.raises(ValidationError) as excinfo:
        evaluation_record(step=evaluated, kind="agent", passed=True, **values)

    assert field in excinfo.value.message_dict
    assert snapshot() == before
    assert reload(evaluated).confidence_score is None


# --------------------------------------------------------------------------- orders


def test_linking_an_open_order_attaches_it_to_the_directive(alice, as_alice):
    directive = make_directive(alice)
    order = make_order(alice)

    order_link(order=order, directive=directive, actor=as_alice)

    reload(order)
    assert (order.status, order.directive_id) == (Order.Status.LINKED, directive.pk)
    [event] = events(directive, "order_linked")
    assert event.data["from"] == "open"


def test_linking_again_to_the_same_directive_is_a_no_op(alice, as_alice):
    directive = make_directive(alice)
    order = make_order(alice)
    order_link(order=order, directive=directive, actor=as_alice)

    order_link(order=order, directive=directive, actor=as_alice)

    assert len(events(directive, "order_linked")) == 1


def test_it_refuses_to_link_an_order_that_is_linked_elsewhere(alice, as_alice):
    first, second = make_directive(alice), make_directive(alice, title="Another")
    order = make_order(alice)
    order_link(order=order, directive=first, actor=as_alice)

    with pytest.raises(InvalidTransition, match="only an open order can be linked"):
        order_link(order=order, directive=second, actor=as_alice)

    assert reload(order).directive_id == first.pk


@pytest.mark.parametrize("status", sorted(Directive.TERMINAL))
def test_it_refuses_to_link_an_order_to_a_finished_directive(alice, as_alice, status):
    directive = put(make_directive(alice), status)
    order = make_order(alice)

    with pytest.raises(Conflict):
        order_link(order=order, directive=directive, actor=as_alice)

    reload(order)
    assert (order.status, order.directive_id) == (Order.Status.OPEN, None)


def test_unlinking_an_order_reopens_it_and_is_logged_on_the_directive(alice, as_alice):
    directive = make_directive(alice)
    order = make_order(alice)
    order_link(order=order, directive=directive, actor=as_alice)

    order_unlink(order=order, actor=as_alice)

    reload(order)
    assert (order.status, order.directive_id) == (Order.Status.OPEN, None)
    assert len(events(directive, "order_open")) == 1


def test_cancelling_an_order(alice, as_alice):
    order = make_order(alice)

    order_cancel(order=order, actor=as_alice)

    assert reload(order).status == Order.Status.CANCELLED


def test_it_refuses_to_cancel_a_done_order(alice, as_alice):
    order = put(make_order(alice), Order.Status.DONE)

    with pytest.raises(InvalidTransition):
        order_cancel(order=order, actor=as_alice)

    assert reload(order).status == Order.Status.DONE


# --------------------------------------------------------------------------- validating directive fields


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"confidence_threshold_green": 1.5}, "confidence_threshold_green"),
        ({"confidence_threshold_green": -0.1}, "confidence_threshold_green"),
        ({"confidence_threshold_yellow": -0.01, "confidence_threshold_green": 0.5}, "confidence_threshold_yellow"),
        ({"confidence_threshold_green": "high"}, "confidence_threshold_green"),
        ({"confidence_threshold_green": True}, "confidence_threshold_green"),
        ({"confidence_threshold_yellow": 0.9, "confidence_threshold_green": 0.8}, "confidence_threshold_yellow"),
        ({"confidence_threshold_green": 0.3}, "confidence_threshold_yellow"),  # below the default yellow 0.5
        ({"max_rework_cycles": -1}, "max_rework_cycles"),
        ({"max_rework_cycles": None}, "max_rework_cycles"),
        ({"max_rework_cycles": "3"}, "max_rework_cycles"),
        ({"max_total_cost_usd": Decimal("-0.01")}, "max_total_cost_usd"),
        ({"max_wall_time_minutes": -5}, "max_wall_time_minutes"),
        ({"max_chain_regenerations": -1}, "max_chain_regenerations"),
        ({"requirements": "just do it"}, "requirements"),
        ({"requirements": [{"id": "R1"}]}, "requirements"),
        ({"requirements": [{"id": "R1", "description": "a"}, {"id": "R1", "description": "b"}]}, "requirements"),
        ({"requirements": ["  "]}, "requirements"),
        ({"acceptance_criteria": [42]}, "acceptance_criteria"),
        ({"constraints": "no network"}, "constraints"),
        ({"constraints": ["ok", 3]}, "constraints"),
        ({"verifiers": "sometimes"}, "verifiers"),
        ({"verifiers": ["pytest", ""]}, "verifiers"),
        ({"title": "   "}, "title"),
        ({"goal": ""}, "goal"),
    ],
)
def test_it_refuses_bad_directive_fields_naming_the_field(fields, field):
    with pytest.raises(ValidationError) as excinfo:
        directive_clean(fields)

    assert field in excinfo.value.message_dict, excinfo.value.message_dict


def test_it_reports_several_bad_fields_together():
    with pytest.raises(ValidationError) as excinfo:
        directive_clean({"confidence_threshold_green": 2, "max_wall_time_minutes": -1, "title": ""})

    assert set(excinfo.value.message_dict) == {"confidence_threshold_green", "max_wall_time_minutes", "title"}


def test_it_accepts_boundary_thresholds_and_normalises_lists():
    cleaned = directive_clean(
        {
            "confidence_threshold_green": 1,
            "confidence_threshold_yellow": 0,
            "requirements": ["  Uses stdlib  ", {"id": "perf", "description": "Fast"}],
            "acceptance_criteria": ["Tests pass"],
            "verifiers": [" pytest -q "],
            "max_total_cost_usd": Decimal("12.50"),
            "max_chain_regenerations": None,
        }
    )

    assert cleaned["requirements"] == [
        {"id": "R1", "description": "Uses stdlib"},
        {"id": "perf", "description": "Fast"},
    ]
    assert cleaned["acceptance_criteria"] == [{"id": "AC1", "criterion": "Tests pass"}]
    assert cleaned["verifiers"] == ["pytest -q"]
    assert directive_clean({"verifiers": "auto"})["verifiers"] == "auto"


def test_a_directive_with_bad_fields_is_not_created(alice):
    with pytest.raises(ValidationError):
        make_directive(alice, confidence_threshold_yellow=0.9, confidence_threshold_green=0.8)

    assert not Directive.objects.exists()
    assert not DirectiveEvent.objects.exists()


def test_order_update_writes_an_event_naming_the_changed_fields(alice):
    from directives.models import DirectiveEvent
    from directives.services import order_update
    from makima.state import Actor
    from tests.factories import make_order

    order = make_order(alice)
    order_update(order=order, actor=Actor.for_user(alice), title="New title", priority="high")
    event = DirectiveEvent.objects.get(event_type="order_updated", subject_id=str(order.pk))
    assert event.data == {"fields": ["title"]}
    assert event.actor == "alice"


@pytest.mark.parametrize("field", ["priority", "order_type"])
def test_orders_refuse_unknown_priorities_and_types(alice, field):
    from directives.models import Order
    from directives.services import order_create

    with pytest.raises(ValidationError) as excinfo:
        order_create(owner=alice, title="x", **{field: "urgent-ish"})
    assert field in excinfo.value.message_dict
    assert not Order.objects.exists()
