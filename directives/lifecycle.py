"""The directive lifecycle (spec section 4): planning, readiness and dispatch,
evaluation, rework, approvals, completion, re-planning, orders and breakers.

Everything here is derived from the database state and is idempotent: a
finished task's consequences are claimed by compare-and-set (a step leaves
``running``, a directive's ``orchestrator_task`` is cleared, …), so the event
handler that receives a report and the tick that re-runs every phase as a
safety net can race without doing anything twice.

Entry points:
- :func:`on_task_finished` — a daemon reported a task's end (event-driven);
- :func:`advance` — bring directives forward (after any user action and from the tick);
- :func:`tick` — the periodic safety net (``orchestrator_tick``, django-q2 schedule).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Max, OuterRef, Q, Subquery, Sum
from django.template import Context, Engine
from django.utils import timezone

from contracts.models import Contract, ContractFile, Task, TaskOutput
from contracts.services import (
    branch_name,
    contract_create,
    contract_transition,
    task_cancel,
    task_create,
    task_dispatch_pending,
    task_transition,
)
from directives.models import ApprovalRequest, Chain, Directive, DirectiveEvent, Evaluation, Order, Step, StepDependency
from directives.plans import PlanError, file_text, parse_evaluation, parse_plan
from directives.services import (
    advance_after_commit,
    approval_request,
    approval_transition,
    chain_create,
    chain_transition,
    confidence_level_for,
    directive_record_pr,
    directive_transition,
    evaluation_record,
    event_record,
    order_transition,
    plan_review_refused,
    step_rework,
    step_transition,
    steps_add,
)
from makima.logs import log_context
from makima.state import SYSTEM, InvalidTransition

logger = logging.getLogger(__name__)

PROMPTS = Engine(dirs=[str(settings.BASE_DIR / "directives" / "prompts")], autoescape=False)
GITHUB_PR = re.compile(r"https://github\.com/[\w.-]+/[\w.-]+/pull/\d+")
VERIFIER_COMMANDS_AUTO = "auto"
LIVE_TASK = (Task.Status.PENDING, *Task.ON_DAEMON)


def render_prompt(name: str, **context: Any) -> str:
    return PROMPTS.get_template(f"{name}.txt").render(Context(context)).strip() + "\n"


def _warn(
    directive_id: Any, event_type: str, message: str, *, step_id: Any = None, severity: str = "warn", **data: Any
):
    return event_record(
        directive_id=directive_id,
        step_id=step_id,
        subject_type="directive",
        subject_id=directive_id,
        event_type=event_type,
        severity=severity,
        message=message,
        data=data,
    )


def is_github(url: str) -> bool:
    return bool(re.match(r"^(https://github\.com/|git@github\.com:|ssh://git@github\.com/)", url or ""))


def directive_branch(directive: Directive) -> str:
    if directive.pr_branch:
        return directive.pr_branch
    slug_source = f"directive-{directive.title}"
    return branch_name(slug_source, directive.pk)


def _repositories(directive: Directive) -> list[dict[str, Any]]:
    return [
        {
            "name": (directive.repository_url or directive.local_path).rstrip("/").rsplit("/", 1)[-1] or "repository",
            "url": directive.repository_url,
            "local_path": directive.local_path,
            "is_primary": True,
        }
    ]


def _directive_contract(
    directive: Directive, *, contract_type: str, name: str, step: Step | None = None, **fields: Any
) -> Contract:
    """A contract of the directive's work, on the directive's repository."""
    return contract_create(
        owner=directive.owner,
        name=name[:200],
        contract_type=contract_type,
        directive=directive,
        step=step,
        repositories=_repositories(directive),
        **fields,
    )


def _supervised_task(
    directive: Directive,
    *,
    kind: str,
    name: str,
    plan: str,
    contract: Contract | None,
    step: Step | None = None,
    agent: str = "",
    **fields: Any,
) -> Task:
    """A supervisor task of the directive, run on its repository by its agent."""
    return task_create(
        owner=directive.owner,
        name=name[:200],
        kind=kind,
        agent=agent or directive.agent,
        plan=plan,
        directive=directive,
        step=step,
        contract=contract,
        is_supervisor=True,
        repository_url=directive.repository_url,
        local_path=directive.local_path,
        **fields,
    )


# --------------------------------------------------------------------------- breakers


def breaker_tripped(directive: Directive, *, now: Any = None) -> str | None:
    """The name of the circuit breaker that stops this directive, if any."""
    now = now or timezone.now()
    if directive.max_total_cost_usd is not None and directive.total_cost_usd >= directive.max_total_cost_usd:
        return "max_total_cost_usd"
    if (
        directive.max_wall_time_minutes is not None
        and directive.started_at is not None
        and now - directive.started_at >= timedelta(minutes=directive.max_wall_time_minutes)
    ):
        return "max_wall_time_minutes"
    if (
        directive.max_chain_regenerations is not None
        and directive.chain_generation_count > directive.max_chain_regenerations
    ):
        return "max_chain_regenerations"
    return None


def _trip(directive: Directive, breaker: str) -> None:
    limits = {
        "max_total_cost_usd": f"cost ${directive.total_cost_usd} reached the limit ${directive.max_total_cost_usd}",
        "max_wall_time_minutes": f"wall time reached the limit of {directive.max_wall_time_minutes} minutes",
        "max_chain_regenerations": f"{directive.chain_generation_count} chain regenerations exceed the limit of {directive.max_chain_regenerations}",
    }
    with contextlib.suppress(InvalidTransition):
        directive_transition(
            directive=directive,
            to=Directive.Status.PAUSED,
            severity=DirectiveEvent.Severity.ERROR,
            message=f"Circuit breaker {breaker}: {limits[breaker]}.",
            data={"breaker": breaker},
        )


# --------------------------------------------------------------------------- planning


def planning_dispatch(*, directive: Directive) -> Task | None:
    """Start a planning task for a directive in ``planning`` that has none.

    Claims the directive by setting ``orchestrator_task`` with a
    compare-and-set, so concurrent callers create one task at most.
    """
    with transaction.atomic():
        directive = Directive.objects.select_for_update().get(pk=directive.pk)
        if directive.status != Directive.Status.PLANNING or directive.orchestrator_task_id is not None:
            return None
        if ApprovalRequest.objects.filter(
            directive=directive, kind=ApprovalRequest.Kind.PLAN_REVIEW, status=ApprovalRequest.Status.PENDING
        ).exists():
            return None  # a plan waits for review
        # Older planning tasks are superseded by this one.
        task_cancel(
            tasks=Task.objects.filter(directive=directive, kind=Task.Kind.PLANNING, status__in=LIVE_TASK),
            reason="superseded by a newer planning task",
        )
        reason = directive.planning_reason or Directive.PlanningReason.INITIAL
        generation = (Chain.objects.filter(directive=directive).aggregate(g=Max("generation"))["g"] or 0) + 1
        context: dict[str, Any] = {"directive": directive, "generation": generation, "note": directive.planning_note}
        if reason == Directive.PlanningReason.ORDER_PICKUP:
            orders = sorted(
                Order.objects.filter(directive=directive, status=Order.Status.LINKED),
                key=lambda o: (Order.PRIORITY_RANK.get(o.priority, 9), o.created_at),
            )
            template = "order_pickup"
            context["orders"] = orders
            context["steps"] = list(Step.objects.filter(directive=directive).exclude(chain__status="superseded"))
        elif reason in (Directive.PlanningReason.REPLAN, Directive.PlanningReason.REGENERATE) or (
            # A denied revision still has the work it kept; a denied first plan has nothing.
            reason == Directive.PlanningReason.PLAN_DENIED
            and Step.objects.filter(chain_id=directive.current_chain_id).exclude(status=Step.Status.SKIPPED).exists()
        ):
            template = "replanning"
            # The previous goal is news only when it changed since the last plan was made.
            history = directive.goal_history.order_by("-replaced_at").first()
            last_chain = Chain.objects.filter(directive=directive).order_by("-generation").first()
            if history and (last_chain is None or history.replaced_at >= last_chain.created_at):
                context["previous_goal"] = history.previous_goal
            context["step_groups"] = _step_groups(directive)
        else:
            template = "planning"
        plan = render_prompt(template, **context)
        if directive.planning_note:
            plan += f"\n## Reviewer's note on the previous plan\n{directive.planning_note}\n"
        contract = _directive_contract(
            directive,
            contract_type=Contract.ContractType.PLANNING,
            name=f"Plan: {directive.title}",
            phase=reason,
            is_directive_orchestrator=True,
        )
        task = _supervised_task(
            directive,
            kind=Task.Kind.PLANNING,
            name=f"Plan {directive.title}",
            plan=plan,
            contract=contract,
            base_branch=directive.pr_branch or directive.base_branch,
            completion_action=Task.CompletionAction.NONE,
            priority=10,
        )
        Directive.objects.filter(pk=directive.pk).update(orchestrator_task=task, updated_at=timezone.now())
        _warn(
            directive.pk,
            "planning_dispatched",
            f"A {template.replace('_', ' ')} task was created.",
            severity="info",
            reason=reason,
        )
    return task


def _step_groups(directive: Directive) -> list[dict[str, Any]]:
    labels = [
        ("Completed", {Step.Status.PASSED}),
        ("Running", {Step.Status.RUNNING, Step.Status.EVALUATING, Step.Status.AWAITING_APPROVAL}),
        ("Pending", {Step.Status.PENDING, Step.Status.READY, Step.Status.BLOCKED}),
        ("Failed", {Step.Status.FAILED}),
        ("Skipped", {Step.Status.SKIPPED}),
    ]
    steps = list(Step.objects.filter(directive=directive).exclude(chain__status=Chain.Status.SUPERSEDED))
    return [{"label": label, "steps": [s for s in steps if s.status in statuses]} for label, statuses in labels]


def planning_task_finished(*, task: Task) -> None:
    """Accept (or refuse) the plan a finished planning task produced."""
    with transaction.atomic():
        directive = Directive.objects.select_for_update().filter(pk=task.directive_id).first()
        if directive is None or directive.orchestrator_task_id != task.pk:
            return  # already handled, or superseded by a newer planning task
        if directive.status == Directive.Status.PAUSED:
            # Left claimed: resuming sends the directive back to planning, where
            # the tick's recovery phase takes this plan up.
            return
        claimed = Directive.objects.filter(pk=task.directive_id, orchestrator_task=task).update(
            orchestrator_task=None, updated_at=timezone.now()
        )
        if claimed != 1:
            return
        directive.orchestrator_task = None
        if task.status == Task.Status.CANCELLED or directive.status != Directive.Status.PLANNING:
            return
        if task.status != Task.Status.DONE:
            _pause(
                directive,
                f"The planning task {task.status}: {task.error or 'no error given'}",
                event_type="planning_failed",
            )
            return
        _note_missing_statement(task, "The planning task")
        generation = (Chain.objects.filter(directive=directive).aggregate(g=Max("generation"))["g"] or 0) + 1
        new_steps = Step.objects.filter(directive=directive, chain__isnull=True, generation=generation)
        if not new_steps.exists():
            plan_file = (
                ContractFile.objects.filter(contract_id=task.contract_id, name="chain-plan")
                .order_by("-created_at")
                .first()
            )
            revising = directive.planning_reason in (
                Directive.PlanningReason.REPLAN,
                Directive.PlanningReason.ORDER_PICKUP,
            )
            if plan_file is None and not revising:
                _pause(
                    directive, "The planner submitted no steps and no `chain-plan` file.", event_type="plan_rejected"
                )
                return
            if plan_file is not None:
                try:
                    specs = parse_plan(file_text(plan_file.content, plan_file.body))
                    steps_add(directive=directive, specs=specs, actor=SYSTEM)
                except PlanError as exc:
                    _pause(directive, f"The plan was rejected: {exc}.", event_type="plan_rejected")
                    return
                except ValidationError as exc:
                    messages = "; ".join(m for ms in exc.message_dict.values() for m in ms)
                    _pause(directive, f"The plan was rejected: {messages}.", event_type="plan_rejected")
                    return
        _accept_plan(directive, generation=generation, task=task)


def _accept_plan(directive: Directive, *, generation: int, task: Task) -> None:
    previous = Chain.objects.filter(pk=directive.current_chain_id).first()
    new_steps = list(Step.objects.filter(directive=directive, chain__isnull=True, generation=generation))
    kept: list[Step] = []
    if previous is not None and directive.planning_reason != Directive.PlanningReason.REGENERATE:
        kept = list(previous.steps.exclude(status=Step.Status.SKIPPED))
    if not new_steps and not kept:
        _pause(directive, "The plan was rejected: it has no steps.", event_type="plan_rejected")
        return
    chain = chain_create(directive=directive, name=f"{directive.title[:170]} — generation {generation}", actor=SYSTEM)
    Step.objects.filter(pk__in=[s.pk for s in new_steps]).update(chain=chain)
    if kept:
        Step.objects.filter(pk__in=[s.pk for s in kept]).update(chain=chain)
    if previous is not None and previous.status != Chain.Status.SUPERSEDED:
        chain_transition(chain=previous, to=Chain.Status.SUPERSEDED)
    if directive.planning_reason == Directive.PlanningReason.ORDER_PICKUP:
        _orders_picked(directive, new_steps)
    _warn(
        directive.pk,
        "plan_accepted",
        f"Generation {chain.generation}: {len(new_steps)} new step(s), {len(kept)} kept.",
        severity="info",
        chain=str(chain.pk),
    )
    Directive.objects.filter(pk=directive.pk).update(planning_note="")
    if directive.require_plan_approval:
        approval_request(
            directive=directive,
            kind=ApprovalRequest.Kind.PLAN_REVIEW,
            description=f"Review the plan for '{directive.title}' (generation {chain.generation}).",
            context={"chain": str(chain.pk), "steps": [s.name for s in new_steps]},
        )
        return
    directive_transition(directive=directive, to=Directive.Status.ACTIVE, data={"chain": str(chain.pk)})


def _orders_picked(directive: Directive, new_steps: list[Step]) -> None:
    linked = list(Order.objects.filter(directive=directive, status=Order.Status.LINKED))
    text = "\n".join(f"{s.name}\n{s.description}\n{s.task_plan}" for s in new_steps)
    picked = [o for o in linked if str(o.pk) in text] or (linked if new_steps else [])
    for order in picked:
        order_transition(order=order, to=Order.Status.IN_PROGRESS)


def _note_missing_statement(task: Task, what: str) -> None:
    """A task that ends ``done`` without ``makima supervisor complete`` still
    counts as done; the event log notes the missing statement."""
    if task.status == Task.Status.DONE and task.supervisor_completed_at is None:
        _warn(
            task.directive_id,
            "supervisor_complete_missing",
            f"{what} ended without `makima supervisor complete`.",
            step_id=task.step_id,
            task=str(task.pk),
        )


def _pause(directive: Directive, message: str, *, event_type: str, step_id: Any = None) -> None:
    _warn(directive.pk, event_type, message, severity="error", step_id=step_id)
    with contextlib.suppress(InvalidTransition):
        directive_transition(directive=directive, to=Directive.Status.PAUSED, message=message, severity="error")


# --------------------------------------------------------------------------- readiness and execution


def _last_passed(directive: Directive) -> Step | None:
    return (
        Step.objects.filter(directive=directive, status=Step.Status.PASSED, execution_task__isnull=False)
        .order_by("-finished_at")
        .first()
    )


def _execution_task_for(step: Step, directive: Directive, *, deps: list[Step]) -> Task:
    previous = Task.objects.filter(pk=step.execution_task_id).first() if step.execution_task_id else None
    continue_from: Task | None = None
    merge: list[str] = []
    base = directive.base_branch
    # A skipped dependency produced no work: continue from the first one that did.
    worked = [d for d in deps if d.execution_task_id]
    if previous is not None:
        continue_from = previous  # rework continues from the previous attempt
    elif worked:
        by_id = {t.pk: t for t in Task.objects.filter(pk__in=[d.execution_task_id for d in worked])}
        continue_from = by_id.get(worked[0].execution_task_id)
        merge = [by_id[d.execution_task_id].branch for d in worked[1:] if d.execution_task_id in by_id]
    elif deps:
        pass  # every dependency was skipped: start from the base branch
    elif directive.pr_branch:
        base = directive.pr_branch
    elif (last_passed := _last_passed(directive)) is not None:
        continue_from = Task.objects.filter(pk=last_passed.execution_task_id).first()
    contract = Contract.objects.filter(pk=step.execution_contract_id).first() if step.execution_contract_id else None
    if contract is None:
        contract = _directive_contract(
            directive, contract_type=Contract.ContractType.EXECUTION, name=f"Step: {step.name}", step=step
        )
    elif contract.status != Contract.Status.ACTIVE:
        contract_transition(contract=contract, to=Contract.Status.ACTIVE)
    verifiers: Any = []
    if directive.evaluation_mode in (Directive.EvaluationMode.VERIFIERS, Directive.EvaluationMode.BOTH):
        # The step's commands, else the directive's, else whatever the daemon detects.
        verifiers = step.verifiers or directive.verifiers or VERIFIER_COMMANDS_AUTO
    again = f"rework {step.rework_count}" if step.rework_count else "retry"  # retry: a user retried a failed step
    name = step.name if not previous else f"{step.name} ({again})"
    # The prompt names the branch, and the branch carries the task id's hex: choose the id first.
    task_id = uuid.uuid4()
    branch = branch_name(name, task_id)
    plan = render_prompt(
        "execution",
        directive=directive,
        step=step,
        task={"branch": branch},
        merge_branches=merge,
    )
    task = _supervised_task(
        directive,
        kind=Task.Kind.EXECUTION,
        name=name,
        plan=plan,
        contract=contract,
        step=step,
        agent=step.agent,
        base_branch=base,
        branch=branch,
        continue_from_task=continue_from,
        merge_branches=merge,
        completion_action=Task.CompletionAction.BRANCH,
        verifiers=verifiers,
        task_id=task_id,
    )
    Step.objects.filter(pk=step.pk).update(execution_task=task, execution_contract=contract)
    return task


class StepRow:
    """What readiness and settling need of a step: a tick scans every step of
    every active directive, and full model instances would dominate its time."""

    FIELDS = (
        "id",
        "directive_id",
        "chain_id",
        "name",
        "status",
        "order_index",
        "execution_task_id",
        "monitoring_task_id",
    )
    ATTRIBUTES = (
        "pk",
        "directive_id",
        "chain_id",
        "name",
        "status",
        "order_index",
        "execution_task_id",
        "monitoring_task_id",
    )
    __slots__ = ATTRIBUTES

    def __init__(self, *values: Any) -> None:
        for name, value in zip(self.ATTRIBUTES, values, strict=True):
            setattr(self, name, value)


def _full(row: StepRow) -> Step:
    step = Step.objects.get(pk=row.pk)
    row.status = step.status
    return step


def _advance_steps(directive: Directive, steps: list[StepRow], deps_of: dict[Any, list[Any]]) -> None:
    """Readiness: unblock, block and start the steps of one active directive."""
    by_id = {s.pk: s for s in steps}
    done = Step.DONE
    for step in steps:
        if step.status not in (Step.Status.PENDING, Step.Status.READY):
            continue
        deps = [by_id[d] for d in deps_of.get(step.pk, []) if d in by_id]
        missing = [d for d in deps_of.get(step.pk, []) if d not in by_id]
        if missing:
            # Dependencies outside the current chain (kept from an older generation) are looked up directly.
            deps += list(Step.objects.filter(pk__in=missing))
            deps.sort(key=lambda d: deps_of[step.pk].index(d.pk))
        if any(d.status in (Step.Status.FAILED, Step.Status.BLOCKED) for d in deps):
            full = _full(step)
            if full.status in (Step.Status.PENDING, Step.Status.READY):
                step_transition(step=full, to=Step.Status.BLOCKED, data={"reason": "a dependency failed"})
                step.status = full.status
            continue
        if not all(d.status in done for d in deps):
            continue
        if any(o.order_index < step.order_index and o.status not in done for o in steps):
            continue
        live = step.execution_task_id and Task.objects.filter(pk=step.execution_task_id, status__in=LIVE_TASK).exists()
        if live:
            continue
        with transaction.atomic():
            row = step
            if row.status == Step.Status.PENDING:
                # The compare-and-set pending → ready is the claim: one caller creates the task.
                step = _full(row)
                if not step_transition(step=step, to=Step.Status.READY, expected=Step.Status.PENDING):
                    row.status = step.status
                    continue
            else:
                step = (
                    Step.objects.select_for_update()
                    .filter(pk=row.pk, status=Step.Status.READY, execution_task_id=row.execution_task_id)
                    .first()
                )
                if step is None:
                    continue
            row.status = step.status
            task = _execution_task_for(step, directive, deps=deps)
            row.execution_task_id = task.pk


def _stuck(steps: list[StepRow], deps_of: dict[Any, list[Any]]) -> set[Any]:
    """Steps that cannot move until a user acts: failed and blocked ones, and
    pending ones waiting (directly or not) on those, through a dependency or a
    lower ``order_index``."""
    stuck = {s.pk for s in steps if s.status in (Step.Status.FAILED, Step.Status.BLOCKED)}
    pending = [s for s in steps if s.status == Step.Status.PENDING]
    changed = True
    while changed:
        changed = False
        lowest_stuck = min((s.order_index for s in steps if s.pk in stuck), default=None)
        for step in pending:
            if step.pk in stuck:
                continue
            behind = lowest_stuck is not None and lowest_stuck < step.order_index
            if behind or any(d in stuck for d in deps_of.get(step.pk, [])):
                stuck.add(step.pk)
                changed = True
    return stuck


def _settle(directive: Directive, steps: list[StepRow], deps_of: dict[Any, list[Any]]) -> None:
    """Completion, or a pause when a failed step leaves nothing to do."""
    if not steps:
        return
    statuses = {s.status for s in steps}
    if statuses <= Step.DONE:
        completion_dispatch(directive=directive)
        return
    if Step.Status.FAILED not in statuses:
        return
    stuck = _stuck(steps, deps_of)
    if all(s.pk in stuck or s.status in Step.DONE for s in steps):
        failed = [s.name for s in steps if s.status == Step.Status.FAILED]
        _pause(
            directive,
            "Step " + ", ".join(f"'{n}'" for n in failed) + " failed and nothing else can progress: "
            "retry or skip it, re-plan, or stop the directive.",
            event_type="directive_stalled",
        )


# --------------------------------------------------------------------------- evaluation


def execution_task_finished(*, task: Task) -> None:
    step = Step.objects.select_related("directive").filter(pk=task.step_id).first()
    if step is None or step.execution_task_id != task.pk:
        return
    directive = step.directive
    if task.status == Task.Status.INTERRUPTED:
        # Retries (MAKIMA_MAX_TASK_ATTEMPTS) happened before this handler: none are left.
        _step_failed(step, f"The task was interrupted {task.attempt} times: {task.error or 'no error given'}.")
        return
    if task.status == Task.Status.FAILED:
        _step_failed(step, f"The task failed: {task.error or f'exit code {task.exit_code}'}")
        return
    if task.status != Task.Status.DONE:
        return
    mode = directive.evaluation_mode
    with transaction.atomic():
        try:
            claimed = step_transition(step=step, to=Step.Status.EVALUATING, expected=Step.Status.RUNNING)
        except InvalidTransition:
            claimed = False  # the step moved on (skipped, evaluated) meanwhile
        if not claimed:
            return  # already claimed
        _note_missing_statement(task, f"Step '{step.name}'")
        if mode == Directive.EvaluationMode.OFF:
            step_transition(step=step, to=Step.Status.PASSED, data={"reason": "evaluation off"})
            return
        if mode == Directive.EvaluationMode.VERIFIERS:
            evaluation = _verifier_evaluation(step, task)
            route_evaluation(step=step, evaluation=evaluation)
            return
        monitoring_dispatch(step=step, task=task)


def _verifier_score(results: list[dict[str, Any]]) -> tuple[bool, float]:
    if not results:
        return True, 1.0
    passed = sum(1 for r in results if r.get("passed"))
    return passed == len(results), passed / len(results)


def _verifier_evaluation(step: Step, task: Task) -> Evaluation:
    results = task.verifier_results or []
    passed, score = _verifier_score(results)
    failing = [r for r in results if not r.get("passed")]
    rework = "\n\n".join(
        f"The verifier `{r.get('command', r.get('name'))}` failed (exit {r.get('exit_code')}):\n{r.get('output_tail', '')}"
        for r in failing
    )
    if not results:
        _warn(step.directive_id, "no_verifiers", f"No verifier ran for step '{step.name}'.", step_id=step.pk)
    return evaluation_record(
        step=step,
        kind=Evaluation.Kind.VERIFIERS,
        passed=passed,
        overall_score=score,
        confidence_level="" if passed else Step.Confidence.RED,
        verifier_results=results,
        summary_feedback=f"{sum(1 for r in results if r.get('passed'))} of {len(results)} verifiers passed.",
        rework_instructions=rework,
    )


MANUAL_EVALUATION = "manual"  # the phase of an evaluator's contract when a user asked for it


def monitoring_dispatch(*, step: Step, task: Task | None = None, manual: bool = False) -> Task:
    """Start an evaluator for a step: automatically after its execution, or
    because a user asked (``manual``; its evaluation is recorded as such)."""
    directive = step.directive
    execution = task or Task.objects.filter(pk=step.execution_task_id).first()
    contract = _directive_contract(
        directive,
        contract_type=Contract.ContractType.MONITORING,
        name=f"Evaluate: {step.name}",
        step=step,
        phase=MANUAL_EVALUATION if manual else "",
    )
    plan = render_prompt(
        "monitoring",
        directive=directive,
        step=step,
        step_contract_id=step.execution_contract_id or "",
        execution_branch=execution.branch if execution else "",
        commit_sha=execution.commit_sha if execution else "",
        verifier_results=(execution.verifier_results if execution else []) or [],
    )
    monitoring = _supervised_task(
        directive,
        kind=Task.Kind.MONITORING,
        name=f"Evaluate {step.name}",
        plan=plan,
        contract=contract,
        step=step,
        agent=step.agent,
        base_branch=directive.base_branch,
        continue_from_task=execution,
        completion_action=Task.CompletionAction.NONE,
        priority=5,
    )
    Step.objects.filter(pk=step.pk).update(monitoring_task=monitoring, monitoring_contract=contract)
    step.monitoring_task, step.monitoring_contract = monitoring, contract
    return monitoring


def monitoring_task_finished(*, task: Task) -> None:
    with transaction.atomic():
        claimed = Step.objects.filter(pk=task.step_id, monitoring_task=task, status=Step.Status.EVALUATING).update(
            monitoring_task=None
        )
        if claimed != 1:
            return
        step = Step.objects.select_related("directive").get(pk=task.step_id)
        directive = step.directive
        if task.status == Task.Status.CANCELLED:
            return  # the monitoring phase starts another evaluator
        _note_missing_statement(task, f"The evaluation of '{step.name}'")
        execution = Task.objects.filter(pk=step.execution_task_id).first()
        verifier_results = (execution.verifier_results if execution else []) or []
        result = None
        failure = ""
        if task.status != Task.Status.DONE:
            failure = "failed"
        else:
            result_file = (
                ContractFile.objects.filter(contract_id=task.contract_id, name="evaluation-result")
                .order_by("-created_at")
                .first()
            )
            try:
                if result_file is None:
                    raise PlanError("no `evaluation-result` file was written")
                result = parse_evaluation(file_text(result_file.content, result_file.body))
            except PlanError as exc:
                failure = f"parse: {exc}"
        if result is None:
            event_type = "monitoring_failed" if failure == "failed" else "monitoring_parse_failed"
            reason = (
                f"the evaluator task {task.status}"
                if failure == "failed"
                else f"its result could not be read ({failure[7:]})"
            )
            if directive.fail_closed:
                _warn(
                    directive.pk,
                    f"{event_type}_closed",
                    f"Evaluation of '{step.name}' failed closed: {reason}.",
                    step_id=step.pk,
                )
                evaluation = evaluation_record(
                    step=step,
                    kind=Evaluation.Kind.AGENT,
                    passed=False,
                    overall_score=0.0,
                    confidence_level=Step.Confidence.RED,
                    verifier_results=verifier_results,
                    summary_feedback=f"The evaluation could not be completed: {reason}.",
                    rework_instructions="The previous evaluation could not be completed; make sure the work meets every acceptance criterion.",
                )
                route_evaluation(step=step, evaluation=evaluation)
                return
            _warn(
                directive.pk,
                f"{event_type}_open",
                f"Evaluation of '{step.name}' failed open: {reason}.",
                step_id=step.pk,
            )
            v_passed, _ = _verifier_score(verifier_results)
            if directive.evaluation_mode == Directive.EvaluationMode.BOTH and not v_passed:
                route_evaluation(step=step, evaluation=_verifier_evaluation(step, execution))
                return
            step_transition(step=step, to=Step.Status.PASSED, data={"reason": "fail-open"})
            return
        kind = Evaluation.Kind.AGENT
        score, passed, v_passed = result.overall_score, result.passed, True
        if directive.evaluation_mode == Directive.EvaluationMode.BOTH and execution is not None:
            v_passed, v_score = _verifier_score(verifier_results)
            weight = settings.MAKIMA_COMPOSITE_AGENT_WEIGHT
            weight = min(max(weight, 0.0), 1.0)
            score = weight * result.overall_score + (1 - weight) * v_score
            passed = passed and v_passed
            kind = Evaluation.Kind.COMPOSITE
        score = round(score, 4)
        # The thresholds define the level. An evaluator that states a worse level
        # for its own score is believed; a composite score is judged on its own.
        level = confidence_level_for(score=score, directive=directive)
        if kind == Evaluation.Kind.AGENT:
            level = _worse(level, result.confidence_level)
        if not v_passed:
            level = Step.Confidence.RED  # failing verifiers are never marginal
        if Contract.objects.filter(pk=task.contract_id, phase=MANUAL_EVALUATION).exists():
            kind = Evaluation.Kind.MANUAL
        evaluation = evaluation_record(
            step=step,
            kind=kind,
            passed=passed,
            overall_score=score,
            confidence_level=level,
            criteria_results=result.criteria_results,
            verifier_results=verifier_results,
            summary_feedback=result.summary_feedback,
            rework_instructions=result.rework_instructions,
            contract=Contract.objects.filter(pk=task.contract_id).first(),
        )
        route_evaluation(step=step, evaluation=evaluation)


CONFIDENCE_RANK = {Step.Confidence.RED: 0, Step.Confidence.YELLOW: 1, Step.Confidence.GREEN: 2}


def _worse(level: str, other: str) -> str:
    if other not in CONFIDENCE_RANK:
        return level
    return min(level, other, key=CONFIDENCE_RANK.__getitem__)


def route_evaluation(*, step: Step, evaluation: Evaluation) -> None:
    """Green and passed → passed; yellow → passed (full_auto) or a person;
    red or not passed → rework (or failed when no rework is left)."""
    directive = step.directive
    level = evaluation.confidence_level
    if directive.autonomy_level == Directive.Autonomy.MANUAL:
        _ask_for_approval(step, evaluation)
        return
    if evaluation.passed and level == Step.Confidence.GREEN:
        step_transition(step=step, to=Step.Status.PASSED, data={"evaluation": str(evaluation.pk)})
        return
    if evaluation.passed and level == Step.Confidence.YELLOW:
        if directive.autonomy_level == Directive.Autonomy.FULL_AUTO:
            step_transition(
                step=step, to=Step.Status.PASSED, data={"evaluation": str(evaluation.pk), "reason": "full_auto"}
            )
        else:
            _ask_for_approval(step, evaluation)
        return
    instructions = (
        evaluation.rework_instructions or evaluation.summary_feedback or "The evaluation found the work lacking."
    )
    step_rework(step=step, instructions=instructions, actor=SYSTEM)
    if step.status == Step.Status.FAILED:
        _step_failed(step, None)


def _ask_for_approval(step: Step, evaluation: Evaluation) -> None:
    step_transition(step=step, to=Step.Status.AWAITING_APPROVAL, data={"evaluation": str(evaluation.pk)})
    approval_request(
        directive=step.directive,
        kind=ApprovalRequest.Kind.STEP_REVIEW,
        description=f"Step '{step.name}' scored {evaluation.overall_score:.2f} ({evaluation.confidence_level}).",
        step=step,
        evaluation=evaluation,
        context={"score": evaluation.overall_score, "confidence": evaluation.confidence_level},
    )


def _step_failed(step: Step, message: str | None) -> None:
    if message is not None:
        try:
            step_transition(step=step, to=Step.Status.FAILED, severity="error", message=message)
        except InvalidTransition:
            return
    # Dependents (transitively) are blocked.
    frontier = [step.pk]
    while frontier:
        dependents = list(
            Step.objects.filter(
                dependency_links__depends_on_id__in=frontier, status__in=[Step.Status.PENDING, Step.Status.READY]
            )
        )
        frontier = []
        for dependent in dependents:
            if step_transition(step=dependent, to=Step.Status.BLOCKED, data={"reason": f"'{step.name}' failed"}):
                frontier.append(dependent.pk)


# --------------------------------------------------------------------------- completion


def completion_dispatch(*, directive: Directive) -> Task | None:
    """Every step of the current chain passed: claim the directive and start
    the completion task (at most one, whoever calls)."""
    with transaction.atomic():
        try:
            claimed = directive_transition(
                directive=directive, to=Directive.Status.COMPLETING, expected=Directive.Status.ACTIVE
            )
        except InvalidTransition:
            claimed = False  # paused or stopped meanwhile
        if not claimed:
            return None
        running = Task.objects.filter(pk=directive.completion_task_id).exclude(status__in=Task.FINISHED).first()
        if running is not None:
            return None  # resumed while its completion still runs: wait for that one
        chain = Chain.objects.filter(pk=directive.current_chain_id).first()
        if chain is not None and chain.status == Chain.Status.ACTIVE:
            chain_transition(chain=chain, to=Chain.Status.COMPLETED)
        steps = list(
            Step.objects.filter(chain=chain, status=Step.Status.PASSED, execution_task__isnull=False)
            .select_related("execution_task")
            .order_by("order_index", "created_at")
        )
        step_branches = [s.execution_task.branch for s in steps if s.execution_task.branch]
        branch = directive_branch(directive)
        github = is_github(directive.repository_url)
        plan = render_prompt(
            "completion",
            directive=directive,
            step_branches=step_branches,
            directive_branch=branch,
            existing_pr=bool(directive.pr_url or directive.pr_branch),
            github=github,
        )
        contract = _directive_contract(
            directive, contract_type=Contract.ContractType.COMPLETION, name=f"Complete: {directive.title}"
        )
        task = _supervised_task(
            directive,
            kind=Task.Kind.COMPLETION,
            name=f"Complete {directive.title}",
            plan=plan,
            contract=contract,
            base_branch=directive.pr_branch or directive.base_branch,
            branch=branch,
            merge_branches=step_branches,
            completion_action=Task.CompletionAction.PR if github else Task.CompletionAction.BRANCH,
            priority=10,
        )
        Directive.objects.filter(pk=directive.pk).update(completion_task=task, pr_branch=branch)
    return task


def _claim_completion_task(task: Task) -> Directive | None:
    """Claim a finished completion or verification task's consequences: only the
    caller that clears ``completion_task`` handles them. The directive, or None.

    A directive paused while the task ran (pause lets running tasks finish)
    leaves it unclaimed: resuming makes the directive ``active`` again, and
    the recovery phase of ``advance`` brings the result back here. A result
    that finished the work sends the resumed directive back to ``completing``;
    any other lets completion start over."""
    directive = Directive.objects.select_for_update().filter(pk=task.directive_id, completion_task=task).first()
    if directive is None or directive.status == Directive.Status.PAUSED:
        return None
    if Directive.objects.filter(pk=task.directive_id, completion_task=task).update(completion_task=None) != 1:
        return None
    directive.completion_task = None
    if directive.status == Directive.Status.ACTIVE and task.status == Task.Status.DONE:
        directive_transition(
            directive=directive,
            to=Directive.Status.COMPLETING,
            expected=Directive.Status.ACTIVE,
            data={"reason": f"the {task.kind} task finished while the directive was paused"},
        )
    return directive


def completion_task_finished(*, task: Task) -> None:
    with transaction.atomic():
        directive = _claim_completion_task(task)
        if directive is None:
            return
        if directive.status == Directive.Status.COMPLETED:
            _orders_done(directive)  # the task completed the directive itself through the API
            return
        if directive.status != Directive.Status.COMPLETING or task.status == Task.Status.CANCELLED:
            return
        if task.status != Task.Status.DONE:
            _pause(
                directive,
                f"The completion task {task.status}: {task.error or 'no error given'}",
                event_type="completion_failed",
            )
            return
        _note_missing_statement(task, "The completion task")
        if not directive.pr_url:
            url = _pr_url_in_output(task)
            if url:
                directive_record_pr(directive=directive, actor=SYSTEM, pr_url=url)
        if directive.pr_url or not is_github(directive.repository_url):
            directive_complete(directive=directive)
            return
        verification_dispatch(directive=directive)


def _pr_url_in_output(task: Task) -> str:
    texts = [
        task.summary or "",
        *list(
            TaskOutput.objects.filter(task=task, content__contains="github.com/")
            .order_by("-seq")
            .values_list("content", flat=True)[:200]
        ),
    ]
    for text in texts:
        match = GITHUB_PR.search(text)
        if match:
            return match.group(0)
    return ""


def verification_dispatch(*, directive: Directive) -> Task:
    plan = render_prompt("verification", directive=directive, directive_branch=directive_branch(directive))
    task = _supervised_task(
        directive,
        kind=Task.Kind.VERIFICATION,
        name=f"Verify the pull request of {directive.title}",
        plan=plan,
        contract=Contract.objects.filter(directive=directive, contract_type="completion")
        .order_by("-created_at")
        .first(),
        base_branch=directive.base_branch,
        branch=directive_branch(directive),
        completion_action=Task.CompletionAction.NONE,
        priority=10,
    )
    Directive.objects.filter(pk=directive.pk).update(completion_task=task)
    return task


def verification_task_finished(*, task: Task) -> None:
    with transaction.atomic():
        directive = _claim_completion_task(task)
        if directive is None:
            return
        _note_missing_statement(task, "The verification task")
        if not directive.pr_url:
            url = _pr_url_in_output(task)
            if url:
                directive_record_pr(directive=directive, actor=SYSTEM, pr_url=url)
            else:
                _warn(directive.pk, "pr_not_found", "No pull request was found; the pushed branch is the result.")
        if directive.status == Directive.Status.COMPLETING:
            directive_complete(directive=directive)
        elif directive.status == Directive.Status.COMPLETED:
            # The verifier completed it itself (`makima directive update --status completed`).
            _orders_done(directive)


def directive_complete(*, directive: Directive) -> None:
    """completing → completed; the orders it carried out are done."""
    with transaction.atomic():
        try:
            completed = directive_transition(
                directive=directive, to=Directive.Status.COMPLETED, expected=Directive.Status.COMPLETING
            )
        except InvalidTransition:
            completed = False  # paused or stopped meanwhile
        if completed:
            _orders_done(directive)


def _orders_done(directive: Directive) -> None:
    for order in Order.objects.filter(directive=directive, status=Order.Status.IN_PROGRESS):
        order_transition(order=order, to=Order.Status.DONE)


# --------------------------------------------------------------------------- entry points

FINISHED_HANDLERS = {
    Task.Kind.PLANNING: planning_task_finished,
    Task.Kind.EXECUTION: execution_task_finished,
    Task.Kind.MONITORING: monitoring_task_finished,
    Task.Kind.COMPLETION: completion_task_finished,
    Task.Kind.VERIFICATION: verification_task_finished,
}


def _holds_its_role(task: Task) -> bool:
    """Whether the task is still the one its directive or step waits for."""
    if task.kind == Task.Kind.PLANNING:
        return Directive.objects.filter(pk=task.directive_id, orchestrator_task=task).exists()
    if task.kind in (Task.Kind.COMPLETION, Task.Kind.VERIFICATION):
        return Directive.objects.filter(pk=task.directive_id, completion_task=task).exists()
    if task.kind == Task.Kind.EXECUTION:
        return Step.objects.filter(pk=task.step_id, execution_task=task, status=Step.Status.RUNNING).exists()
    return Step.objects.filter(pk=task.step_id, monitoring_task=task).exists()


def _retry_interrupted(task: Task) -> bool:
    """An interrupted task (its daemon was lost) goes back to ``pending`` for
    another daemon while it has attempts left (``MAKIMA_MAX_TASK_ATTEMPTS``).
    Returns whether it was retried (by this call or a concurrent one)."""
    if task.status != Task.Status.INTERRUPTED or task.attempt >= settings.MAKIMA_MAX_TASK_ATTEMPTS:
        return False
    if not _holds_its_role(task):
        return False
    with transaction.atomic():
        try:
            retried = task_transition(
                task=task,
                to=Task.Status.PENDING,
                expected=Task.Status.INTERRUPTED,
                updates={"attempt": F("attempt") + 1, "daemon": None, "version": F("version") + 1},
                message=f"Retrying (attempt {task.attempt + 1} of {settings.MAKIMA_MAX_TASK_ATTEMPTS}).",
            )
        except InvalidTransition:
            return True  # cancelled meanwhile: nothing left to apply
        if retried and task.kind == Task.Kind.EXECUTION:
            step = Step.objects.filter(pk=task.step_id, status=Step.Status.RUNNING).first()
            if step is not None:
                with contextlib.suppress(InvalidTransition):
                    step_transition(
                        step=step,
                        to=Step.Status.READY,
                        expected=Step.Status.RUNNING,
                        data={"reason": "task interrupted"},
                    )
    return True


def apply_finished(*, task: Task) -> None:
    """The consequences of one finished task: a retry when it was interrupted
    and has attempts left, else its kind's handler."""
    if _retry_interrupted(task):
        return
    FINISHED_HANDLERS[task.kind](task=task)


