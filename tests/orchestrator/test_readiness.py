"""Readiness, blocking and stalling (spec 4.2, 4.5)."""

from __future__ import annotations

from contracts.models import Task
from directives.models import Directive, DirectiveEvent, Step
from directives.services import directive_resume, directive_start, step_retry, step_skip
from makima.state import SYSTEM, Actor
from tests.factories import make_directive, make_steps
from tests.orchestrator.helpers import events, go, online, pass_step, reload, run, step_named


def started(owner, *specs, **fields):
    fields.setdefault("agent", "scripted")
    directive = make_directive(owner, **fields)
    make_steps(directive, *specs)
    directive_start(directive=directive, actor=Actor.for_user(owner))
    go(directive)
    return reload(directive)


def statuses(directive):
    return {s.name: s.status for s in Step.objects.filter(directive=directive)}


def test_a_step_without_dependencies_in_the_first_phase_is_ready_at_once(alice):
    directive = started(alice, {"name": "A"}, {"name": "B"})

    assert statuses(directive) == {"A": "ready", "B": "ready"}


def test_a_step_waits_until_every_dependency_passed(alice):
    online(alice)
    directive = started(alice, {"name": "A"}, {"name": "B"}, {"name": "C", "depends_on": ["A", "B"]})
    assert statuses(directive)["C"] == "pending"

    pass_step(step_named(directive, "A"))
    assert statuses(directive)["C"] == "pending"
    assert step_named(directive, "C").execution_task is None

    pass_step(step_named(directive, "B"))
    assert statuses(directive)["C"] == "running"


def test_a_skipped_dependency_counts_as_done(alice):
    online(alice)
    directive = make_directive(alice, agent="scripted")
    a, _ = make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]})
    step_skip(step=a, actor=SYSTEM)
    directive_start(directive=directive, actor=Actor.for_user(alice))
    go(directive)

    assert statuses(directive) == {"A": "skipped", "B": "running"}


def test_a_step_waits_for_every_step_of_its_chain_with_a_lower_order_index(alice):
    online(alice)
    directive = started(alice, {"name": "A"}, {"name": "B"}, {"name": "C", "order_index": 1})
    assert statuses(directive) == {"A": "running", "B": "running", "C": "pending"}

    pass_step(step_named(directive, "A"))
    assert statuses(directive)["C"] == "pending"

    pass_step(step_named(directive, "B"))
    assert statuses(directive)["C"] == "running"


def test_a_skipped_step_of_an_earlier_phase_does_not_hold_up_the_next_phase(alice):
    online(alice)
    directive = make_directive(alice, agent="scripted")
    a, _ = make_steps(directive, {"name": "A"}, {"name": "B", "order_index": 1})
    step_skip(step=a, actor=SYSTEM)
    directive_start(directive=directive, actor=Actor.for_user(alice))
    go(directive)

    assert statuses(directive)["B"] == "running"


def test_a_failed_dependency_blocks_its_dependents_transitively(alice):
    online(alice)
    directive = started(
        alice,
        {"name": "A"},
        {"name": "B", "depends_on": ["A"]},
        {"name": "C", "depends_on": ["B"]},
        {"name": "D"},
    )

    run(step_named(directive, "A"), Task.Status.FAILED, error="boom")

    assert statuses(directive) == {"A": "failed", "B": "blocked", "C": "blocked", "D": "running"}
    assert all(e.data["reason"] == "'A' failed" for e in events(directive, "step_blocked"))
    assert reload(directive).status == Directive.Status.ACTIVE  # D can still progress


def test_a_failed_step_with_nothing_else_able_to_progress_pauses_the_directive_naming_it(alice):
    online(alice)
    directive = started(alice, {"name": "Build it"}, {"name": "Ship it", "depends_on": ["Build it"]})

    run(step_named(directive, "Build it"), Task.Status.FAILED, error="boom")

    directive = reload(directive)
    assert directive.status == Directive.Status.PAUSED
    [stalled] = events(directive, "directive_stalled")
    assert stalled.severity == DirectiveEvent.Severity.ERROR
    assert "'Build it'" in stalled.message
    assert events(directive, "directive_paused")[-1].message == stalled.message


