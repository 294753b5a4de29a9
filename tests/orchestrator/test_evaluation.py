"""Evaluation of finished steps and its routing (spec 4.3)."""

from __future__ import annotations

import json

import pytest
from django.test import override_settings

from contracts.models import Contract, Task
from directives.models import ApprovalRequest, Directive, DirectiveEvent, Evaluation, Step
from directives.services import approval_approve, approval_deny, step_request_evaluation
from makima.state import Actor
from tests.orchestrator.helpers import (
    evaluate,
    events,
    finish,
    go,
    online,
    planned,
    reload,
    run,
    spawn_commands,
    step,
    step_named,
    supervisor_complete,
    verdict,
    write_file,
)

PASSING = [
    {"name": "pytest", "command": "pytest -q", "passed": True, "exit_code": 0, "duration_s": 1.0, "output_tail": "ok"},
    {"name": "ruff", "command": "ruff check", "passed": True, "exit_code": 0, "duration_s": 0.2, "output_tail": ""},
]
ONE_FAILING = [
    PASSING[0],
    {
        "name": "ruff",
        "command": "ruff check",
        "passed": False,
        "exit_code": 1,
        "duration_s": 0.2,
        "output_tail": "E501 line too long",
    },
]


def directive_with(owner, **fields):
    online(owner)
    fields.setdefault("evaluation_mode", "agent")
    return planned(owner, step("A"), step("B", "A"), **fields)


def evaluated(owner, result, **fields):
    """Step A ran, and its evaluator returned ``result``."""
    directive = directive_with(owner, **fields)
    a = run(step_named(directive, "A"))
    assert a.status == Step.Status.EVALUATING
    return directive, evaluate(a, result)


def test_a_finished_step_is_evaluated_by_a_monitoring_task(alice):
    directive = directive_with(alice)
    a = run(step_named(directive, "A"))

    assert a.status == Step.Status.EVALUATING
    monitor = a.monitoring_task
    assert (monitor.kind, monitor.is_supervisor, monitor.status) == ("monitoring", True, Task.Status.STARTING)
    assert monitor.continue_from_task_id == a.execution_task_id  # it reads the step's worktree
    assert a.monitoring_contract.contract_type == Contract.ContractType.MONITORING
    assert monitor.contract_id == a.monitoring_contract_id
    assert len(spawn_commands(monitor)) == 1


def test_the_monitoring_prompt_holds_everything_the_evaluator_needs(alice):
    directive = directive_with(
        alice,
        requirements=["Answer within 50 ms"],
        acceptance_criteria=["GET /healthz answers 200"],
        constraints=["No new dependencies"],
        confidence_threshold_green=0.85,
        confidence_threshold_yellow=0.55,
    )
    a = run(step_named(directive, "A"))
    plan = a.monitoring_task.plan

    for text in (
        directive.goal,
        "[R1] Answer within 50 ms",
        "[AC1] GET /healthz answers 200",
        "No new dependencies",
        "A",
        "Do A.",
        "Plan for A.",
        str(a.execution_contract_id),
        a.execution_task.branch,
        "0.85",
        "0.55",
        "evaluation-result",
        '"overallScore"',
        '"confidenceLevel"',
        '"criteriaResults"',
        '"summaryFeedback"',
        '"reworkInstructions"',
        '"passed"',
        "makima supervisor complete",
    ):
        assert text in plan, text


def test_a_green_passing_evaluation_passes_the_step_and_the_next_one_starts(alice):
    directive, a = evaluated(alice, verdict(0.92))

    assert a.status == Step.Status.PASSED
    assert (a.confidence_score, a.confidence_level) == (0.92, "green")
    evaluation = a.last_evaluation
    assert (evaluation.kind, evaluation.passed, evaluation.overall_score) == ("agent", True, 0.92)
    assert evaluation.criteria_results == [
        {"criterion": "AC1", "passed": True, "score": 0.92, "evidence": "looked at it"}
    ]
    assert evaluation.contract_id == a.monitoring_contract_id
    assert a.monitoring_task is None
    assert step_named(directive, "B").status == Step.Status.RUNNING


def test_a_yellow_evaluation_passes_the_step_under_full_autonomy(alice):
    _, a = evaluated(alice, verdict(0.6), autonomy_level="full_auto")

    assert a.status == Step.Status.PASSED
    assert a.confidence_level == "yellow"
    assert not ApprovalRequest.objects.exists()