def on_task_finished(*, task_id: Any) -> None:
    """Apply the consequences of a finished task (planning, execution,
    monitoring, completion or verification), then bring its directive forward
    and hand the capacity it freed to the owner's waiting tasks."""
    task = Task.objects.filter(pk=task_id).first()
    if task is None or task.status not in Task.FINISHED:
        return
    with log_context(directive=task.directive_id, step=task.step_id, task=task.pk):
        if task.directive_id is not None:
            apply_finished(task=task)
            # The owner-wide dispatch at the end of advance covers this directive.
            advance(directive_ids=[task.directive_id], dispatch_owner_ids=[task.owner_id])
        else:
            task_dispatch_pending(owner_ids=[task.owner_id])


def advance(
    *,
    directive_ids: Iterable[Any] | None = None,
    dispatch_owner_ids: Iterable[Any] | None = None,
) -> dict[str, int]:
    """Bring directives forward: planning tasks, readiness, evaluations,
    completion, order pickup, breakers; then dispatch pending tasks (of these
    directives, or of every directive of ``dispatch_owner_ids`` when given).

    Works on a set of directives (all live ones when ``directive_ids`` is
    None) with a fixed number of queries when there is nothing to do.
    """
    stats: dict[str, int] = defaultdict(int)
    live = Directive.objects.select_related("owner").filter(
        status__in=[Directive.Status.PLANNING, Directive.Status.ACTIVE, Directive.Status.COMPLETING]
    )
    if directive_ids is not None:
        live = live.filter(pk__in=list(directive_ids))
    directives = list(live)
    if not directives:
        if dispatch_owner_ids is not None:
            stats["dispatched"] = len(task_dispatch_pending(owner_ids=list(dispatch_owner_ids)))
        return dict(stats)
    now = timezone.now()
    by_id = {d.pk: d for d in directives}
    _sync_costs(directives)

    # Breakers before anything is dispatched.
    for directive in directives:
        breaker = breaker_tripped(directive, now=now)
        if breaker:
            with log_context(directive=directive.pk):
                _trip(directive, breaker)
            by_id.pop(directive.pk)
            stats["breakers"] += 1

    # Phase: planning — directives in planning without a planning task get one.
    for directive in by_id.values():
        planning = directive.status == Directive.Status.PLANNING and directive.orchestrator_task_id is None
        with log_context(directive=directive.pk):
            if planning and planning_dispatch(directive=directive):
                stats["planning"] += 1

    # Phase: finished tasks whose consequences were not applied (a crash, a lost handler).
    stale = Task.objects.filter(directive_id__in=list(by_id), status__in=list(Task.FINISHED)).filter(
        Q(kind=Task.Kind.PLANNING, directive__orchestrator_task=F("pk"))
        | Q(kind__in=[Task.Kind.COMPLETION, Task.Kind.VERIFICATION], directive__completion_task=F("pk"))
        | Q(kind=Task.Kind.EXECUTION, step__execution_task=F("pk"), step__status=Step.Status.RUNNING)
        | Q(kind=Task.Kind.MONITORING, step__monitoring_task=F("pk"), step__status=Step.Status.EVALUATING)
    )
    for task in stale:
        with log_context(directive=task.directive_id, step=task.step_id, task=task.pk):
            apply_finished(task=task)
        stats["recovered"] += 1
    if stats["recovered"]:
        # Recovered plans and completions moved directives: continue from where they are now.
        for directive in Directive.objects.filter(pk__in=list(by_id)):
            by_id[directive.pk] = directive

    active = [d for d in by_id.values() if d.status == Directive.Status.ACTIVE]
    active_ids = [d.pk for d in active]
    if active_ids:
        # Order pickup: orders linked since the last order pickup send an active
        # directive back to planning. Orders a planner left unpicked wait for the
        # next link rather than sending the directive back to planning over and over.
        last_pickup = (
            Task.objects.filter(
                directive_id=OuterRef("directive_id"),
                kind=Task.Kind.PLANNING,
                status=Task.Status.DONE,
                contract__phase=Directive.PlanningReason.ORDER_PICKUP,
            )
            .order_by("-created_at")
            .values("created_at")[:1]
        )
        with_orders = set(
            Order.objects.filter(directive_id__in=active_ids, status=Order.Status.LINKED)
            .annotate(last_pickup=Subquery(last_pickup))
            .filter(Q(last_pickup__isnull=True) | Q(updated_at__gt=F("last_pickup")))
            .values_list("directive_id", flat=True)
        )
        for directive in active:
            if directive.pk not in with_orders or directive.orchestrator_task_id is not None:
                continue
            with log_context(directive=directive.pk):
                if directive_transition(
                    directive=directive,
                    to=Directive.Status.PLANNING,
                    expected=Directive.Status.ACTIVE,
                    updates={"planning_reason": Directive.PlanningReason.ORDER_PICKUP},
                    data={"reason": "orders"},
                ):
                    planning_dispatch(directive=directive)
                    stats["order_pickup"] += 1
        active = [d for d in active if d.status == Directive.Status.ACTIVE]

        # Phase: execution — readiness over every active directive's current chain.
        chain_ids = [d.current_chain_id for d in active if d.current_chain_id]
        steps_by_directive: dict[Any, list[StepRow]] = defaultdict(list)
        for values in (
            Step.objects.filter(chain_id__in=chain_ids)
            .order_by("order_index", "created_at")
            .values_list(*StepRow.FIELDS)
        ):
            row = StepRow(*values)
            steps_by_directive[row.directive_id].append(row)
        deps_of: dict[Any, list[Any]] = defaultdict(list)
        for step_id, dep_id in (
            StepDependency.objects.filter(step__chain_id__in=chain_ids)
            .order_by("step_id", "position")
            .values_list("step_id", "depends_on_id")
        ):
            deps_of[step_id].append(dep_id)
        for directive in active:
            with log_context(directive=directive.pk):
                steps = steps_by_directive.get(directive.pk, [])
                if any(s.status in (Step.Status.PENDING, Step.Status.READY) for s in steps):
                    _advance_steps(directive, steps, deps_of)
                # Phase: monitoring — evaluating steps without an evaluator (manual evaluations).
                for row in steps:
                    if row.status == Step.Status.EVALUATING and row.monitoring_task_id is None:
                        with transaction.atomic():
                            # The row lock is the claim: a concurrent advance waits, then sees the evaluator.
                            step = (
                                Step.objects.select_for_update()
                                .filter(pk=row.pk, monitoring_task__isnull=True, status=Step.Status.EVALUATING)
                                .first()
                            )
                            if step is not None:
                                step.directive = directive
                                monitoring_dispatch(step=step)
                                stats["monitoring"] += 1
        # Phase: completion, or a pause when a failed step blocks everything. The
        # rows carry every status change made above; completion itself is a claim.
        for directive in active:
            with log_context(directive=directive.pk):
                _settle(directive, steps_by_directive.get(directive.pk, []), deps_of)

    if dispatch_owner_ids is not None:
        dispatched = task_dispatch_pending(owner_ids=list(dispatch_owner_ids))
    else:
        dispatched = task_dispatch_pending(directive_ids=list(by_id))
    stats["dispatched"] = len(dispatched)
    return dict(stats)


