"""Start and planning (spec 4.1)."""

from __future__ import annotations

import json

import pytest
from django.test import override_settings

from contracts.models import Contract, Task
from directives.lifecycle import advance, on_task_finished
from directives.models import ApprovalRequest, Chain, Directive, DirectiveEvent, Step
from directives.services import (
    StepSpec,
    approval_approve,
    approval_deny,
    directive_pause,
    directive_replan,
    directive_resume,
    directive_start,
    steps_add,
)
from makima.state import Actor
from tests.factories import make_directive, make_steps
from tests.orchestrator.helpers import (
    AGENT,
    events,
    finish,
    go,
    online,
    plan_json,
    planned,
    planning_task,
    reload,
    spawn_commands,
    step,
    step_named,
    submit_plan,
    supervisor_complete,
    tasks,
    write_file,
)

FULL = {
    "title": "Add a health endpoint",
    "goal": "Expose /healthz returning 200 when the service is up.",
    "requirements": [{"id": "R1", "description": "Answer within 50 ms"}],
    "acceptance_criteria": [{"id": "AC1", "criterion": "GET /healthz answers 200"}],
    "constraints": ["No new dependencies"],
    "repository_url": "https://github.com/acme/api.git",
    "base_branch": "trunk",
}


def started(owner, **fields):
    fields.setdefault("agent", "scripted")
    directive = make_directive(owner, **fields)
    directive_start(directive=directive, actor=Actor.for_user(owner))
    go(directive)
    return reload(directive)


def test_starting_a_directive_without_steps_plans_it_with_a_supervisor_planning_task(alice):
    online(alice)
    directive = started(alice, **FULL)

    assert directive.status == Directive.Status.PLANNING
    task = directive.orchestrator_task
    assert task.kind == Task.Kind.PLANNING
    assert task.is_supervisor
    assert task.status == Task.Status.STARTING  # dispatched at once
    assert (task.repository_url, task.base_branch) == (FULL["repository_url"], "trunk")
    contract = task.contract
    assert contract.contract_type == Contract.ContractType.PLANNING
    assert contract.is_directive_orchestrator
    assert contract.supervisor_task_id == task.pk
    [repository] = contract.repositories.all()
    assert (repository.url, repository.is_primary) == (FULL["repository_url"], True)


def test_the_planning_prompt_holds_the_directive_and_how_to_submit_the_plan(alice):
    directive = started(alice, **FULL)
    plan = directive.orchestrator_task.plan

    for text in (
        "Add a health endpoint",
        "Expose /healthz returning 200 when the service is up.",
        "[R1] Answer within 50 ms",
        "[AC1] GET /healthz answers 200",
        "No new dependencies",
        "https://github.com/acme/api.git",
        "trunk",
        "makima directive add-step",
        "makima directive batch-add-steps",
        "makima contract create-file chain-plan",
        "makima supervisor complete",
        '"depends_on"',
        '"order_index"',
        '"task_plan"',
        '"step_type"',
    ):
        assert text in plan, text


def test_the_planning_task_waits_pending_without_a_daemon_and_goes_out_when_one_connects(alice):
    directive = started(alice)
    task = directive.orchestrator_task
    assert task.status == Task.Status.PENDING

    daemon = online(alice)
    go(directive)

    task = reload(task)
    assert (task.status, task.daemon_id) == (Task.Status.STARTING, daemon.pk)
    [command] = spawn_commands(task)
    assert command.payload["task"]["kind"] == "planning"
    assert command.payload["task"]["plan"] == task.plan


def test_advancing_twice_creates_one_planning_task(alice):
    directive = started(alice)
    go(directive)
    advance()

    assert len(tasks(directive, Task.Kind.PLANNING)) == 1


def test_starting_a_directive_with_hand_authored_steps_makes_it_active_directly(alice):
    online(alice)
    directive = make_directive(alice, agent="scripted")
    make_steps(directive, {"name": "A"})
    directive_start(directive=directive, actor=Actor.for_user(alice))
    go(directive)

    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    assert tasks(directive, Task.Kind.PLANNING) == []
    assert step_named(directive, "A").status == Step.Status.RUNNING


