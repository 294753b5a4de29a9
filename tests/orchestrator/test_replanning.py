"""Re-planning after a goal edit, and chain regeneration (spec 4.5)."""

from __future__ import annotations

import pytest

from contracts.models import Task
from daemons.models import DaemonCommand
from directives.lifecycle import on_task_finished
from directives.models import Chain, Directive, GoalHistory, Step
from directives.services import (
    StepSpec,
    directive_pause,
    directive_regenerate,
    directive_start,
    directive_update,
    step_remove,
    step_skip,
    steps_add,
)
from makima.errors import Conflict
from makima.state import SYSTEM, Actor
from tests.factories import make_directive, make_steps
from tests.orchestrator.helpers import (
    AGENT,
    finish,
    go,
    online,
    pass_step,
    planned,
    reload,
    run,
    step,
    step_named,
    submit_plan,
    supervisor_complete,
    tasks,
)

OLD_GOAL = "Expose /healthz returning 200 when the service is up."
NEW_GOAL = "Expose /healthz and /readyz; /readyz checks the database."


def edit_goal(directive, goal=NEW_GOAL):
    directive_update(directive=directive, actor=Actor.for_user(directive.owner), goal=goal)
    go(directive)
    return reload(directive)


def busy(owner):
    """An active directive with a step in every state."""
    online(owner)
    directive = make_directive(owner, agent="scripted", evaluation_mode="off", goal=OLD_GOAL)
    make_steps(
        directive,
        {"name": "Done A", "description": "already merged"},
        {"name": "Running B"},
        {"name": "Broken C"},
        {"name": "Later D", "depends_on": ["Running B"]},
        {"name": "Dropped E"},
    )
    step_skip(step=step_named(directive, "Dropped E"), actor=SYSTEM)
    directive_start(directive=directive, actor=Actor.for_user(owner))
    go(directive)
    pass_step(step_named(directive, "Done A"))
    run(step_named(directive, "Broken C"), Task.Status.FAILED, error="boom")
    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    return directive


def test_editing_the_goal_of_an_active_directive_records_it_and_re_plans(alice):
    directive = edit_goal(busy(alice))

    assert directive.status == Directive.Status.PLANNING
    assert directive.goal == NEW_GOAL
    assert directive.goal_updated_at is not None
    [history] = GoalHistory.objects.filter(directive=directive)
    assert history.previous_goal == OLD_GOAL
    task = directive.orchestrator_task
    assert (task.kind, task.status) == ("planning", Task.Status.STARTING)
    assert task.contract.phase == "replan"


def test_the_re_planning_prompt_lists_both_goals_and_the_steps_grouped_by_status(alice):
    directive = edit_goal(busy(alice))
    plan = directive.orchestrator_task.plan

    assert OLD_GOAL in plan and NEW_GOAL in plan
    assert plan.index("## Previous goal") < plan.index(OLD_GOAL) < plan.index(NEW_GOAL)
    sections = ["### Completed (1)", "### Running (1)", "### Pending (1)", "### Failed (1)", "### Skipped (1)"]
    positions = [plan.index(s) for s in sections]
    assert positions == sorted(positions)
    groups = {part.split("\n", 1)[0]: part for part in plan.split("### ")[1:]}
    for label, name in [
        ("Completed (1)", "Done A"),
        ("Running (1)", "Running B"),
        ("Pending (1)", "Later D"),
        ("Failed (1)", "Broken C"),
        ("Skipped (1)", "Dropped E"),
    ]:
        assert f"- {name} (id " in groups[label], label
    assert str(step_named(directive, "Later D").pk) in plan
    assert "already merged" in plan
    for instruction in ("Keep completed and running work", "makima directive remove-step", "makima directive add-step"):
        assert instruction in plan, instruction
    assert "makima supervisor complete" in plan


def test_a_re_plan_keeps_the_existing_work_and_adds_the_new_steps_as_generation_n_plus_1(alice):
    directive = edit_goal(busy(alice))
    planner = directive.orchestrator_task
    done_a = step_named(directive, "Done A")
    steps_add(directive=directive, specs=[StepSpec(name="Readyz", depends_on=[str(done_a.pk)])], actor=AGENT)
    supervisor_complete(planner)
    finish(planner)

    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    chain = directive.current_chain
    assert chain.generation == 2
    assert Chain.objects.get(directive=directive, generation=1).status == Chain.Status.SUPERSEDED
    assert sorted(chain.steps.values_list("name", flat=True)) == [
        "Broken C",
        "Done A",
        "Later D",
        "Readyz",
        "Running B",
    ]
    assert step_named(directive, "Running B").status == Step.Status.RUNNING
    assert step_named(directive, "Readyz").status == Step.Status.RUNNING  # its dependency passed
    assert step_named(directive, "Readyz").generation == 2


