"""Everything that changes directives, chains, steps, evaluations, approvals,
orders and the event log. Views, serializers, consumers, admin actions and
background tasks call these; nothing else writes these rows."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.db.models import F
from django.utils import timezone

from directives.models import (
    AgentKind,
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
from makima.errors import Conflict
from makima.state import SYSTEM, Actor, InvalidTransition, Transitions, atomic_unit, cas_transition

logger = logging.getLogger(__name__)


def advance_after_commit(directive_id: uuid.UUID) -> None:
    """Once the current transaction commits, bring the directive forward at once
    (dispatch what became ready) in this process; the tick is only a safety net."""

    def run() -> None:
        from directives.lifecycle import advance

        try:
            advance(directive_ids=[directive_id])
        except Exception:  # the tick retries; the user's change is already saved
            logger.exception("advancing directive %s failed", directive_id)

    transaction.on_commit(run)


# --------------------------------------------------------------------------- events


def event_record(
    *,
    directive_id: uuid.UUID | None,
    event_type: str,
    chain_id: uuid.UUID | None = None,
    step_id: uuid.UUID | None = None,
    subject_type: str = "",
    subject_id: Any = "",
    severity: str = DirectiveEvent.Severity.INFO,
    message: str = "",
    data: Mapping[str, Any] | None = None,
    actor: Actor = SYSTEM,
) -> DirectiveEvent:
    """Append one row to the event log (and push it to the directive's live feed)."""
    event = DirectiveEvent.objects.create(
        directive_id=directive_id,
        chain_id=chain_id,
        step_id=step_id,
        subject_type=subject_type,
        subject_id=str(subject_id or ""),
        event_type=event_type,
        severity=severity,
        message=message,
        data=dict(data or {}),
        actor_type=actor.type,
        actor=actor.name,
    )
    event_broadcast([event])
    return event


def directive_group(directive_id: Any) -> str:
    """The channel-layer group that carries a directive's live events."""
    return f"directive.{directive_id}"


def event_as_message(event: DirectiveEvent) -> dict[str, Any]:
    return {
        "id": event.pk,
        "directive": str(event.directive_id) if event.directive_id else None,
        "chain": str(event.chain_id) if event.chain_id else None,
        "step": str(event.step_id) if event.step_id else None,
        "subject_type": event.subject_type,
        "subject_id": event.subject_id,
        "event_type": event.event_type,
        "severity": event.severity,
        "message": event.message,
        "data": event.data,
        "actor_type": event.actor_type,
        "actor": event.actor,
        "created_at": event.created_at.isoformat() if event.created_at else None,
    }


#: Live-feed messages held back by :func:`events_pushed_at_the_end` (None: push at commit).
_held_events: contextvars.ContextVar[list[tuple[Any, dict[str, Any]]] | None] = contextvars.ContextVar(
    "makima_held_events", default=None
)


@contextlib.contextmanager
def events_pushed_at_the_end() -> Iterator[None]:
    """Hold the live-feed pushes of every transaction committed inside this
    block, and push them together when it ends.

    A request that starts a directive commits several transactions before the
    command to its daemon exists; each commit pushed its events to the live
    feed first, a channel-layer round trip apiece on the way to the daemon.
    Open pages lose nothing by hearing of them a few milliseconds later."""
    held: list[tuple[Any, dict[str, Any]]] = []
    token = _held_events.set(held)
    try:
        yield
    finally:
        _held_events.reset(token)
        pending = _PendingEvents()
        pending.messages.extend(held)
        pending.flush()


class _PendingEvents:
    """Events of one transaction, pushed together when it commits."""

    def __init__(self) -> None:
        self.messages: list[tuple[Any, dict[str, Any]]] = []

    def flush(self) -> None:
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        messages, self.messages = self.messages, []
        held = _held_events.get()
        if held is not None:
            held.extend(messages)
            return
        layer = get_channel_layer()
        if layer is None or not messages:
            return
        by_directive: dict[Any, list[dict[str, Any]]] = {}
        for directive_id, message in messages:
            by_directive.setdefault(directive_id, []).append(message)
        try:
            for directive_id, events in by_directive.items():
                async_to_sync(layer.group_send)(
                    directive_group(directive_id), {"type": "directive.events", "events": events}
                )
        except Exception:  # a live page catches up from the table; never fail the change for it
            logger.warning("could not push events to the live feed", exc_info=True)


def event_broadcast(events: Iterable[DirectiveEvent]) -> None:
    """After commit, push events to their directive's channel-layer group, one
    message per directive per transaction.

    Only a notification for open pages: the events table is the record, and
    a page that missed a message reads the events after its last id.
    """
    messages = [(event.directive_id, event_as_message(event)) for event in events if event.directive_id]
    if not messages:
        return
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        pending = _PendingEvents()
        pending.messages.extend(messages)
        pending.flush()
        return
    pending = getattr(connection, "makima_pending_events", None)
    # A rolled-back block drops its commit hooks: start a new batch when ours is gone.
    if pending is None or not any(hook[1] == pending.flush for hook in connection.run_on_commit):
        pending = _PendingEvents()
        connection.makima_pending_events = pending
        transaction.on_commit(pending.flush)
    pending.messages.extend(messages)


def status_transition(
    instance: models.Model,
    *,
    to: str,
    transitions: Transitions,
    subject: str,
    directive_id: uuid.UUID | None,
    chain_id: uuid.UUID | None = None,
    step_id: uuid.UUID | None = None,
    actor: Actor = SYSTEM,
    updates: Mapping[str, Any] | None = None,
    expected: str | None = None,
    message: str = "",
    severity: str = DirectiveEvent.Severity.INFO,
    data: Mapping[str, Any] | None = None,
) -> bool:
    """Guarded compare-and-set transition of any status field plus its event.

    Returns ``True`` if this call changed the row (and wrote the event
    ``<subject>_<to>``), ``False`` for a no-op. Raises ``InvalidTransition``.
    """
    with atomic_unit():
        previous = expected if expected is not None else instance.status
        changed = cas_transition(
            instance, to=to, transitions=transitions, subject=subject, updates=updates, expected=expected
        )
        if changed:
            event_record(
                directive_id=directive_id,
                chain_id=chain_id,
                step_id=step_id,
                subject_type=subject,
                subject_id=instance.pk,
                event_type=f"{subject}_{to}",
                severity=severity,
                message=message,
                data={"from": previous, "to": to, **(data or {})},
                actor=actor,
            )
    return changed


# --------------------------------------------------------------------------- transitions


def directive_transition(
    *,
    directive: Directive,
    to: str,
    actor: Actor = SYSTEM,
    updates: Mapping[str, Any] | None = None,
    expected: str | None = None,
    message: str = "",
    severity: str = DirectiveEvent.Severity.INFO,
    data: Mapping[str, Any] | None = None,
) -> bool:
    return status_transition(
        directive,
        to=to,
        transitions=Directive.TRANSITIONS,
        subject="directive",
        directive_id=directive.pk,
        actor=actor,
        updates=updates,
        expected=expected,
        message=message,
        severity=severity,
        data=data,
    )


def chain_transition(
    *, chain: Chain, to: str, actor: Actor = SYSTEM, updates: Mapping[str, Any] | None = None, message: str = ""
) -> bool:
    return status_transition(
        chain,
        to=to,
        transitions=Chain.TRANSITIONS,
        subject="chain",
        directive_id=chain.directive_id,
        chain_id=chain.pk,
        actor=actor,
        updates=updates,
        message=message,
    )


def step_transition(
    *,
    step: Step,
    to: str,
    actor: Actor = SYSTEM,
    updates: Mapping[str, Any] | None = None,
    expected: str | None = None,
    message: str = "",
    severity: str = DirectiveEvent.Severity.INFO,
    data: Mapping[str, Any] | None = None,
) -> bool:
    values = dict(updates or {})
    now = timezone.now()
    if to == Step.Status.RUNNING:
        values.setdefault("started_at", now)
    if to in (Step.Status.PASSED, Step.Status.FAILED, Step.Status.SKIPPED):
        values.setdefault("finished_at", now)
    if to == Step.Status.PENDING:
        values.setdefault("finished_at", None)
    return status_transition(
        step,
        to=to,
        transitions=Step.TRANSITIONS,
        subject="step",
        directive_id=step.directive_id,
        chain_id=step.chain_id,
        step_id=step.pk,
        actor=actor,
        updates=values,
        expected=expected,
        message=message,
        severity=severity,
        data=data,
    )


def approval_transition(
    *, approval: ApprovalRequest, to: str, actor: Actor = SYSTEM, updates: Mapping[str, Any] | None = None
) -> bool:
    return status_transition(
        approval,
        to=to,
        transitions=ApprovalRequest.TRANSITIONS,
        subject="approval",
        directive_id=approval.directive_id,
        step_id=approval.step_id,
        actor=actor,
        updates=updates,
    )


def order_transition(*, order: Order, to: str, actor: Actor = SYSTEM, updates: Mapping[str, Any] | None = None) -> bool:
    return status_transition(
        order,
        to=to,
        transitions=Order.TRANSITIONS,
        subject="order",
        # Unlinking clears directive_id; the event still belongs on the directive it leaves.
        directive_id=(updates or {}).get("directive_id") or order.directive_id,
        actor=actor,
        updates=updates,
    )


# --------------------------------------------------------------------------- directives

DIRECTIVE_EDITABLE_FIELDS = frozenset(
    {
        "team",
        "title",
        "goal",
        "requirements",
        "acceptance_criteria",
        "constraints",
        "repository_url",
        "base_branch",
        "local_path",
        "autonomy_level",
        "confidence_threshold_green",
        "confidence_threshold_yellow",
        "max_rework_cycles",
        "evaluation_mode",
        "verifiers",
        "agent",
        "fail_closed",
        "require_plan_approval",
        "max_total_cost_usd",
        "max_wall_time_minutes",
        "max_chain_regenerations",
    }
)


def _normalise_items(value: Any, *, field_name: str, text_key: str, prefix: str) -> list[dict[str, str]]:
    """Requirements and criteria are lists of ``{id, <text_key>}``; plain strings get ids."""
    if not isinstance(value, list):
        raise ValidationError({field_name: "must be a list"})
    items: list[dict[str, str]] = []
    seen: set[str] = set()
    for index, item in enumerate(value, start=1):
        if isinstance(item, str):
            item = {"id": f"{prefix}{index}", text_key: item}
        if not isinstance(item, dict) or not isinstance(item.get(text_key), str) or not item[text_key].strip():
            raise ValidationError({field_name: f"item {index} must be a string or an object with a '{text_key}' text"})
        item_id = str(item.get("id") or f"{prefix}{index}")
        if item_id in seen:
            raise ValidationError({field_name: f"item {index} repeats the id '{item_id}'"})
        seen.add(item_id)
        items.append({"id": item_id, text_key: item[text_key].strip()})
    return items


def _validate_verifiers(value: Any, *, field_name: str = "verifiers") -> Any:
    if value == "auto" or value is None:
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValidationError({field_name: 'must be a list of commands, "auto", or empty'})
    return [v.strip() for v in value]


def directive_clean(fields: dict[str, Any], *, instance: Directive | None = None) -> dict[str, Any]:
    """Validate and normalise directive fields (for create and update alike)."""
    errors: dict[str, str] = {}
    cleaned = dict(fields)
    if "requirements" in cleaned:
        cleaned["requirements"] = _normalise_items(
            cleaned["requirements"], field_name="requirements", text_key="description", prefix="R"
        )
    if "acceptance_criteria" in cleaned:
        cleaned["acceptance_criteria"] = _normalise_items(
            cleaned["acceptance_criteria"], field_name="acceptance_criteria", text_key="criterion", prefix="AC"
        )
    if "constraints" in cleaned:
        constraints = cleaned["constraints"]
        if not isinstance(constraints, list) or not all(isinstance(c, str) for c in constraints):
            errors["constraints"] = "must be a list of strings"
    if "verifiers" in cleaned:
        cleaned["verifiers"] = _validate_verifiers(cleaned["verifiers"]) or []
    for name in ("confidence_threshold_green", "confidence_threshold_yellow"):
        if name not in cleaned:
            continue
        value = cleaned[name]
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            errors[name] = "must be a number between 0 and 1"
        elif not 0.0 <= float(value) <= 1.0:
            errors[name] = "must be between 0 and 1"
    green = cleaned.get("confidence_threshold_green", instance.confidence_threshold_green if instance else 0.8)
    yellow = cleaned.get("confidence_threshold_yellow", instance.confidence_threshold_yellow if instance else 0.5)
    thresholds_ok = "confidence_threshold_yellow" not in errors and "confidence_threshold_green" not in errors
    if thresholds_ok and float(yellow) > float(green):
        errors["confidence_threshold_yellow"] = f"must not be above the green threshold ({green})"
    for name in ("max_rework_cycles", "max_total_cost_usd", "max_wall_time_minutes", "max_chain_regenerations"):
        value = cleaned.get(name)
        if value is None:
            if name == "max_rework_cycles" and name in cleaned:
                errors[name] = "must be a number"  # the only limit that cannot be switched off
            continue
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
            errors[name] = "must be a number"
        elif value < 0:
            errors[name] = "must not be negative"
    if "title" in cleaned and not str(cleaned["title"]).strip():
        errors["title"] = "must not be empty"
    if "goal" in cleaned and not str(cleaned["goal"]).strip():
        errors["goal"] = "must not be empty"
    if errors:
        raise ValidationError(errors)
    return cleaned


def directive_create(*, owner: Any, actor: Actor | None = None, **fields: Any) -> Directive:
    """Create a draft directive."""
    unknown = set(fields) - DIRECTIVE_EDITABLE_FIELDS
    if unknown:
        raise ValidationError({name: "is not a directive field" for name in sorted(unknown)})
    cleaned = directive_clean(fields)
    actor = actor or Actor.for_user(owner)
    with transaction.atomic():
        directive = Directive.objects.create(owner=owner, **cleaned)
        event_record(
            directive_id=directive.pk,
            subject_type="directive",
            subject_id=directive.pk,
            event_type="directive_created",
            data={"title": directive.title},
            actor=actor,
        )
    return directive


def directive_update(*, directive: Directive, actor: Actor, **fields: Any) -> Directive:
    """Edit a directive's fields. A new goal is recorded in the goal history and,
    on a completed directive, sends it back to planning."""
    unknown = set(fields) - DIRECTIVE_EDITABLE_FIELDS
    if unknown:
        raise ValidationError({name: "is not an editable directive field" for name in sorted(unknown)})
    with transaction.atomic():
        # Decide on the locked, fresh row: the caller's copy may be stale.
        directive = Directive.objects.select_for_update().get(pk=directive.pk)
        if directive.status in (Directive.Status.FAILED, Directive.Status.ARCHIVED):
            raise Conflict(f"a {directive.status} directive cannot be edited")
        cleaned = directive_clean(fields, instance=directive)
        changed = [name for name, value in cleaned.items() if getattr(directive, name) != value]
        goal_changed = "goal" in changed
        if goal_changed:
            GoalHistory.objects.create(directive=directive, previous_goal=directive.goal)
            cleaned["goal_updated_at"] = timezone.now()
        for name, value in cleaned.items():
            setattr(directive, name, value)
        if changed:
            directive.save(update_fields=[*cleaned.keys(), "updated_at"])
            event_record(
                directive_id=directive.pk,
                subject_type="directive",
                subject_id=directive.pk,
                event_type="directive_updated",
                data={"fields": sorted(changed)},
                actor=actor,
            )
        if goal_changed:
            event_record(
                directive_id=directive.pk,
                subject_type="directive",
                subject_id=directive.pk,
                event_type="goal_updated",
                message="The goal changed; the plan will be revised.",
                actor=actor,
            )
            if directive.status in (Directive.Status.ACTIVE, Directive.Status.PAUSED, Directive.Status.COMPLETED):
                directive_transition(
                    directive=directive,
                    to=Directive.Status.PLANNING,
                    actor=actor,
                    # A planner still at work plans for the old goal: it is superseded.
                    updates={"planning_reason": Directive.PlanningReason.REPLAN, "orchestrator_task": None},
                    data={"reason": "goal changed"},
                )
                advance_after_commit(directive.pk)
    return directive


def directive_record_pr(*, directive: Directive, actor: Actor, pr_url: str = "", pr_branch: str = "") -> Directive:
    """Record the pull request (or pushed branch) of a directive."""
    updates = {k: v for k, v in (("pr_url", pr_url), ("pr_branch", pr_branch)) if v}
    if not updates:
        return directive
    if pr_url and not pr_url.startswith(("https://", "http://")):
        raise ValidationError({"pr_url": "must be an http(s) URL"})
    Directive.objects.filter(pk=directive.pk).update(**updates, updated_at=timezone.now())
    for name, value in updates.items():
        setattr(directive, name, value)
    event_record(
        directive_id=directive.pk,
        subject_type="directive",
        subject_id=directive.pk,
        event_type="pr_recorded",
        data=updates,
        actor=actor,
    )
    return directive


def directive_has_steps(directive: Directive) -> bool:
    """Whether the directive has a live plan. Steps a planner added while
    planning belong to no chain until the plan is accepted: they are no plan yet."""
    return directive.steps.filter(chain__isnull=False).exclude(chain__status=Chain.Status.SUPERSEDED).exists()


def directive_is_mid_planning(directive: Directive) -> bool:
    """A planner's work was in flight, its plan awaits review, or a refused plan
    awaits the next one, when the directive stopped moving."""
    return (
        directive.orchestrator_task_id is not None
        or bool(directive.planning_note)
        or ApprovalRequest.objects.filter(
            directive=directive, kind=ApprovalRequest.Kind.PLAN_REVIEW, status=ApprovalRequest.Status.PENDING
        ).exists()
    )


def directive_start(*, directive: Directive, actor: Actor) -> Directive:
    """Start a draft directive (or one paused before it was planned): straight
    to ``active`` when it already has steps, else to ``planning``."""
    if directive.status == Directive.Status.PAUSED and directive.current_chain_id is not None:
        raise InvalidTransition("directive", directive.status, "active", reason="it was already started; resume it")
    if directive.status not in (Directive.Status.DRAFT, Directive.Status.PAUSED):
        raise InvalidTransition("directive", directive.status, "planning", reason="only a draft can be started")
    now = timezone.now()
    with transaction.atomic():
        if directive_has_steps(directive):
            directive_transition(
                directive=directive, to=Directive.Status.ACTIVE, actor=actor, updates={"started_at": now}
            )
        else:
            directive_transition(
                directive=directive,
                to=Directive.Status.PLANNING,
                actor=actor,
                updates={"started_at": now, "planning_reason": Directive.PlanningReason.INITIAL},
            )
        advance_after_commit(directive.pk)
    return directive


def directive_pause(*, directive: Directive, actor: Actor, reason: str = "") -> Directive:
    directive_transition(directive=directive, to=Directive.Status.PAUSED, actor=actor, message=reason)
    return directive


def directive_resume(*, directive: Directive, actor: Actor) -> Directive:
    """Resume a paused directive: back to ``active`` when it has a plan, else to ``planning``."""
    if directive.status != Directive.Status.PAUSED:
        raise InvalidTransition("directive", directive.status, "active", reason="only a paused directive can resume")
    # Paused in the middle of planning: back to planning, where the planner's result is taken up.
    planned = directive_has_steps(directive) and not directive_is_mid_planning(directive)
    target = Directive.Status.ACTIVE if planned else Directive.Status.PLANNING
    with transaction.atomic():
        directive_transition(directive=directive, to=target, actor=actor)
        advance_after_commit(directive.pk)
    return directive


def directive_stop(*, directive: Directive, actor: Actor, reason: str = "") -> Directive:
    """Stop a directive for good: it becomes ``failed``; its pending tasks are
    cancelled and those on daemons are interrupted."""
    from contracts.services import task_cancel_for_directive

    with transaction.atomic():
        directive_transition(
            directive=directive,
            to=Directive.Status.FAILED,
            actor=actor,
            message=reason or "Stopped.",
            severity=DirectiveEvent.Severity.WARN,
        )
        task_cancel_for_directive(directive=directive, actor=actor, reason=reason or "directive stopped")
    return directive


def directive_archive(*, directive: Directive, actor: Actor) -> Directive:
    directive_transition(directive=directive, to=Directive.Status.ARCHIVED, actor=actor)
    return directive


def directive_replan(*, directive: Directive, actor: Actor) -> Directive:
    """Ask for a revised plan: the directive goes (back) to ``planning``."""
    if directive.status not in (Directive.Status.ACTIVE, Directive.Status.PAUSED, Directive.Status.COMPLETED):
        raise InvalidTransition(
            "directive", directive.status, "planning", reason="only an active, paused or completed directive re-plans"
        )
    with transaction.atomic():
        directive_transition(
            directive=directive,
            to=Directive.Status.PLANNING,
            actor=actor,
            updates={"planning_reason": Directive.PlanningReason.REPLAN, "orchestrator_task": None},
            data={"reason": "replan"},
        )
        advance_after_commit(directive.pk)
    return directive


def directive_regenerate(*, directive: Directive, actor: Actor) -> Directive:
    """Supersede the current chain and plan a new one; counts against
    ``max_chain_regenerations``."""
    if directive.status not in (Directive.Status.ACTIVE, Directive.Status.PAUSED, Directive.Status.COMPLETED):
        raise InvalidTransition(
            "directive",
            directive.status,
            "planning",
            reason="only an active, paused or completed directive regenerates",
        )
    limit = directive.max_chain_regenerations
    if limit is not None and directive.chain_generation_count >= limit:
        raise Conflict(f"max_chain_regenerations reached ({directive.chain_generation_count} of {limit})")
    with transaction.atomic():
        if directive.current_chain_id:
            chain = Chain.objects.get(pk=directive.current_chain_id)
            chain_transition(chain=chain, to=Chain.Status.SUPERSEDED, actor=actor)
            for step in chain.steps.filter(status__in=[Step.Status.PENDING, Step.Status.READY, Step.Status.BLOCKED]):
                step_transition(step=step, to=Step.Status.SKIPPED, actor=actor, data={"reason": "chain regenerated"})
        directive_transition(
            directive=directive,
            to=Directive.Status.PLANNING,
            actor=actor,
            updates={
                "chain_generation_count": F("chain_generation_count") + 1,
                "current_chain": None,
                "orchestrator_task": None,
                "planning_reason": Directive.PlanningReason.REGENERATE,
            },
            data={"reason": "regenerate"},
        )
        advance_after_commit(directive.pk)
    return directive


# --------------------------------------------------------------------------- chains and steps


def chain_create(
    *, directive: Directive, name: str = "", description: str = "", rationale: str = "", actor: Actor = SYSTEM
) -> Chain:
    """Create the next generation of a directive's chain and make it current."""
    with transaction.atomic():
        last = Chain.objects.filter(directive=directive).aggregate(g=models.Max("generation"))["g"] or 0
        chain = Chain.objects.create(
            owner_id=directive.owner_id,
            directive=directive,
            generation=last + 1,
            name=name or f"{directive.title[:180]} — generation {last + 1}",
            description=description,
            rationale=rationale,
        )
        Directive.objects.filter(pk=directive.pk).update(current_chain=chain, updated_at=timezone.now())
        directive.current_chain = chain
        event_record(
            directive_id=directive.pk,
            chain_id=chain.pk,
            subject_type="chain",
            subject_id=chain.pk,
            event_type="chain_created",
            data={"generation": chain.generation},
            actor=actor,
        )
    return chain


@dataclass
class StepSpec:
    """One step to add, as given by a user, the planner or a plan file."""

    name: str
    description: str = ""
    task_plan: str = ""
    step_type: str = Step.StepType.TASK
    depends_on: list[str] = field(default_factory=list)
    order_index: int = 0
    agent: str = ""
    verifiers: Any = None
    editor_x: float | None = None
    editor_y: float | None = None


STEP_SPEC_FIELDS = frozenset(StepSpec.__dataclass_fields__)


def step_spec_from_mapping(data: Mapping[str, Any], *, index: int) -> StepSpec:
    """Parse one step of a batch; ``index`` (1-based) names it in errors."""
    where = f"steps[{index}]"
    if not isinstance(data, Mapping):
        raise ValidationError({where: "must be an object"})
    unknown = set(data) - STEP_SPEC_FIELDS - {"generation"}
    if unknown:
        raise ValidationError({where: f"unknown field(s): {', '.join(sorted(unknown))}"})
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValidationError({where: "needs a non-empty 'name'"})
    if len(name) > 200:
        raise ValidationError({where: "'name' is longer than 200 characters"})
    depends_on = data.get("depends_on") or []
    if not isinstance(depends_on, list) or not all(isinstance(d, str | uuid.UUID) for d in depends_on):
        raise ValidationError({where: "'depends_on' must be a list of step ids or names"})
    step_type = data.get("step_type") or Step.StepType.TASK
    if step_type not in Step.StepType.values:
        raise ValidationError({where: f"unknown step_type '{step_type}'"})
    agent = data.get("agent") or ""
    if agent and agent not in AgentKind.values:
        raise ValidationError({where: f"unknown agent '{agent}'"})
    order_index = data.get("order_index", 0)
    if order_index is None:
        order_index = 0
    if not isinstance(order_index, int) or isinstance(order_index, bool) or order_index < 0:
        raise ValidationError({where: "'order_index' must be a whole number ≥ 0"})
    for text in ("description", "task_plan"):
        if data.get(text) is not None and not isinstance(data.get(text), str):
            raise ValidationError({where: f"'{text}' must be text"})
    return StepSpec(
        name=name.strip(),
        description=data.get("description") or "",
        task_plan=data.get("task_plan") or "",
        step_type=step_type,
        depends_on=[str(d) for d in depends_on],
        order_index=order_index,
        agent=agent,
        verifiers=_validate_verifiers(data.get("verifiers"), field_name=where),
        editor_x=data.get("editor_x"),
        editor_y=data.get("editor_y"),
    )


def find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle in ``{node: [dependency, …]}`` as a list of nodes, or ``None``."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for root in graph:
        if colour[root] != white:
            continue
        stack: list[tuple[str, Iterable[str]]] = [(root, iter(graph[root]))]
        path = [root]
        colour[root] = grey
        while stack:
            node, children = stack[-1]
            for child in children:
                if child not in colour:
                    continue
                if colour[child] == grey:
                    return [*path[path.index(child) :], child]
                if colour[child] == white:
                    colour[child] = grey
                    path.append(child)
                    stack.append((child, iter(graph[child])))
                    break
            else:
                colour[node] = black
                path.pop()
                stack.pop()
    return None


def _step_generation(directive: Directive) -> tuple[int, Chain | None]:
    """Which generation (and chain) new steps of a directive belong to.

    While planning, steps go to the generation being planned and are attached
    to its chain when the plan is accepted; otherwise to the current chain,
    created on first use for hand-authored steps.
    """
    if directive.status == Directive.Status.PLANNING or directive.current_chain_id is None:
        last = Chain.objects.filter(directive=directive).aggregate(g=models.Max("generation"))["g"] or 0
        if directive.status == Directive.Status.PLANNING:
            return last + 1, None
        return last + 1, chain_create(directive=directive, name="Hand-authored plan")
    chain = Chain.objects.get(pk=directive.current_chain_id)
    return chain.generation, chain


STEPS_ACCEPTING = frozenset(
    {
        Directive.Status.DRAFT,
        Directive.Status.PLANNING,
        Directive.Status.ACTIVE,
        Directive.Status.PAUSED,
        Directive.Status.COMPLETING,
    }
)


def same_dependency(a: tuple[str, Step | None], b: tuple[str, Step | None]) -> bool:
    """Whether two resolved dependencies (a batch name, or an existing step) are the same step."""
    if a[1] is not None and b[1] is not None:
        return a[1].pk == b[1].pk
    return a[1] is None and b[1] is None and a[0] == b[0]


def steps_add(*, directive: Directive, specs: Sequence[StepSpec], actor: Actor) -> list[Step]:
    """Add steps to a directive, all or none.

    ``depends_on`` entries are ids of steps already in the directive or names
    of steps in this batch or in the directive's current generation. Unknown
    dependencies, steps of another directive, duplicate names and cycles are
    refused with a ``ValidationError`` naming the offending steps.
    """
    if directive.status not in STEPS_ACCEPTING:
        raise Conflict(f"steps cannot be added to a {directive.status} directive")
    if not specs:
        raise ValidationError({"steps": "at least one step is required"})
    limit = settings.MAKIMA_MAX_STEPS_PER_BATCH
    if len(specs) > limit:
        raise ValidationError({"steps": f"at most {limit} steps may be added at once, got {len(specs)}"})

    with transaction.atomic():
        # Lock the directive so that two concurrent batches cannot both pass the name check.
        directive = Directive.objects.select_for_update().get(pk=directive.pk)
        generation, chain = _step_generation(directive)
        existing = list(
            Step.objects.filter(directive=directive, generation=generation).only("id", "name", "status", "chain_id")
        )
        total = Step.objects.filter(directive=directive).count()
        if total + len(specs) > settings.MAKIMA_MAX_STEPS_PER_DIRECTIVE:
            raise ValidationError(
                {"steps": f"a directive holds at most {settings.MAKIMA_MAX_STEPS_PER_DIRECTIVE} steps"}
            )
        existing_by_name = {s.name: s for s in existing}
        errors: list[str] = []
        batch_names: set[str] = set()
        for spec in specs:
            if spec.name in batch_names:
                errors.append(f"step '{spec.name}': the name appears more than once in the batch")
            elif spec.name in existing_by_name:
                errors.append(f"step '{spec.name}': the directive already has a step with this name")
            batch_names.add(spec.name)

        # Resolve every dependency to an existing step or a batch name.
        id_refs = set()
        for spec in specs:
            for ref in spec.depends_on:
                if ref not in batch_names and ref not in existing_by_name:
                    with contextlib.suppress(ValueError):
                        id_refs.add(uuid.UUID(ref))
        # Only steps of the same owner's directives: another user's step is as unknown as a made-up id.
        steps_by_id = {
            s.pk: s
            for s in Step.objects.filter(pk__in=id_refs, directive__owner_id=directive.owner_id).only(
                "id", "directive_id", "name"
            )
        }
        resolved: dict[str, list[tuple[str, Step | None]]] = {}
        for spec in specs:
            deps: list[tuple[str, Step | None]] = []
            for ref in spec.depends_on:
                dep: tuple[str, Step | None] | None = None
                if ref == spec.name:
                    errors.append(f"step '{spec.name}': depends on itself")
                elif ref in batch_names:
                    dep = (ref, None)
                elif ref in existing_by_name:
                    dep = (ref, existing_by_name[ref])
                else:
                    try:
                        target = steps_by_id.get(uuid.UUID(ref))
                    except ValueError:
                        target = None
                    if target is None:
                        errors.append(f"step '{spec.name}': unknown dependency '{ref}'")
                    elif target.directive_id != directive.pk:
                        errors.append(f"step '{spec.name}': dependency '{ref}' belongs to another directive")
                    else:
                        dep = (str(target.pk), target)
                if dep is None:
                    continue
                # The same step named twice, or by its name and by its id, would be a duplicate link.
                if any(same_dependency(dep, other) for other in deps):
                    errors.append(f"step '{spec.name}': depends on '{ref}' more than once")
                    continue
                deps.append(dep)
            resolved[spec.name] = deps

        if not errors:
            graph = {spec.name: [ref for ref, target in resolved[spec.name] if target is None] for spec in specs}
            cycle = find_cycle(graph)
            if cycle:
                errors.append("dependency cycle: " + " → ".join(f"'{name}'" for name in cycle))
        if errors:
            raise ValidationError({"steps": errors})

        created: dict[str, Step] = {}
        for spec in specs:
            created[spec.name] = Step(
                owner_id=directive.owner_id,
                directive=directive,
                chain=chain,
                generation=generation,
                name=spec.name,
                description=spec.description,
                task_plan=spec.task_plan,
                step_type=spec.step_type,
                order_index=spec.order_index,
                agent=spec.agent,
                verifiers=spec.verifiers,
                editor_x=spec.editor_x,
                editor_y=spec.editor_y,
            )
        Step.objects.bulk_create(created.values())
        links = []
        for spec in specs:
            for position, (ref, target) in enumerate(resolved[spec.name]):
                depends_on = target if target is not None else created[ref]
                links.append(StepDependency(step=created[spec.name], depends_on=depends_on, position=position))
        StepDependency.objects.bulk_create(links)
        added = DirectiveEvent.objects.bulk_create(
            [
                DirectiveEvent(
                    directive_id=directive.pk,
                    chain_id=chain.pk if chain else None,
                    step_id=step.pk,
                    subject_type="step",
                    subject_id=str(step.pk),
                    event_type="step_added",
                    data={"name": step.name, "generation": generation},
                    actor_type=actor.type,
                    actor=actor.name,
                )
                for step in created.values()
            ]
        )
        event_broadcast(added)
        if directive.status == Directive.Status.ACTIVE:
            # A step added to a running directive may be ready at once: dispatch
            # it now rather than at the next tick.
            advance_after_commit(directive.pk)
    return list(created.values())


STEP_EDITABLE_FIELDS = frozenset(
    {"name", "description", "task_plan", "step_type", "order_index", "agent", "verifiers", "editor_x", "editor_y"}
)
STEP_EDITABLE_STATUSES = frozenset({Step.Status.PENDING, Step.Status.READY, Step.Status.BLOCKED, Step.Status.FAILED})


def step_update(*, step: Step, actor: Actor, depends_on: Sequence[str] | None = None, **fields: Any) -> Step:
    """Edit a step that has not started (its position in the editor may change any time)."""
    unknown = set(fields) - STEP_EDITABLE_FIELDS
    if unknown:
        raise ValidationError({name: "is not an editable step field" for name in sorted(unknown)})
    layout_only = set(fields) <= {"editor_x", "editor_y"} and depends_on is None
    if not layout_only and step.status not in STEP_EDITABLE_STATUSES:
        raise Conflict(f"a {step.status} step cannot be edited")
    current = {
        "name": step.name,
        "description": step.description,
        "task_plan": step.task_plan,
        "step_type": step.step_type,
        "order_index": step.order_index,
        "agent": step.agent,
        "verifiers": step.verifiers,
        "editor_x": step.editor_x,
        "editor_y": step.editor_y,
        "depends_on": [str(d) for d in step_dependency_ids(step)],
    }
    merged = {**current, **fields}
    if depends_on is not None:
        merged["depends_on"] = [str(d) for d in depends_on]
    spec = step_spec_from_mapping(merged, index=1)
    with transaction.atomic():
        Directive.objects.select_for_update().filter(pk=step.directive_id).first()
        if (
            spec.name != step.name
            and Step.objects.filter(directive_id=step.directive_id, generation=step.generation, name=spec.name).exists()
        ):
            raise ValidationError({"name": f"the directive already has a step named '{spec.name}'"})
        new_deps: list[Step] | None = None
        if depends_on is not None:
            new_deps = _resolve_dependencies_of_existing(step, spec.depends_on)
        for name in STEP_EDITABLE_FIELDS:
            setattr(step, name, getattr(spec, name))
        step.save(update_fields=[*STEP_EDITABLE_FIELDS, "updated_at"])
        if new_deps is not None:
            StepDependency.objects.filter(step=step).delete()
            StepDependency.objects.bulk_create(
                [StepDependency(step=step, depends_on=d, position=i) for i, d in enumerate(new_deps)]
            )
        event_record(
            directive_id=step.directive_id,
            chain_id=step.chain_id,
            step_id=step.pk,
            subject_type="step",
            subject_id=step.pk,
            event_type="step_updated",
            data={"fields": sorted([*fields, *(["depends_on"] if depends_on is not None else [])])},
            actor=actor,
        )
    return step


def _resolve_dependencies_of_existing(step: Step, refs: Sequence[str]) -> list[Step]:
    """Resolve new dependencies (ids or names) of an existing step and refuse cycles."""
    siblings = {s.name: s for s in Step.objects.filter(directive_id=step.directive_id, generation=step.generation)}
    errors: list[str] = []
    deps: list[Step] = []
    for ref in refs:
        target = siblings.get(ref)
        if target is None:
            try:
                # Another user's step is as unknown as a made-up id.
                target = Step.objects.filter(pk=uuid.UUID(ref), directive__owner_id=step.directive.owner_id).first()
            except ValueError:
                target = None
            if target is None:
                errors.append(f"step '{step.name}': unknown dependency '{ref}'")
                continue
            if target.directive_id != step.directive_id:
                errors.append(f"step '{step.name}': dependency '{ref}' belongs to another directive")
                continue
        if target.pk == step.pk:
            errors.append(f"step '{step.name}': depends on itself")
            continue
        if target in deps:
            errors.append(f"step '{step.name}': depends on '{ref}' more than once")
            continue
        deps.append(target)
    if not errors:
        graph: dict[str, list[str]] = {}
        for link in StepDependency.objects.filter(step__directive_id=step.directive_id).values_list(
            "step_id", "depends_on_id"
        ):
            graph.setdefault(str(link[0]), []).append(str(link[1]))
            graph.setdefault(str(link[1]), [])
        graph[str(step.pk)] = [str(d.pk) for d in deps]
        for d in deps:
            graph.setdefault(str(d.pk), [])
        cycle = find_cycle(graph)
        if cycle:
            names = dict(Step.objects.filter(pk__in=[uuid.UUID(c) for c in cycle]).values_list("id", "name"))
            errors.append("dependency cycle: " + " → ".join(f"'{names.get(uuid.UUID(c), c)}'" for c in cycle))
    if errors:
        raise ValidationError({"depends_on": errors})
    return deps


def step_dependency_ids(step: Step) -> list[uuid.UUID]:
    """The ids of a step's dependencies, in the order they were given."""
    return list(StepDependency.objects.filter(step=step).order_by("position").values_list("depends_on_id", flat=True))


STEP_REMOVABLE_STATUSES = frozenset({Step.Status.PENDING, Step.Status.READY, Step.Status.BLOCKED, Step.Status.SKIPPED})


def step_remove(*, step: Step, actor: Actor) -> None:
    """Remove a step that has not started. Steps that depend on it must go first."""
    if step.status not in STEP_REMOVABLE_STATUSES:
        raise Conflict(f"a {step.status} step cannot be removed; skip it or stop the directive instead")
    dependents = list(
        StepDependency.objects.filter(depends_on=step).values_list("step__name", flat=True).order_by("step__name")
    )
    if dependents:
        raise Conflict(
            f"step '{step.name}' cannot be removed while other steps depend on it: "
            + ", ".join(f"'{n}'" for n in dependents)
        )
    with transaction.atomic():
        event_record(
            directive_id=step.directive_id,
            chain_id=step.chain_id,
            subject_type="step",
            subject_id=step.pk,
            event_type="step_removed",
            data={"name": step.name},
            actor=actor,
        )
        step.delete()


def step_retry(*, step: Step, actor: Actor) -> Step:
    """A failed step goes back to ``pending``; steps blocked by it are unblocked."""
    if step.status != Step.Status.FAILED:
        raise InvalidTransition("step", step.status, "pending", reason="only a failed step can be retried")
    with transaction.atomic():
        step_transition(step=step, to=Step.Status.PENDING, actor=actor, data={"reason": "retry"})
        _unblock_dependents(step, actor=actor)
        advance_after_commit(step.directive_id)
    return step


def _unblock_dependents(step: Step, *, actor: Actor) -> None:
    frontier = [step.pk]
    while frontier:
        blocked = list(Step.objects.filter(dependency_links__depends_on_id__in=frontier, status=Step.Status.BLOCKED))
        frontier = []
        for dependent in blocked:
            if step_transition(step=dependent, to=Step.Status.PENDING, actor=actor, data={"reason": "unblocked"}):
                frontier.append(dependent.pk)


def step_skip(*, step: Step, actor: Actor) -> Step:
    with transaction.atomic():
        step_transition(step=step, to=Step.Status.SKIPPED, actor=actor)
        advance_after_commit(step.directive_id)
    return step


def step_request_evaluation(*, step: Step, actor: Actor) -> Step:
    """A user asks for a fresh evaluation of a step that has been executed."""
    if step.execution_task_id is None:
        raise Conflict(f"step '{step.name}' has not been executed yet, so there is nothing to evaluate")
    from directives.lifecycle import monitoring_dispatch

    with transaction.atomic():
        if step_transition(step=step, to=Step.Status.EVALUATING, actor=actor, data={"reason": "manual evaluation"}):
            monitoring_dispatch(step=step, manual=True)
        advance_after_commit(step.directive_id)
    return step


# --------------------------------------------------------------------------- evaluations and approvals


def confidence_level_for(*, score: float, directive: Directive) -> str:
    if score >= directive.confidence_threshold_green:
        return Step.Confidence.GREEN
    if score >= directive.confidence_threshold_yellow:
        return Step.Confidence.YELLOW
    return Step.Confidence.RED


def evaluation_record(
    *,
    step: Step,
    kind: str,
    passed: bool,
    overall_score: float,
    confidence_level: str = "",
    criteria_results: list[dict[str, Any]] | None = None,
    verifier_results: list[dict[str, Any]] | None = None,
    summary_feedback: str = "",
    rework_instructions: str = "",
    contract: Any = None,
    actor: Actor = SYSTEM,
) -> Evaluation:
    """Store an evaluation of a step and copy its verdict onto the step."""
    if not 0.0 <= overall_score <= 1.0:
        raise ValidationError({"overall_score": "must be between 0 and 1"})
    directive = step.directive
    level = confidence_level or confidence_level_for(score=overall_score, directive=directive)
    if level not in Step.Confidence.values:
        raise ValidationError({"confidence_level": f"must be one of {', '.join(Step.Confidence.values)}"})
    with transaction.atomic():
        evaluation = Evaluation.objects.create(
            owner_id=step.owner_id,
            directive_id=step.directive_id,
            chain_id=step.chain_id,
            step=step,
            contract=contract,
            kind=kind,
            passed=passed,
            overall_score=overall_score,
            confidence_level=level,
            criteria_results=criteria_results or [],
            verifier_results=verifier_results or [],
            summary_feedback=summary_feedback,
            rework_instructions=rework_instructions,
        )
        Step.objects.filter(pk=step.pk).update(
            confidence_score=overall_score, confidence_level=level, last_evaluation=evaluation
        )
        step.confidence_score, step.confidence_level, step.last_evaluation = overall_score, level, evaluation
        event_record(
            directive_id=step.directive_id,
            chain_id=step.chain_id,
            step_id=step.pk,
            subject_type="evaluation",
            subject_id=evaluation.pk,
            event_type="evaluation_recorded",
            severity=DirectiveEvent.Severity.INFO if passed else DirectiveEvent.Severity.WARN,
            data={"kind": kind, "passed": passed, "score": overall_score, "confidence": level},
            actor=actor,
        )
    return evaluation


def step_rework(*, step: Step, instructions: str, actor: Actor) -> Step:
    """Send a step back for another attempt, or fail it when its rework budget is spent."""
    directive = step.directive
    if step.rework_count >= directive.max_rework_cycles:
        step_transition(
            step=step,
            to=Step.Status.FAILED,
            actor=actor,
            severity=DirectiveEvent.Severity.ERROR,
            message=f"No rework cycles left ({step.rework_count} of {directive.max_rework_cycles} used).",
        )
        return step
    step_transition(
        step=step,
        to=Step.Status.PENDING,
        actor=actor,
        updates={"rework_count": F("rework_count") + 1, "rework_instructions": instructions},
        data={"reason": "rework"},
    )
    return step


def approval_request(
    *,
    directive: Directive,
    kind: str,
    description: str,
    step: Step | None = None,
    evaluation: Evaluation | None = None,
    context: Mapping[str, Any] | None = None,
    expires_at: Any = None,
) -> ApprovalRequest:
    with transaction.atomic():
        approval = ApprovalRequest.objects.create(
            owner_id=directive.owner_id,
            directive=directive,
            step=step,
            evaluation=evaluation,
            kind=kind,
            description=description,
            context=dict(context or {}),
            expires_at=expires_at,
        )
        event_record(
            directive_id=directive.pk,
            step_id=step.pk if step else None,
            subject_type="approval",
            subject_id=approval.pk,
            event_type="approval_requested",
            data={"kind": kind},
        )
    return approval


def approval_approve(*, approval: ApprovalRequest, actor: Actor, note: str = "") -> ApprovalRequest:
    """Approve: a reviewed step passes; a reviewed plan becomes the active chain."""
    with transaction.atomic():
        approval_transition(
            approval=approval,
            to=ApprovalRequest.Status.APPROVED,
            actor=actor,
            updates={"response_note": note, "responded_by": actor.user, "responded_at": timezone.now()},
        )
        if approval.kind == ApprovalRequest.Kind.STEP_REVIEW and approval.step_id:
            step = Step.objects.get(pk=approval.step_id)
            if step.status == Step.Status.AWAITING_APPROVAL:
                step_transition(step=step, to=Step.Status.PASSED, actor=actor, data={"approval": str(approval.pk)})
        elif approval.kind == ApprovalRequest.Kind.PLAN_REVIEW:
            directive = Directive.objects.get(pk=approval.directive_id)
            if directive.status == Directive.Status.PLANNING:
                directive_transition(
                    directive=directive, to=Directive.Status.ACTIVE, actor=actor, data={"approval": str(approval.pk)}
                )
        advance_after_commit(approval.directive_id)
    return approval


def approval_deny(*, approval: ApprovalRequest, actor: Actor, note: str = "") -> ApprovalRequest:
    """Deny: a reviewed step is reworked with the note as its instructions."""
    with transaction.atomic():
        approval_transition(
            approval=approval,
            to=ApprovalRequest.Status.DENIED,
            actor=actor,
            updates={"response_note": note, "responded_by": actor.user, "responded_at": timezone.now()},
        )
        if approval.kind == ApprovalRequest.Kind.STEP_REVIEW and approval.step_id:
            step = Step.objects.select_related("directive").get(pk=approval.step_id)
            if step.status == Step.Status.AWAITING_APPROVAL:
                step_rework(step=step, instructions=note or "A reviewer denied this step.", actor=actor)
        elif approval.kind == ApprovalRequest.Kind.PLAN_REVIEW:
            plan_review_refused(approval=approval, note=note, actor=actor)
        advance_after_commit(approval.directive_id)
    return approval


def plan_review_refused(*, approval: ApprovalRequest, note: str, actor: Actor) -> None:
    """A reviewer denied a proposed plan: its new steps are skipped (steps kept
    from earlier generations stay) and the directive is planned again with the note."""
    chain = Chain.objects.filter(pk=(approval.context or {}).get("chain")).first()
    if chain is not None:
        for step in chain.steps.filter(
            generation=chain.generation, status__in=[Step.Status.PENDING, Step.Status.READY]
        ):
            step_transition(step=step, to=Step.Status.SKIPPED, actor=actor, data={"reason": "plan denied"})
    Directive.objects.filter(pk=approval.directive_id).update(
        planning_reason=Directive.PlanningReason.PLAN_DENIED,
        planning_note=note or "The reviewer denied the plan.",
        updated_at=timezone.now(),
    )


# --------------------------------------------------------------------------- orders

ORDER_EDITABLE_FIELDS = frozenset({"title", "description", "priority", "order_type"})


def _order_clean(fields: Mapping[str, Any], *, creating: bool) -> None:
    unknown = set(fields) - ORDER_EDITABLE_FIELDS
    if unknown:
        raise ValidationError({name: "is not an order field" for name in sorted(unknown)})
    if (creating or "title" in fields) and not str(fields.get("title", "")).strip():
        raise ValidationError({"title": "must not be empty"})
    if "priority" in fields and fields["priority"] not in Order.Priority.values:
        raise ValidationError({"priority": f"must be one of {', '.join(Order.Priority.values)}"})
    if "order_type" in fields and fields["order_type"] not in Order.OrderType.values:
        raise ValidationError({"order_type": f"must be one of {', '.join(Order.OrderType.values)}"})


def order_create(*, owner: Any, actor: Actor | None = None, **fields: Any) -> Order:
    _order_clean(fields, creating=True)
    with transaction.atomic():
        order = Order.objects.create(owner=owner, **fields)
        event_record(
            directive_id=None,
            subject_type="order",
            subject_id=order.pk,
            event_type="order_created",
            data={"title": order.title},
            actor=actor or Actor.for_user(owner),
        )
    return order


def order_update(*, order: Order, actor: Actor, **fields: Any) -> Order:
    _order_clean(fields, creating=False)
    changed = sorted(name for name, value in fields.items() if getattr(order, name) != value)
    if not changed:
        return order
    with transaction.atomic():
        for name in changed:
            setattr(order, name, fields[name])
        order.save(update_fields=[*changed, "updated_at"])
        event_record(
            directive_id=order.directive_id,
            subject_type="order",
            subject_id=order.pk,
            event_type="order_updated",
            data={"fields": changed},
            actor=actor,
        )
    return order


def order_link(*, order: Order, directive: Directive, actor: Actor) -> Order:
    """Link an open order to a directive; the planner picks it up from there."""
    if directive.status in Directive.TERMINAL:
        raise Conflict(f"an order cannot be linked to a {directive.status} directive")
    if order.status == Order.Status.LINKED and order.directive_id == directive.pk:
        return order
    if order.status != Order.Status.OPEN:
        raise InvalidTransition("order", order.status, Order.Status.LINKED, reason="only an open order can be linked")
    with transaction.atomic():
        order_transition(order=order, to=Order.Status.LINKED, actor=actor, updates={"directive_id": directive.pk})
        advance_after_commit(directive.pk)
    return order


def order_unlink(*, order: Order, actor: Actor) -> Order:
    order_transition(order=order, to=Order.Status.OPEN, actor=actor, updates={"directive_id": None})
    return order


def order_cancel(*, order: Order, actor: Actor) -> Order:
    order_transition(order=order, to=Order.Status.CANCELLED, actor=actor)
    return order


ORDER_DELETABLE_STATUSES = frozenset({Order.Status.OPEN, Order.Status.CANCELLED})


def order_delete(*, order: Order, actor: Actor) -> None:
    """Delete an order no directive has taken up (open or cancelled)."""
    if order.status not in ORDER_DELETABLE_STATUSES:
        raise Conflict(f"a {order.status} order cannot be deleted; only open or cancelled orders can")
    with transaction.atomic():
        event_record(
            directive_id=order.directive_id,
            subject_type="order",
            subject_id=order.pk,
            event_type="order_deleted",
            data={"title": order.title},
            actor=actor,
        )
        order.delete()