def test_steps_added_through_the_api_during_planning_are_kept_when_the_planner_finishes(alice):
    online(alice)
    directive = started(alice)
    steps_add(
        directive=directive,
        specs=[StepSpec(name="Schema"), StepSpec(name="Handler", depends_on=["Schema"])],
        actor=AGENT,
    )
    task = planning_task(directive)
    # A plan file is ignored when steps were added through the API.
    write_file(task.contract, "chain-plan", plan_json(step("Other")))
    supervisor_complete(task)
    finish(task)

    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    chain = directive.current_chain
    assert chain.generation == 1
    assert sorted(chain.steps.values_list("name", flat=True)) == ["Handler", "Schema"]
    assert not Step.objects.filter(directive=directive, name="Other").exists()
    assert step_named(directive, "Schema").status == Step.Status.RUNNING
    assert directive.orchestrator_task is None


PLAN = {"steps": [step("Design"), step("Build", "Design", order_index=1)]}


@pytest.mark.parametrize(
    ("content", "body"),
    [
        (json.dumps(PLAN), None),
        (f"Here it is:\n```json\n{json.dumps(PLAN, indent=2)}\n```\n", None),
        (f"I propose the following plan {json.dumps(PLAN)} — it keeps things small.", None),
        ("", [{"type": "markdown", "content": "# Plan"}, {"type": "code", "content": json.dumps(PLAN)}]),
    ],
    ids=["raw", "fenced", "prose", "body"],
)
def test_a_chain_plan_file_becomes_the_first_chain_and_the_directive_becomes_active(alice, content, body):
    online(alice)
    directive = started(alice)
    task = planning_task(directive)
    write_file(task.contract, "chain-plan", content, body=body)
    supervisor_complete(task)
    finish(task)

    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    chain = directive.current_chain
    assert (chain.generation, chain.status) == (1, Chain.Status.ACTIVE)
    design, build = step_named(directive, "Design"), step_named(directive, "Build")
    assert (design.chain_id, build.chain_id) == (chain.pk, chain.pk)
    assert list(build.depends_on.all()) == [design]
    assert (build.order_index, build.task_plan, build.step_type) == (1, "Plan for Build.", "implement")
    assert design.status == Step.Status.RUNNING
    assert build.status == Step.Status.PENDING


BAD_PLANS = [
    (
        plan_json(step("A", "B"), step("B", "A")),
        "The plan was rejected: dependency cycle: 'A' → 'B' → 'A'.",
    ),
    (
        plan_json(step("A"), step("B", "Ghost")),
        "The plan was rejected: unknown dependencies: 'B' depends on unknown step 'Ghost'.",
    ),
    (plan_json(step("A"), step("A")), "The plan was rejected: duplicate step names: 'A'."),
    (json.dumps({"steps": []}), "The plan was rejected: the plan has no steps."),
    ("I could not come up with a plan.", "The plan was rejected: no JSON could be parsed from the file."),
    ("{}", "The plan was rejected: no JSON object with a 'steps' key was found."),
    (None, "The planner submitted no steps and no `chain-plan` file."),
]


@pytest.mark.parametrize(("content", "message"), BAD_PLANS, ids=lambda v: str(v)[:20])
def test_a_bad_plan_pauses_the_directive_with_an_error_saying_exactly_what_was_wrong(alice, content, message):
    online(alice)
    directive = started(alice)
    task = planning_task(directive)
    if content is not None:
        write_file(task.contract, "chain-plan", content)
    supervisor_complete(task)
    finish(task)

    directive = reload(directive)
    assert directive.status == Directive.Status.PAUSED
    [rejected] = events(directive, "plan_rejected")
    assert rejected.severity == DirectiveEvent.Severity.ERROR
    assert rejected.message == message
    paused = events(directive, "directive_paused")[-1]
    assert (paused.severity, paused.message) == ("error", message)
    # Nothing half-created.
    assert not Step.objects.filter(directive=directive).exists()
    assert not Chain.objects.filter(directive=directive).exists()
    assert directive.current_chain is None