def test_a_yellow_evaluation_asks_a_person_under_guided_autonomy(alice):
    directive, a = evaluated(alice, verdict(0.6), autonomy_level="guided")

    assert a.status == Step.Status.AWAITING_APPROVAL
    [approval] = ApprovalRequest.objects.filter(directive=directive)
    assert (approval.kind, approval.step_id, approval.status) == ("step_review", a.pk, "pending")
    assert approval.evaluation_id == a.last_evaluation_id
    assert step_named(directive, "B").status == Step.Status.PENDING


def test_approving_a_yellow_step_passes_it(alice):
    directive, a = evaluated(alice, verdict(0.6), autonomy_level="guided")

    approval_approve(approval=ApprovalRequest.objects.get(step=a), actor=Actor.for_user(alice))
    go(directive)

    assert reload(a).status == Step.Status.PASSED
    assert step_named(directive, "B").status == Step.Status.RUNNING


def test_denying_a_yellow_step_sends_it_back_with_the_reviewers_note(alice):
    directive, a = evaluated(alice, verdict(0.6), autonomy_level="guided")
    first = a.execution_task

    approval_deny(approval=ApprovalRequest.objects.get(step=a), actor=Actor.for_user(alice), note="Log the errors.")
    go(directive)

    a = reload(a)
    assert (a.status, a.rework_count, a.rework_instructions) == (Step.Status.RUNNING, 1, "Log the errors.")
    assert "Log the errors." in a.execution_task.plan
    assert a.execution_task.continue_from_task_id == first.pk


def test_an_evaluator_claiming_green_for_a_yellow_score_is_held_to_the_thresholds(alice):
    _, a = evaluated(alice, verdict(0.6, level="green"), autonomy_level="guided")

    assert a.confidence_level == "yellow"
    assert a.status == Step.Status.AWAITING_APPROVAL


def test_an_evaluator_that_says_red_is_believed_even_with_a_high_score(alice):
    _, a = evaluated(alice, verdict(0.9, level="red", passed=True))

    assert a.confidence_level == "red"
    assert a.status == Step.Status.RUNNING  # reworked and dispatched again
    assert a.rework_count == 1


def test_under_manual_autonomy_even_a_green_step_waits_for_approval(alice):
    directive, a = evaluated(alice, verdict(0.99), autonomy_level="manual")

    assert a.status == Step.Status.AWAITING_APPROVAL
    assert ApprovalRequest.objects.filter(step=a, status="pending").count() == 1

    approval_approve(approval=ApprovalRequest.objects.get(step=a), actor=Actor.for_user(alice))
    go(directive)
    assert reload(a).status == Step.Status.PASSED


def test_a_red_evaluation_with_rework_left_sends_the_step_back_with_instructions(alice):
    directive, a = evaluated(alice, verdict(0.3, passed=False, rework="Return 503 when the DB is down."))
    previous = Task.objects.filter(step=a, kind="execution").order_by("created_at").first()

    a = reload(a)
    assert a.rework_count == 1
    assert a.rework_instructions == "Return 503 when the DB is down."
    assert a.confidence_level == "red"
    # It went back to pending and was dispatched again at once.
    assert [e.data["to"] for e in events(directive, "step_pending")] == ["pending"]
    assert a.status == Step.Status.RUNNING
    task = a.execution_task
    assert task.pk != previous.pk
    assert "Return 503 when the DB is down." in task.plan
    assert "Rework requested (attempt 2)" in task.plan
    assert task.continue_from_task_id == previous.pk
    assert spawn_commands(task)[0].payload["task"]["continue_from"]["task_id"] == str(previous.pk)


def test_a_passing_evaluation_that_scores_red_is_reworked(alice):
    _, a = evaluated(alice, verdict(0.2, passed=True, level=""))

    assert (a.rework_count, a.status) == (1, Step.Status.RUNNING)


def test_a_failed_evaluation_with_a_green_score_is_reworked(alice):
    _, a = evaluated(alice, verdict(0.95, passed=False))

    assert (a.rework_count, a.status) == (1, Step.Status.RUNNING)


def test_a_red_evaluation_without_rework_left_fails_the_step_and_blocks_its_dependents(alice):
    directive, a = evaluated(alice, verdict(0.3, passed=False), max_rework_cycles=0)

    assert a.status == Step.Status.FAILED
    assert a.rework_count == 0
    assert step_named(directive, "B").status == Step.Status.BLOCKED
    assert reload(directive).status == Directive.Status.PAUSED


