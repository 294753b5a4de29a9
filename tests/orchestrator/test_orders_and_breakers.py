"""Orders picked up by the planner, circuit breakers, pause and stop (spec 4.5)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import time_machine
from django.utils import timezone

from contracts.models import Task
from contracts.services import task_dispatch_pending
from daemons.models import DaemonCommand
from directives.lifecycle import advance, tick
from directives.models import Directive, DirectiveEvent, Order, Step
from directives.services import (
    StepSpec,
    directive_pause,
    directive_resume,
    directive_start,
    directive_stop,
    order_link,
    steps_add,
)
from makima.state import SYSTEM, Actor
from tests.factories import make_directive, make_order, make_steps
from tests.orchestrator.helpers import (
    events,
    finish,
    go,
    online,
    pass_step,
    planned,
    reload,
    run,
    spawn_commands,
    step,
    step_named,
    supervisor_complete,
    tasks,
)


def link(directive, **fields):
    order = make_order(directive.owner, **fields)
    order_link(order=order, directive=directive, actor=Actor.for_user(directive.owner))
    return order


# --------------------------------------------------------------------------- orders


def test_linked_orders_send_an_active_directive_to_an_order_pickup_planning_task(alice):
    online(alice)
    directive = planned(alice, step("A"))
    low = link(directive, title="Tidy the README", priority="low", order_type="chore")
    critical = link(directive, title="Login loops forever", priority="critical", order_type="bug")
    medium = link(directive, title="Dark mode", priority="medium", description="Users keep asking.")
    high = link(directive, title="Export to CSV", priority="high")

    go(directive)

    directive = reload(directive)
    assert directive.status == Directive.Status.PLANNING
    task = directive.orchestrator_task
    assert task.contract.phase == "order_pickup"
    plan = task.plan
    positions = [plan.index(o.title) for o in (critical, high, medium, low)]
    assert positions == sorted(positions)
    for order in (critical, high, medium, low):
        assert str(order.pk) in plan
    assert '[critical] bug "Login loops forever"' in plan
    assert "Users keep asking." in plan
    assert "Select an adequate number" in plan
    assert "makima directive add-step" in plan
    assert "- A (id " in plan  # the existing steps


def test_picked_orders_become_in_progress_and_the_others_stay_linked(alice):
    online(alice)
    directive = planned(alice, step("A"))
    picked = link(directive, title="Export to CSV")
    left = link(directive, title="Dark mode", priority="low")
    go(directive)
    pickup = reload(directive).orchestrator_task

    steps_add(
        directive=reload(directive),
        specs=[StepSpec(name="CSV export", description=f"For order {picked.pk}.")],
        actor=SYSTEM,
    )
    supervisor_complete(pickup)
    finish(pickup)

    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    assert reload(picked).status == Order.Status.IN_PROGRESS
    assert reload(left).status == Order.Status.LINKED
    assert directive.current_chain.generation == 2
    assert sorted(directive.current_chain.steps.values_list("name", flat=True)) == ["A", "CSV export"]
    # The order left for later does not send the directive back to planning over and over.
    go(directive)
    advance()
    assert reload(directive).status == Directive.Status.ACTIVE
    assert len(tasks(directive, Task.Kind.PLANNING)) == 2


def test_a_pickup_that_adds_steps_without_naming_orders_takes_them_all(alice):
    online(alice)
    directive = planned(alice, step("A"))
    first, second = link(directive), link(directive, title="Second")
    go(directive)
    pickup = reload(directive).orchestrator_task
    steps_add(directive=reload(directive), specs=[StepSpec(name="Both")], actor=SYSTEM)
    finish(pickup)

    assert {reload(first).status, reload(second).status} == {Order.Status.IN_PROGRESS}


def test_a_pickup_that_picks_nothing_does_not_loop_and_a_new_order_triggers_another(alice):
    online(alice)
    directive = planned(alice, step("A"))
    ignored = link(directive)
    go(directive)
    finish(reload(directive).orchestrator_task)

    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    assert reload(ignored).status == Order.Status.LINKED
    tick()
    assert reload(directive).status == Directive.Status.ACTIVE
    assert len(tasks(directive, Task.Kind.PLANNING)) == 2

    link(directive, title="Something new")
    go(directive)
    directive = reload(directive)
    assert directive.status == Directive.Status.PLANNING
    assert str(ignored.pk) in directive.orchestrator_task.plan  # offered again


def test_picked_orders_are_done_when_the_directive_completes(alice):
    online(alice)
    directive = planned(alice, step("A"), evaluation_mode="off")
    order = link(directive)
    go(directive)
    pickup = reload(directive).orchestrator_task
    steps_add(directive=reload(directive), specs=[StepSpec(name="B", description=str(order.pk))], actor=SYSTEM)
    finish(pickup)

    pass_step(step_named(directive, "A"))
    pass_step(step_named(directive, "B"))
    assert reload(order).status == Order.Status.IN_PROGRESS
    finish(reload(directive).completion_task)

    assert reload(directive).status == Directive.Status.COMPLETED
    assert reload(order).status == Order.Status.DONE


# --------------------------------------------------------------------------- breakers


def assert_tripped(directive, breaker):
    directive = reload(directive)
    assert directive.status == Directive.Status.PAUSED
    paused = events(directive, "directive_paused")[-1]
    assert paused.severity == DirectiveEvent.Severity.ERROR
    assert breaker in paused.message
    assert paused.data["breaker"] == breaker
    return directive


def test_the_cost_breaker_pauses_the_directive_before_anything_else_is_dispatched(alice):
    online(alice)
    directive = planned(alice, step("A"), step("B", "A"), evaluation_mode="off", max_total_cost_usd=Decimal("1.00"))
    planner = tasks(directive, Task.Kind.PLANNING)[0]
    Task.objects.filter(pk=planner.pk).update(cost_usd=Decimal("0.40"))

    run(step_named(directive, "A"), cost_usd=Decimal("0.60"))

    directive = assert_tripped(directive, "max_total_cost_usd")
    assert directive.total_cost_usd == Decimal("1.00")
    assert step_named(directive, "A").status == Step.Status.PASSED  # the running task finished
    assert step_named(directive, "B").status == Step.Status.PENDING
    assert tasks(directive, Task.Kind.EXECUTION) == [step_named(directive, "A").execution_task]


def test_task_costs_add_up_into_the_directives_total(alice):
    online(alice)
    directive = planned(alice, step("A"), step("B"), evaluation_mode="off")
    run(step_named(directive, "A"), cost_usd=Decimal("0.25"))
    run(step_named(directive, "B"), cost_usd=Decimal("0.50"))

    assert reload(directive).total_cost_usd == Decimal("0.75")


def test_below_the_cost_limit_nothing_trips(alice):
    online(alice)
    directive = planned(alice, step("A"), step("B", "A"), evaluation_mode="off", max_total_cost_usd=Decimal("5"))
    run(step_named(directive, "A"), cost_usd=Decimal("4.99"))

    assert reload(directive).status == Directive.Status.ACTIVE
    assert step_named(directive, "B").status == Step.Status.RUNNING


def test_the_wall_time_breaker_pauses_the_directive(alice):
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        online(alice)
        directive = planned(alice, step("A"), step("B", "A"), evaluation_mode="off", max_wall_time_minutes=30)
    with time_machine.travel(start + timedelta(minutes=29), tick=False):
        online(alice, "late", last_seen_at=timezone.now())
        tick()
        assert reload(directive).status == Directive.Status.ACTIVE
    with time_machine.travel(start + timedelta(minutes=30), tick=False):
        run(step_named(directive, "A"))

    assert_tripped(directive, "max_wall_time_minutes")
    assert step_named(directive, "B").execution_task is None


def test_the_regeneration_breaker_pauses_a_directive_past_its_limit(alice):
    online(alice)
    directive = planned(alice, step("A"), step("B", "A"), evaluation_mode="off", max_chain_regenerations=3)
    # The limit was lowered below the regenerations already made.
    Directive.objects.filter(pk=directive.pk).update(chain_generation_count=3, max_chain_regenerations=2)

    run(step_named(directive, "A"))

    assert_tripped(directive, "max_chain_regenerations")
    assert step_named(directive, "B").execution_task is None


def hand_authored(owner, *names, **fields):
    directive = make_directive(owner, agent="scripted", **fields)
    make_steps(directive, *({"name": n} for n in names))
    directive_start(directive=directive, actor=Actor.for_user(owner))
    go(directive)
    return reload(directive)


def test_a_tripped_breaker_dispatches_no_pending_task(alice):
    directive = hand_authored(alice, "A", max_total_cost_usd=Decimal("1"))
    task = step_named(directive, "A").execution_task
    assert task.status == Task.Status.PENDING  # no daemon yet
    Directive.objects.filter(pk=directive.pk).update(total_cost_usd=Decimal("2"))

    online(alice)
    go(directive)

    assert_tripped(directive, "max_total_cost_usd")
    assert reload(task).status == Task.Status.PENDING
    assert spawn_commands(task) == []


def test_pause_stops_new_dispatches_while_running_tasks_finish(alice):
    online(alice)
    directive = planned(alice, step("A"), step("B", "A"), evaluation_mode="off")
    directive_pause(directive=directive, actor=Actor.for_user(alice))

    a = run(step_named(directive, "A"))

    assert a.status == Step.Status.PASSED
    assert step_named(directive, "B").execution_task is None
    tick()
    assert step_named(directive, "B").execution_task is None

    directive_resume(directive=reload(directive), actor=Actor.for_user(alice))
    go(directive)
    assert step_named(directive, "B").status == Step.Status.RUNNING


def test_a_paused_directives_pending_tasks_wait_for_resume(alice):
    directive = hand_authored(alice, "A")
    task = step_named(directive, "A").execution_task
    directive_pause(directive=directive, actor=Actor.for_user(alice))
    online(alice)

    assert task_dispatch_pending(owner_ids=[alice.pk]) == []
    assert reload(task).status == Task.Status.PENDING


def test_stop_interrupts_running_tasks_and_fails_the_directive(alice):
    online(alice)
    directive = planned(alice, step("A"), step("B"), step("C", order_index=1))
    running = [step_named(directive, n).execution_task for n in "AB"]

    directive_stop(directive=directive, actor=Actor.for_user(alice), reason="wrong repository")
    advance()

    directive = reload(directive)
    assert directive.status == Directive.Status.FAILED
    for task in running:
        assert reload(task).status == Task.Status.CANCELLED
        [interrupt] = DaemonCommand.objects.filter(task=task, command_type="interrupt_task")
        assert interrupt.daemon_id == task.daemon_id
        assert interrupt.payload == {"task_id": str(task.pk), "reason": "wrong repository"}
    assert step_named(directive, "C").execution_task is None