def test_after_a_rejected_plan_the_user_can_retry_planning(alice):
    online(alice)
    directive = started(alice)
    directive = submit_plan(directive, step("A", "A"))
    assert directive.status == Directive.Status.PAUSED

    directive_resume(directive=directive, actor=Actor.for_user(alice))
    go(directive)

    directive = reload(directive)
    assert directive.status == Directive.Status.PLANNING
    assert len(tasks(directive, Task.Kind.PLANNING)) == 2
    directive = submit_plan(directive, step("A"))
    assert directive.status == Directive.Status.ACTIVE
    assert directive.current_chain.generation == 1


def test_a_planning_task_that_fails_pauses_the_directive(alice):
    online(alice)
    directive = started(alice)
    finish(planning_task(directive), Task.Status.FAILED, error="the model is overloaded", exit_code=1)

    directive = reload(directive)
    assert directive.status == Directive.Status.PAUSED
    assert directive.orchestrator_task is None
    [failed] = events(directive, "planning_failed")
    assert failed.severity == DirectiveEvent.Severity.ERROR
    assert failed.message == "The planning task failed: the model is overloaded"
    assert tasks(directive, Task.Kind.EXECUTION) == []


@override_settings(MAKIMA_MAX_TASK_ATTEMPTS=2)
def test_an_interrupted_planning_task_is_retried_then_pauses_the_directive(alice):
    online(alice)
    directive = started(alice)
    task = finish(planning_task(directive), Task.Status.INTERRUPTED, error="daemon lost")

    assert (task.status, task.attempt) == (Task.Status.STARTING, 2)  # the same task, sent out again
    assert reload(directive).status == Directive.Status.PLANNING

    finish(task, Task.Status.INTERRUPTED, error="daemon lost")
    assert reload(directive).status == Directive.Status.PAUSED
    assert "interrupted" in events(directive, "planning_failed")[0].message


def test_a_cancelled_planning_task_is_replaced_by_a_new_one(alice):
    online(alice)
    directive = started(alice)
    first = planning_task(directive)
    finish(first, Task.Status.CANCELLED)

    directive = reload(directive)
    assert directive.status == Directive.Status.PLANNING
    assert directive.orchestrator_task_id not in (None, first.pk)


def test_a_planning_task_that_ends_without_supervisor_complete_still_counts_and_the_log_says_so(alice):
    online(alice)
    directive = started(alice)
    directive = submit_plan(directive, step("A"), complete=False)

    assert directive.status == Directive.Status.ACTIVE
    [noted] = events(directive, "supervisor_complete_missing")
    assert noted.severity == DirectiveEvent.Severity.WARN


def test_supervisor_complete_marks_the_planning_contract_completed_and_nothing_is_noted(alice):
    online(alice)
    directive = started(alice)
    task = planning_task(directive)
    supervisor_complete(task)

    assert reload(task.contract).status == Contract.Status.COMPLETED
    assert reload(task).status == Task.Status.STARTING  # only the daemon's report ends the task
    directive = submit_plan(directive, step("A"))
    assert events(directive, "supervisor_complete_missing") == []


def test_a_plan_finished_twice_is_applied_once(alice):
    online(alice)
    directive = started(alice)
    task = planning_task(directive)
    directive = submit_plan(directive, step("A"))
    on_task_finished(task_id=task.pk)
    advance()

    assert Chain.objects.filter(directive=directive).count() == 1
    assert len(events(directive, "plan_accepted")) == 1


def test_a_new_plan_becomes_generation_n_plus_1(alice):
    online(alice)
    directive = planned(alice, step("A"))
    assert directive.current_chain.generation == 1
    directive_replan(directive=directive, actor=Actor.for_user(alice))
    go(directive)
    directive = reload(directive)
    task = planning_task(directive)
    steps_add(directive=directive, specs=[StepSpec(name="B")], actor=AGENT)
    supervisor_complete(task)
    finish(task)

    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    assert directive.current_chain.generation == 2
    assert Chain.objects.get(directive=directive, generation=1).status == Chain.Status.SUPERSEDED
    assert sorted(directive.current_chain.steps.values_list("name", flat=True)) == ["A", "B"]


# --------------------------------------------------------------------------- plan approval


def reviewed(owner):
    online(owner)
    directive = started(owner, require_plan_approval=True)
    return submit_plan(directive, step("A"), step("B", "A"))