def test_a_directive_waits_while_another_step_is_still_running(alice):
    online(alice)
    directive = started(alice, {"name": "A"}, {"name": "B"}, {"name": "C", "depends_on": ["A"]})

    run(step_named(directive, "A"), Task.Status.FAILED, error="boom")
    assert reload(directive).status == Directive.Status.ACTIVE

    run(step_named(directive, "B"), Task.Status.FAILED, error="boom too")
    directive = reload(directive)
    assert directive.status == Directive.Status.PAUSED
    assert "'A', 'B'" in events(directive, "directive_stalled")[0].message


def test_a_step_waiting_behind_a_failed_step_of_an_earlier_phase_cannot_progress(alice):
    online(alice)
    directive = started(alice, {"name": "A"}, {"name": "B", "order_index": 1})

    run(step_named(directive, "A"), Task.Status.FAILED, error="boom")

    assert statuses(directive) == {"A": "failed", "B": "pending"}
    assert reload(directive).status == Directive.Status.PAUSED


def test_a_ready_step_waiting_for_a_daemon_still_counts_as_progress(alice):
    daemon = online(alice, max_concurrent_tasks=1)
    directive = started(alice, {"name": "A"}, {"name": "B"})
    assert statuses(directive) == {"A": "running", "B": "ready"}
    daemon.status = "disconnected"
    daemon.save()

    run(step_named(directive, "A"), Task.Status.FAILED, error="boom")

    assert reload(directive).status == Directive.Status.ACTIVE


def test_retrying_a_failed_step_sends_it_back_to_pending_and_the_directive_can_resume(alice):
    online(alice)
    directive = started(alice, {"name": "A"}, {"name": "B", "depends_on": ["A"]})
    a = run(step_named(directive, "A"), Task.Status.FAILED, error="boom")
    failed_task = a.execution_task
    assert reload(directive).status == Directive.Status.PAUSED

    step_retry(step=a, actor=Actor.for_user(alice))
    assert statuses(directive) == {"A": "pending", "B": "pending"}
    go(directive)
    assert statuses(directive)["A"] == "pending"  # paused: nothing is dispatched

    directive_resume(directive=reload(directive), actor=Actor.for_user(alice))
    go(directive)

    assert reload(directive).status == Directive.Status.ACTIVE
    a = step_named(directive, "A")
    assert a.status == Step.Status.RUNNING
    assert a.execution_task_id != failed_task.pk
    assert a.execution_task.name == "A (retry)"
    pass_step(a)
    assert statuses(directive)["B"] == "running"


def test_skipping_the_failed_step_lets_the_directive_finish(alice):
    online(alice)
    directive = started(alice, {"name": "A"}, {"name": "B"})
    run(step_named(directive, "A"), Task.Status.FAILED, error="boom")
    pass_step(step_named(directive, "B"))
    assert reload(directive).status == Directive.Status.PAUSED

    step_skip(step=step_named(directive, "A"), actor=Actor.for_user(alice))
    directive_resume(directive=reload(directive), actor=Actor.for_user(alice))
    go(directive)

    assert reload(directive).status == Directive.Status.COMPLETING


def test_a_step_added_to_a_running_directive_is_dispatched_at_once_not_at_the_next_tick(
    alice, django_capture_on_commit_callbacks
):
    online(alice)
    directive = started(alice, {"name": "A"})
    assert statuses(directive) == {"A": "running"}

    with django_capture_on_commit_callbacks(execute=True):
        make_steps(directive, {"name": "B"})

    assert statuses(directive) == {"A": "running", "B": "running"}
    assert step_named(directive, "B").execution_task is not None