def test_rework_cycles_run_out_after_max_rework_cycles(alice):
    directive = directive_with(alice, max_rework_cycles=2)
    a = step_named(directive, "A")
    for expected in (1, 2):
        a = evaluate(run(a), verdict(0.1, passed=False))
        assert a.rework_count == expected
        assert a.status == Step.Status.RUNNING
    a = evaluate(run(a), verdict(0.1, passed=False))

    assert a.status == Step.Status.FAILED
    assert Task.objects.filter(step=a, kind="execution").count() == 3


@override_settings(MAKIMA_MAX_TASK_ATTEMPTS=1)
@pytest.mark.parametrize("status", [Task.Status.FAILED, Task.Status.INTERRUPTED])
def test_a_monitoring_task_that_fails_is_fail_open(alice, status):
    directive = directive_with(alice)
    a = evaluate(run(step_named(directive, "A")), None, status=status)

    assert a.status == Step.Status.PASSED
    [warning] = events(directive, "monitoring_failed_open")
    assert warning.severity == DirectiveEvent.Severity.WARN
    assert "'A'" in warning.message


def test_a_failed_evaluator_does_not_pass_a_step_whose_verifiers_failed(alice):
    directive = directive_with(alice, evaluation_mode="both")
    a = evaluate(run(step_named(directive, "A"), verifier_results=ONE_FAILING), None, status=Task.Status.FAILED)

    assert len(events(directive, "monitoring_failed_open")) == 1
    assert a.last_evaluation.kind == Evaluation.Kind.VERIFIERS
    assert (a.rework_count, a.status) == (1, Step.Status.RUNNING)


def test_an_interrupted_monitoring_task_is_retried_before_anything_is_decided(alice):
    directive = directive_with(alice)
    a = run(step_named(directive, "A"))
    monitor = a.monitoring_task

    a = evaluate(a, None, status=Task.Status.INTERRUPTED)

    assert a.status == Step.Status.EVALUATING
    assert a.monitoring_task_id == monitor.pk
    assert (reload(monitor).status, reload(monitor).attempt) == (Task.Status.STARTING, 2)
    assert events(directive, "monitoring_failed_open") == []


def test_a_cancelled_monitoring_task_is_replaced_by_a_new_one(alice):
    directive = directive_with(alice)
    a = run(step_named(directive, "A"))
    first = a.monitoring_task

    a = evaluate(a, None, status=Task.Status.CANCELLED)

    assert a.status == Step.Status.EVALUATING
    assert a.monitoring_task_id not in (None, first.pk)


@pytest.mark.parametrize("content", [None, "I think it is fine.", '{"passed": "sure"}'])
def test_an_unreadable_evaluation_result_is_fail_open(alice, content):
    directive = directive_with(alice)
    a = evaluate(run(step_named(directive, "A")), content)

    assert a.status == Step.Status.PASSED
    [warning] = events(directive, "monitoring_parse_failed_open")
    assert warning.severity == DirectiveEvent.Severity.WARN


def test_with_fail_closed_a_failed_evaluator_means_rework(alice):
    directive = directive_with(alice, fail_closed=True)
    a = evaluate(run(step_named(directive, "A")), None, status=Task.Status.FAILED)

    assert a.rework_count == 1
    assert a.status == Step.Status.RUNNING
    assert len(events(directive, "monitoring_failed_closed")) == 1
    assert a.last_evaluation.passed is False


def test_with_fail_closed_an_unreadable_result_means_rework(alice):
    directive = directive_with(alice, fail_closed=True)
    a = evaluate(run(step_named(directive, "A")), "no json here")

    assert a.rework_count == 1
    assert len(events(directive, "monitoring_parse_failed_closed")) == 1


def test_an_evaluation_result_in_snake_case_is_understood(alice):
    result = {
        "passed": True,
        "overall_score": 0.9,
        "confidence_level": "green",
        "criteria_results": [{"criterion": "AC1", "passed": True, "score": 0.9, "evidence": "e"}],
        "summary_feedback": "Fine.",
        "rework_instructions": "",
    }
    _, a = evaluated(alice, result)

    assert a.status == Step.Status.PASSED
    assert a.last_evaluation.summary_feedback == "Fine."


def test_an_evaluation_result_in_a_files_body_is_understood(alice):
    directive = directive_with(alice)
    a = run(step_named(directive, "A"))
    monitor = a.monitoring_task
    write_file(monitor.contract, "evaluation-result", "", body=[{"type": "code", "content": json.dumps(verdict(0.9))}])
    supervisor_complete(monitor)
    finish(monitor)

    assert reload(a).status == Step.Status.PASSED


# --------------------------------------------------------------------------- verifiers and composite