def test_a_re_planner_may_remove_pending_steps(alice):
    directive = edit_goal(busy(alice))
    planner = directive.orchestrator_task
    step_remove(step=step_named(directive, "Later D"), actor=AGENT)
    supervisor_complete(planner)
    finish(planner)

    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    assert not Step.objects.filter(directive=directive, name="Later D").exists()


def test_editing_the_goal_of_a_completed_directive_plans_it_again(alice):
    online(alice)
    directive = planned(alice, step("A"), evaluation_mode="off")
    pass_step(step_named(directive, "A"))
    finish(reload(directive).completion_task)
    assert reload(directive).status == Directive.Status.COMPLETED

    directive = edit_goal(reload(directive))

    assert directive.status == Directive.Status.PLANNING
    assert OLD_GOAL in directive.orchestrator_task.plan
    assert "### Completed (1)" in directive.orchestrator_task.plan


def test_editing_the_goal_of_a_paused_directive_plans_it_again(alice):
    directive = busy(alice)
    directive_pause(directive=directive, actor=Actor.for_user(alice))

    directive = edit_goal(reload(directive))

    assert directive.status == Directive.Status.PLANNING
    assert directive.orchestrator_task.contract.phase == "replan"


def test_a_goal_edit_cancels_an_older_planning_task_still_at_work(alice):
    online(alice)
    directive = make_directive(alice, agent="scripted", goal=OLD_GOAL)
    directive_start(directive=directive, actor=Actor.for_user(alice))
    go(directive)
    old = reload(directive).orchestrator_task
    assert old.status == Task.Status.STARTING
    directive_pause(directive=reload(directive), actor=Actor.for_user(alice))

    directive = edit_goal(reload(directive))

    assert directive.status == Directive.Status.PLANNING
    assert reload(old).status == Task.Status.CANCELLED
    [interrupt] = DaemonCommand.objects.filter(task=old, command_type="interrupt_task")
    assert interrupt.payload["task_id"] == str(old.pk)
    new = directive.orchestrator_task
    assert new.pk != old.pk
    assert NEW_GOAL in new.plan
    # The old planner's late plan changes nothing.
    on_task_finished(task_id=old.pk)
    assert reload(directive).orchestrator_task_id == new.pk
    assert [t.status for t in tasks(directive, Task.Kind.PLANNING)] == [Task.Status.CANCELLED, Task.Status.STARTING]


def test_only_one_planning_task_is_live_after_several_goal_edits(alice):
    directive = busy(alice)
    directive = edit_goal(directive, "First new goal.")
    directive_pause(directive=directive, actor=Actor.for_user(alice))
    directive = edit_goal(reload(directive), "Second new goal.")

    live = [t for t in tasks(directive, Task.Kind.PLANNING) if t.status not in Task.FINISHED]
    assert live == [directive.orchestrator_task]
    assert "Second new goal." in live[0].plan


# --------------------------------------------------------------------------- regenerate


def test_regenerating_supersedes_the_chain_and_plans_generation_n_plus_1(alice):
    online(alice)
    directive = planned(alice, step("A"), step("B", order_index=1), evaluation_mode="off")
    pass_step(step_named(directive, "A"))
    first_chain = reload(directive).current_chain

    directive_regenerate(directive=reload(directive), actor=Actor.for_user(alice))
    go(directive)

    directive = reload(directive)
    assert directive.status == Directive.Status.PLANNING
    assert directive.chain_generation_count == 1
    assert reload(first_chain).status == Chain.Status.SUPERSEDED
    task = directive.orchestrator_task
    assert task.contract.phase == "regenerate"
    assert "generation 2" in task.plan

    directive = submit_plan(directive, step("New A"), step("New B", "New A"))
    assert directive.status == Directive.Status.ACTIVE
    assert directive.current_chain.generation == 2
    assert sorted(directive.current_chain.steps.values_list("name", flat=True)) == ["New A", "New B"]


def test_chain_regenerations_are_refused_at_max_chain_regenerations(alice):
    online(alice)
    directive = planned(alice, step("A"), max_chain_regenerations=1)

    directive_regenerate(directive=reload(directive), actor=Actor.for_user(alice))
    go(directive)
    directive = submit_plan(reload(directive), step("B"))
    assert directive.chain_generation_count == 1

    with pytest.raises(Conflict, match="max_chain_regenerations"):
        directive_regenerate(directive=reload(directive), actor=Actor.for_user(alice))
    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    assert directive.chain_generation_count == 1
    assert Chain.objects.filter(directive=directive).count() == 2