def test_with_plan_approval_a_valid_plan_waits_for_review_in_planning(alice):
    directive = reviewed(alice)

    assert directive.status == Directive.Status.PLANNING
    [approval] = ApprovalRequest.objects.filter(directive=directive)
    assert (approval.kind, approval.status) == (ApprovalRequest.Kind.PLAN_REVIEW, ApprovalRequest.Status.PENDING)
    assert approval.context["steps"] == ["A", "B"]
    # Nothing runs and no second planner starts while the plan waits.
    advance()
    assert len(tasks(directive, Task.Kind.PLANNING)) == 1
    assert tasks(directive, Task.Kind.EXECUTION) == []


def test_approving_the_plan_makes_the_directive_active_and_runs_it(alice):
    directive = reviewed(alice)
    approval = ApprovalRequest.objects.get(directive=directive)

    approval_approve(approval=approval, actor=Actor.for_user(alice), note="Looks right.")
    go(directive)

    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    assert step_named(directive, "A").status == Step.Status.RUNNING


def test_denying_the_plan_re_plans_with_the_reviewers_note_in_the_next_prompt(alice):
    directive = reviewed(alice)
    approval = ApprovalRequest.objects.get(directive=directive)

    approval_deny(approval=approval, actor=Actor.for_user(alice), note="Split B into smaller steps.")
    go(directive)

    directive = reload(directive)
    assert directive.status == Directive.Status.PLANNING
    first, second = tasks(directive, Task.Kind.PLANNING)
    assert directive.orchestrator_task_id == second.pk
    assert "Split B into smaller steps." in second.plan
    assert "Split B into smaller steps." not in first.plan
    # The denied steps are not part of the next plan.
    assert set(Step.objects.filter(directive=directive).values_list("status", flat=True)) == {Step.Status.SKIPPED}

    directive = submit_plan(directive, step("B1"), step("B2", "B1"))
    approval_approve(
        approval=ApprovalRequest.objects.get(directive=directive, status="pending"), actor=Actor.for_user(alice)
    )
    go(directive)
    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    assert directive.current_chain.generation == 2
    assert sorted(directive.current_chain.steps.values_list("name", flat=True)) == ["B1", "B2"]
    assert directive.planning_note == ""


def test_a_plan_finished_while_the_directive_is_paused_is_taken_up_on_resume(alice):
    online(alice)
    directive = started(alice)
    task = planning_task(directive)
    directive_pause(directive=directive, actor=Actor.for_user(alice))
    directive = submit_plan(directive, step("A"))
    assert directive.status == Directive.Status.PAUSED

    directive_resume(directive=reload(directive), actor=Actor.for_user(alice))
    go(directive)

    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    assert tasks(directive, Task.Kind.PLANNING) == [task]
    assert step_named(directive, "A").status == Step.Status.RUNNING


def test_a_directive_paused_while_its_planner_added_steps_resumes_into_planning(alice):
    online(alice)
    directive = started(alice)
    task = planning_task(directive)
    steps_add(directive=directive, specs=[StepSpec(name="A")], actor=AGENT)
    directive_pause(directive=directive, actor=Actor.for_user(alice))

    directive_resume(directive=reload(directive), actor=Actor.for_user(alice))
    go(directive)
    assert reload(directive).status == Directive.Status.PLANNING

    supervisor_complete(task)
    finish(task)
    directive = reload(directive)
    assert directive.status == Directive.Status.ACTIVE
    assert step_named(directive, "A").chain_id == directive.current_chain_id


def test_a_plan_denied_while_the_directive_is_paused_is_planned_again_on_resume(alice):
    directive = reviewed(alice)
    directive_pause(directive=directive, actor=Actor.for_user(alice))
    approval_deny(
        approval=ApprovalRequest.objects.get(directive=directive), actor=Actor.for_user(alice), note="Smaller steps."
    )

    directive_resume(directive=reload(directive), actor=Actor.for_user(alice))
    go(directive)

    directive = reload(directive)
    assert directive.status == Directive.Status.PLANNING
    assert "Smaller steps." in directive.orchestrator_task.plan
    assert tasks(directive, Task.Kind.EXECUTION) == []