def test_in_verifiers_mode_the_score_is_the_pass_ratio_of_the_reported_verifiers(alice):
    directive = directive_with(alice, evaluation_mode="verifiers")
    a = run(step_named(directive, "A"), verifier_results=ONE_FAILING)

    evaluation = a.last_evaluation
    assert (evaluation.kind, evaluation.passed, evaluation.overall_score) == ("verifiers", False, 0.5)
    assert evaluation.confidence_level == "red"
    assert evaluation.verifier_results == ONE_FAILING
    assert a.monitoring_task is None
    assert not Task.objects.filter(directive=directive, kind="monitoring").exists()
    assert a.rework_count == 1
    assert "ruff check" in a.rework_instructions
    assert "E501 line too long" in a.rework_instructions


def test_in_verifiers_mode_passing_verifiers_pass_the_step(alice):
    directive = directive_with(alice, evaluation_mode="verifiers")
    a = run(step_named(directive, "A"), verifier_results=PASSING)

    assert a.status == Step.Status.PASSED
    assert (a.confidence_score, a.confidence_level) == (1.0, "green")


def test_composite_evaluation_is_the_weighted_mean_of_agent_and_verifier_scores(alice):
    directive = directive_with(alice, evaluation_mode="both")
    a = run(step_named(directive, "A"), verifier_results=PASSING)
    assert "pytest" in a.monitoring_task.plan  # the evaluator sees the verifier results

    a = evaluate(a, verdict(0.7))

    evaluation = a.last_evaluation
    assert evaluation.kind == Evaluation.Kind.COMPOSITE
    assert evaluation.overall_score == pytest.approx(0.85)
    assert (evaluation.confidence_level, evaluation.passed) == ("green", True)
    assert a.status == Step.Status.PASSED


@override_settings(MAKIMA_COMPOSITE_AGENT_WEIGHT=0.75)
def test_composite_weights_are_configurable(alice):
    directive = directive_with(alice, evaluation_mode="both")
    a = evaluate(run(step_named(directive, "A"), verifier_results=ONE_FAILING), verdict(1.0))

    assert a.last_evaluation.overall_score == pytest.approx(0.875)


def test_composite_evaluation_fails_when_a_verifier_fails_whatever_the_score(alice):
    directive = directive_with(alice, evaluation_mode="both")
    a = evaluate(run(step_named(directive, "A"), verifier_results=ONE_FAILING), verdict(1.0))

    evaluation = a.last_evaluation
    assert (evaluation.passed, evaluation.confidence_level) == (False, "red")
    assert a.rework_count == 1


def test_composite_yellow_needs_approval_under_guided_autonomy(alice):
    directive = directive_with(alice, evaluation_mode="both", autonomy_level="guided")
    a = evaluate(run(step_named(directive, "A"), verifier_results=PASSING), verdict(0.2, level="red"))

    assert a.last_evaluation.overall_score == pytest.approx(0.6)
    assert a.status == Step.Status.AWAITING_APPROVAL


def test_with_evaluation_off_a_finished_step_passes(alice):
    directive = directive_with(alice, evaluation_mode="off")
    a = run(step_named(directive, "A"))

    assert a.status == Step.Status.PASSED
    assert not Task.objects.filter(directive=directive, kind="monitoring").exists()
    assert not Evaluation.objects.exists()
    assert step_named(directive, "B").status == Step.Status.RUNNING


def test_a_step_that_ends_without_supervisor_complete_is_evaluated_and_noted(alice):
    directive = directive_with(alice)
    a = step_named(directive, "A")
    finish(a.execution_task)

    assert reload(a).status == Step.Status.EVALUATING
    [noted] = events(directive, "supervisor_complete_missing")
    assert "'A'" in noted.message


def test_a_manual_evaluation_of_a_passed_step_dispatches_a_monitoring_task(alice):
    directive, a = evaluated(alice, verdict(0.95))
    assert a.status == Step.Status.PASSED

    step_request_evaluation(step=a, actor=Actor.for_user(alice))
    go(directive)

    a = reload(a)
    assert a.status == Step.Status.EVALUATING
    monitor = a.monitoring_task
    assert monitor.kind == "monitoring"
    assert monitor.status == Task.Status.STARTING
    assert Task.objects.filter(step=a, kind="monitoring").count() == 2
    go(directive)
    assert Task.objects.filter(step=a, kind="monitoring").count() == 2  # once

    a = evaluate(a, verdict(0.3, passed=False))
    assert a.rework_count == 1
    kinds = list(Evaluation.objects.filter(step=a).order_by("created_at").values_list("kind", flat=True))
    assert kinds == [Evaluation.Kind.AGENT, Evaluation.Kind.MANUAL]