def _sync_costs(directives: list[Directive]) -> None:
    """``total_cost_usd`` covers at least the final costs of the directive's
    finished tasks, whichever path stored them. The daemon gateway adds each
    final cost when it stores the report; this catches the rest and never
    lowers the total (nor counts a running task's interim cost twice)."""
    totals = dict(
        Task.objects.filter(directive_id__in=[d.pk for d in directives], status__in=list(Task.FINISHED))
        .order_by()
        .values("directive_id")
        .annotate(total=Sum("cost_usd"))
        .values_list("directive_id", "total")
    )
    for directive in directives:
        total = totals.get(directive.pk) or Decimal(0)
        if total > directive.total_cost_usd:
            Directive.objects.filter(pk=directive.pk, total_cost_usd__lt=total).update(total_cost_usd=total)
            directive.total_cost_usd = total


def reconcile(*, now: Any = None) -> dict[str, int]:
    """Leases and stale approvals: silent daemons are disconnected, their tasks
    interrupted once the lease ran out, expired approvals closed."""
    from daemons.models import Daemon
    from daemons.services import daemon_transition

    now = now or timezone.now()
    stats: dict[str, int] = defaultdict(int)
    silent_after = timedelta(seconds=3 * settings.MAKIMA_HEARTBEAT_INTERVAL_S)
    for daemon in Daemon.objects.filter(status=Daemon.Status.CONNECTED, last_seen_at__lt=now - silent_after):
        try:
            if daemon_transition(daemon=daemon, to=Daemon.Status.DISCONNECTED):
                stats["daemons_lost"] += 1
        except InvalidTransition:
            pass
    # The lease runs from the moment the daemon was marked disconnected (the
    # transition stamps updated_at), and never ends before LEASE_S after it was last heard.
    expired = now - timedelta(seconds=settings.MAKIMA_TASK_LEASE_S)
    orphans = Task.objects.filter(status__in=list(Task.ON_DAEMON)).filter(
        Q(daemon__isnull=True)
        | Q(
            Q(daemon__last_seen_at__lt=expired) | Q(daemon__last_seen_at__isnull=True),
            daemon__status=Daemon.Status.DISCONNECTED,
            daemon__updated_at__lt=expired,
        )
    )
    for task in orphans:
        with log_context(directive=task.directive_id, step=task.step_id, task=task.pk):
            try:
                if task_transition(
                    task=task,
                    to=Task.Status.INTERRUPTED,
                    severity="warn",
                    message="Its daemon was lost and the lease expired.",
                    updates={"error": "daemon lost"},
                ):
                    stats["interrupted"] += 1
                    on_task_finished(task_id=task.pk)
            except InvalidTransition:
                pass
    for approval in ApprovalRequest.objects.filter(status=ApprovalRequest.Status.PENDING, expires_at__lt=now):
        with transaction.atomic():
            if approval_transition(approval=approval, to=ApprovalRequest.Status.EXPIRED):
                stats["approvals_expired"] += 1
                note = "The approval request expired without an answer."
                if approval.kind == ApprovalRequest.Kind.PLAN_REVIEW:
                    # Unreviewed plans do not run: plan again, as after a denial.
                    plan_review_refused(approval=approval, note=note, actor=SYSTEM)
                    advance_after_commit(approval.directive_id)
                    continue
                step = Step.objects.select_related("directive").filter(pk=approval.step_id).first()
                if step is not None and step.status == Step.Status.AWAITING_APPROVAL:
                    step_rework(step=step, instructions=note, actor=SYSTEM)
                    advance_after_commit(approval.directive_id)
    return dict(stats)


def tick() -> dict[str, Any]:
    """One pass of the safety net: reconcile, then every phase for every live directive."""
    started = time.monotonic()
    stats = {**reconcile(), **advance()}
    stats["seconds"] = round(time.monotonic() - started, 4)
    logger.info("orchestrator tick: %s", stats)
    return stats
