"""Everything that changes contracts, their files, tasks and task output."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Count, F, Max, Min, Q
from django.utils import timezone
from django.utils.text import slugify

from contracts.models import Contract, ContractFile, ContractRepository, Task, TaskOutput
from directives.models import Directive, DirectiveEvent
from directives.services import event_record, status_transition
from makima.errors import Conflict, OutOfScope
from makima.logs import log_context
from makima.state import SYSTEM, Actor, atomic_unit

logger = logging.getLogger(__name__)

FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
BODY_TYPES = frozenset({"code", "markdown", "paragraph"})


def contract_transition(
    *, contract: Contract, to: str, actor: Actor = SYSTEM, updates: Mapping[str, Any] | None = None
) -> bool:
    return status_transition(
        contract,
        to=to,
        transitions=Contract.TRANSITIONS,
        subject="contract",
        directive_id=contract.directive_id,
        step_id=contract.step_id,
        actor=actor,
        updates=updates,
    )


def task_transition(
    *,
    task: Task,
    to: str,
    actor: Actor = SYSTEM,
    updates: Mapping[str, Any] | None = None,
    expected: str | None = None,
    message: str = "",
    severity: str = DirectiveEvent.Severity.INFO,
) -> bool:
    """Move a task. A task that ends (interrupted included: a retry gets a fresh
    token) loses its task tokens at once."""
    from daemons.services import token_revoke_for_task

    values = dict(updates or {})
    now = timezone.now()
    if to == Task.Status.RUNNING:
        values.setdefault("started_at", now)
    if to in Task.FINISHED:
        values.setdefault("finished_at", now)
    with transaction.atomic():
        changed = status_transition(
            task,
            to=to,
            transitions=Task.TRANSITIONS,
            subject="task",
            directive_id=task.directive_id,
            step_id=task.step_id,
            actor=actor,
            updates=values,
            expected=expected,
            message=message,
            severity=severity,
            data={"kind": task.kind, "name": task.name},
        )
        if changed and to in Task.FINISHED:
            token_revoke_for_task(task=task)
    return changed


def contract_create(
    *,
    owner: Any,
    name: str,
    contract_type: str,
    directive: Directive | None = None,
    step: Any = None,
    description: str = "",
    phase: str = "",
    is_directive_orchestrator: bool = False,
    repositories: Iterable[Mapping[str, Any]] = (),
) -> Contract:
    with atomic_unit():
        contract = Contract.objects.create(
            owner=owner,
            name=name[:200],
            description=description,
            contract_type=contract_type,
            phase=phase,
            directive=directive,
            step=step,
            is_directive_orchestrator=is_directive_orchestrator,
        )
        ContractRepository.objects.bulk_create(
            [
                ContractRepository(
                    contract=contract,
                    name=repo.get("name", ""),
                    url=repo.get("url", ""),
                    local_path=repo.get("local_path", ""),
                    is_primary=bool(repo.get("is_primary")),
                )
                for repo in repositories
            ]
        )
        event_record(
            directive_id=directive.pk if directive else None,
            step_id=step.pk if step else None,
            subject_type="contract",
            subject_id=contract.pk,
            event_type="contract_created",
            data={"contract_type": contract_type},
        )
    return contract


def _validate_body(body: Any) -> list[dict[str, Any]] | None:
    if body is None:
        return None
    if not isinstance(body, list):
        raise ValidationError({"body": "must be a list of elements"})
    for index, element in enumerate(body, start=1):
        # isinstance first: `"type": {}` made the set lookup raise TypeError, a 500 (found by schemathesis).
        if (
            not isinstance(element, dict)
            or not isinstance(element.get("type"), str)
            or element["type"] not in BODY_TYPES
        ):
            raise ValidationError({"body": f"element {index} needs a 'type' of code, markdown or paragraph"})
        text = element.get("content", element.get("text"))
        if not isinstance(text, str):
            raise ValidationError({"body": f"element {index} needs its text in 'content' or 'text'"})
        # Every text field is text: `"language": {}` was stored and served back,
        # breaking the API's schema for every reader of the file (found by schemathesis).
        for key in ("content", "text", "language"):
            if key in element and not isinstance(element[key], str):
                raise ValidationError({"body": f"element {index}: '{key}' must be text"})
    return body


def contract_file_create(
    *, contract: Contract, name: str, content: str = "", body: Any = None, actor: Actor = SYSTEM
) -> ContractFile:
    """Add a file to a contract. Names are plain file names (no paths)."""
    # fullmatch: with match, "$" also matched before a final newline, so "chain-plan\n" got in.
    if not isinstance(name, str) or not FILE_NAME.fullmatch(name):
        raise ValidationError(
            {"name": "must be 1–200 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"}
        )
    if not isinstance(content, str):
        raise ValidationError({"content": "must be text"})
    body = _validate_body(body)
    limit = settings.MAKIMA_MAX_CONTRACT_FILE_BYTES
    size = len(content.encode("utf-8"))
    if size > limit:
        raise ValidationError({"content": f"is {size} bytes; contract files may hold at most {limit} bytes"})
    # The body counts too: without this a 4 MiB body rode along with an empty content.
    if body is not None:
        size += len(json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        if size > limit:
            raise ValidationError(
                {"body": f"content and body are {size} bytes; contract files may hold at most {limit} bytes"}
            )
    if contract.status == Contract.Status.ARCHIVED:
        raise Conflict("files cannot be added to an archived contract")
    with transaction.atomic():
        file = ContractFile.objects.create(contract=contract, name=name, content=content, body=body)
        event_record(
            directive_id=contract.directive_id,
            step_id=contract.step_id,
            subject_type="contract_file",
            subject_id=file.pk,
            event_type="contract_file_created",
            data={"contract": str(contract.pk), "name": name, "bytes": size},
            actor=actor,
        )
    return file


def contract_file_latest(*, contract: Contract, name: str) -> ContractFile | None:
    """The newest file of that name in a contract."""
    return ContractFile.objects.filter(contract=contract, name=name).order_by("-created_at").first()


def task_supervisor_complete(*, task: Task, actor: Actor) -> Task:
    """``makima supervisor complete``: the agent states its work is delivered.

    It marks the task's contract completed; the task itself ends only when its
    daemon reports ``task_finished``.
    """
    if task.status in Task.TERMINAL:
        raise Conflict(f"task is already {task.status}")
    with transaction.atomic():
        if task.supervisor_completed_at is None:
            task.supervisor_completed_at = timezone.now()
            Task.objects.filter(pk=task.pk).update(supervisor_completed_at=task.supervisor_completed_at)
            event_record(
                directive_id=task.directive_id,
                step_id=task.step_id,
                subject_type="task",
                subject_id=task.pk,
                event_type="supervisor_completed",
                actor=actor,
            )
        if task.contract_id:
            contract = Contract.objects.get(pk=task.contract_id)
            if contract.status == Contract.Status.ACTIVE:
                contract_transition(
                    contract=contract,
                    to=Contract.Status.COMPLETED,
                    actor=actor,
                    updates={"completed_at": timezone.now()},
                )
    return task


def task_output_append(*, task: Task, items: Iterable[Mapping[str, Any]]) -> int:
    """Store output lines of the task's current attempt (``task.attempt``); a
    ``(task, attempt, seq)`` already stored is ignored. Returns how many items
    were offered. Content longer than the per-line limit is cut, and an attempt
    keeps only its newest lines (:func:`task_output_trim`).

    A retried task's daemon numbers its lines from 1 again, so each attempt has
    its own seqs; ``task`` must be fresh (as :func:`task_report_output` reads
    it), or a retry's lines would be filed under the previous attempt."""
    limit = settings.MAKIMA_TASK_OUTPUT_MAX_BYTES
    attempt = task.attempt
    rows = []
    for item in items:
        content = item["content"]
        # The limit is in bytes (MAKIMA_TASK_OUTPUT_MAX_BYTES): cutting at `limit`
        # characters let a line of 4-byte characters keep four times as much.
        if len(content) > limit // 4 and len(content.encode("utf-8", "surrogatepass")) > limit:
            content = content.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore") + "\n… [cut]"
        rows.append(
            TaskOutput(
                task=task, attempt=attempt, seq=item["seq"], stream=item.get("stream", "stdout"), content=content
            )
        )
    TaskOutput.objects.bulk_create(rows, ignore_conflicts=True)
    # seqs are unique positive numbers per attempt: while none passes the limit,
    # the attempt cannot hold more lines than it, so the usual batch costs no query.
    if rows and max(row.seq for row in rows) > settings.MAKIMA_TASK_OUTPUT_MAX_LINES:
        task_output_trim(task=task, attempt=attempt)
    return len(rows)


def task_output_trim(*, task: Task, attempt: int | None = None) -> int:
    """Retention: each attempt of a task (``attempt``, by default the current
    one) keeps at most ``MAKIMA_TASK_OUTPUT_MAX_LINES`` lines of output, the
    newest; other attempts' lines are not touched. The oldest go, and a
    ``system`` line takes the place of the last one dropped (its ``seq``),
    saying that lines 1 to that ``seq`` were dropped; readers that follow with
    ``after_seq`` see nothing change. Returns how many rows were deleted.
    Without it, an agent printing without end filled the database."""
    keep = settings.MAKIMA_TASK_OUTPUT_MAX_LINES
    attempt = task.attempt if attempt is None else attempt
    lines = TaskOutput.objects.filter(task=task, attempt=attempt)
    bounds = lines.aggregate(low=Min("seq"), high=Max("seq"))
    if bounds["high"] is None or bounds["high"] - bounds["low"] + 1 <= keep:
        return 0  # seqs are unique per attempt, so there are at most `keep` rows: the usual, cheap case
    # The oldest line kept: keep - 1 lines, plus the marker.
    oldest_kept = lines.order_by("-seq").values_list("seq", flat=True)[keep - 2 : keep - 1].first()
    if oldest_kept is None:
        return 0  # gaps in seq: fewer rows than the range suggests
    marker = TaskOutput(
        task=task,
        attempt=attempt,
        seq=oldest_kept - 1,
        stream=TaskOutput.Stream.SYSTEM,
        content=(
            f"[makima] output lines 1–{oldest_kept - 1} were dropped: a task keeps at most "
            f"{keep} lines of output per attempt, the newest (MAKIMA_TASK_OUTPUT_MAX_LINES)."
        ),
    )
    with transaction.atomic():
        deleted, _ = lines.filter(seq__lt=oldest_kept).delete()
        # A concurrent trim may have put the same marker there first.
        TaskOutput.objects.bulk_create([marker], ignore_conflicts=True)
    return deleted


def task_cancel_for_directive(*, directive: Directive, actor: Actor, reason: str) -> int:
    """Cancel a directive's unfinished tasks (those on daemons are interrupted)."""
    tasks = Task.objects.filter(directive=directive).exclude(status__in=Task.FINISHED)
    return task_cancel(tasks=tasks, actor=actor, reason=reason)


def task_cancel(*, tasks: Iterable[Task], actor: Actor = SYSTEM, reason: str) -> int:
    """Cancel tasks; a task running on a daemon also gets an ``interrupt_task``
    command, and its daemon is woken to deliver it at once. A task that
    finished meanwhile is left as it is."""
    from daemons.services import command_enqueue, daemon_wake

    count = 0
    for listed in tasks:
        with transaction.atomic():
            # Re-read under a lock: the status the caller read may be stale (a
            # daemon's `task_started` committing in between), and comparing with
            # it would leave a started task running on a stopped directive.
            task = Task.objects.select_for_update().filter(pk=listed.pk).first()
            if task is None or task.status in Task.TERMINAL:
                continue
            if not task_transition(
                task=task, to=Task.Status.CANCELLED, actor=actor, message=reason, expected=task.status
            ):
                continue
            if task.daemon_id:  # it was on a daemon: stop the agent there
                command_enqueue(
                    daemon_id=task.daemon_id,
                    owner_id=task.owner_id,
                    task=task,
                    command_type="interrupt_task",
                    payload={"task_id": str(task.pk), "reason": reason},
                )
                daemon_wake(daemon_id=task.daemon_id)
        count += 1
    return count


# --------------------------------------------------------------------------- creating and dispatching tasks

DISPATCHABLE_DIRECTIVE_STATUSES = ("planning", "active", "completing")
DISPATCH_BATCH = 200


def branch_name(name: str, ident: Any) -> str:
    """``makima/<slug(name)>-<first 8 hex of id>``: safe as a git ref and a directory name."""
    slug = slugify(name)[:60].strip("-") or "task"
    return f"makima/{slug}-{str(ident).replace('-', '')[:8]}"


def task_create(
    *,
    owner: Any,
    name: str,
    kind: str,
    agent: str,
    plan: str,
    directive: Any = None,
    step: Any = None,
    contract: Contract | None = None,
    is_supervisor: bool = False,
    repository_url: str = "",
    local_path: str = "",
    base_branch: str = "main",
    branch: str = "",
    continue_from_task: Task | None = None,
    merge_branches: Iterable[str] = (),
    completion_action: str = Task.CompletionAction.BRANCH,
    verifiers: Any = (),
    priority: int = 0,
    attempt: int = 1,
    task_id: uuid.UUID | None = None,
) -> Task:
    """Create a pending task (dispatch it with :func:`task_dispatch_pending`).

    ``task_id`` lets a caller that must name the branch in the prompt before
    the task exists choose the id, so the branch's hex matches the task's id."""
    task_id = task_id or uuid.uuid4()
    with atomic_unit():
        task = Task.objects.create(
            id=task_id,
            owner=owner,
            name=name[:200],
            kind=kind,
            agent=agent,
            plan=plan,
            directive=directive,
            step=step,
            contract=contract,
            is_supervisor=is_supervisor,
            repository_url=repository_url,
            local_path=local_path,
            base_branch=base_branch,
            branch=branch or branch_name(name, task_id),
            continue_from_task=continue_from_task,
            merge_branches=list(merge_branches),
            completion_action=completion_action,
            verifiers=verifiers if verifiers == "auto" else list(verifiers or []),
            priority=priority,
            attempt=attempt,
        )
        if contract is not None and is_supervisor:
            Contract.objects.filter(pk=contract.pk).update(supervisor_task=task)
        event_record(
            directive_id=getattr(directive, "pk", None),
            step_id=getattr(step, "pk", None),
            subject_type="task",
            subject_id=task.pk,
            event_type="task_created",
            data={"kind": kind, "name": task.name, "agent": agent, "attempt": attempt},
        )
    return task


def task_spawn_payload(*, task: Task, token: str) -> dict[str, Any]:
    """The ``task`` object of a ``spawn_task`` command (protocol.md)."""
    continue_from = None
    if task.continue_from_task_id:
        previous = task.continue_from_task  # loaded with the task by the dispatcher
        continue_from = {"task_id": str(previous.pk), "branch": previous.branch}
    env = {
        "MAKIMA_URL": settings.MAKIMA_PUBLIC_URL,
        "MAKIMA_API_KEY": token,
        "MAKIMA_TASK_ID": str(task.pk),
        "MAKIMA_DIRECTIVE_ID": str(task.directive_id or ""),
        "MAKIMA_CONTRACT_ID": str(task.contract_id or ""),
        "MAKIMA_STEP_ID": str(task.step_id or ""),
    }
    return {
        "id": str(task.pk),
        "name": task.name,
        "kind": task.kind,
        "agent": task.agent,
        "plan": task.plan,
        "repository_url": task.repository_url,
        "local_path": task.local_path or None,
        "base_branch": task.base_branch,
        "branch": task.branch,
        "continue_from": continue_from,
        "merge_branches": list(task.merge_branches or []),
        "completion_action": task.completion_action,
        "verifiers": task.verifiers,
        "timeout_s": task.timeout_s,
        "env": env,
    }


def _pick_daemon(task: Task, daemons: list[Any], load: dict[Any, int], exclude: Any) -> Any:
    candidates = [
        d
        for d in daemons
        if d.owner_id == task.owner_id
        and d.pk != exclude
        and task.agent in (d.capabilities or [])
        and load[d.pk] < d.max_concurrent_tasks
    ]
    if not candidates:
        return None
    # Least loaded first (by share of capacity, then absolute), ties by name for stable choices.
    return min(candidates, key=lambda d: (load[d.pk] / d.max_concurrent_tasks, load[d.pk], d.name))


def task_dispatch_pending(
    *, owner_ids: Iterable[Any] | None = None, directive_ids: Iterable[Any] | None = None, exclude_daemon_id: Any = None
) -> list[Task]:
    """Send pending tasks to connected daemons of their owner that run the
    task's agent and have free capacity, least loaded first.

    Safe to run concurrently: daemon rows are locked (capacity decisions are
    serialised per daemon) and every task moves by compare-and-set on
    ``(status, version)``, so no task is dispatched twice. Returns the tasks
    dispatched by this call.
    """
    from daemons.models import Daemon
    from daemons.services import command_enqueue, daemon_wake, token_create
    from directives.models import Step
    from directives.services import step_transition

    pending = Task.objects.filter(status=Task.Status.PENDING).filter(
        Q(directive__isnull=True) | Q(directive__status__in=DISPATCHABLE_DIRECTIVE_STATUSES)
    )
    if owner_ids is not None:
        pending = pending.filter(owner_id__in=list(owner_ids))
    if directive_ids is not None:
        pending = pending.filter(directive_id__in=list(directive_ids))
    candidates = list(
        pending.select_related("owner", "continue_from_task").order_by("-priority", "created_at")[:DISPATCH_BATCH]
    )
    if not candidates:
        return []
    dispatched: list[Task] = []
    with transaction.atomic():
        # Lock the owners' connected daemons first (always in the same order) so
        # that two dispatchers cannot both fill a daemon's last slot.
        daemons = list(
            Daemon.objects.select_for_update()
            .filter(owner_id__in={t.owner_id for t in candidates}, status=Daemon.Status.CONNECTED)
            .order_by("pk")
        )
        if not daemons:
            return []
        load = dict.fromkeys((d.pk for d in daemons), 0)
        for daemon_id, count in (
            Task.objects.filter(daemon_id__in=load.keys(), status__in=list(Task.ON_DAEMON))
            .values("daemon_id")
            .annotate(n=Count("id"))
            .values_list("daemon_id", "n")
        ):
            load[daemon_id] = count
        woken = set()
        for task in candidates:
            daemon = _pick_daemon(task, daemons, load, exclude_daemon_id)
            if daemon is None:
                continue
            changed = Task.objects.filter(pk=task.pk, status=Task.Status.PENDING, version=task.version).update(
                status=Task.Status.STARTING,
                daemon=daemon,
                version=F("version") + 1,
                last_heartbeat_at=timezone.now(),
                updated_at=timezone.now(),
            )
            if changed != 1:
                continue  # another dispatcher took it
            load[daemon.pk] += 1
            task.status, task.daemon, task.version = Task.Status.STARTING, daemon, task.version + 1
            event_record(
                directive_id=task.directive_id,
                step_id=task.step_id,
                subject_type="task",
                subject_id=task.pk,
                event_type="task_starting",
                data={"from": Task.Status.PENDING, "to": Task.Status.STARTING, "daemon": daemon.name},
            )
            token = token_create(owner=task.owner, kind="task", task=task, name=f"task {task.pk}")
            command_enqueue(
                daemon_id=daemon.pk,
                owner_id=task.owner_id,
                task=task,
                command_type="spawn_task",
                payload={"task": task_spawn_payload(task=task, token=token.plain)},
            )
            if task.step_id and task.kind == Task.Kind.EXECUTION:
                step = Step.objects.get(pk=task.step_id)  # fresh: it may have moved since the read above
                if step.status in (Step.Status.READY, Step.Status.PENDING):
                    if step.status == Step.Status.PENDING:
                        step_transition(step=step, to=Step.Status.READY)
                    step_transition(step=step, to=Step.Status.RUNNING, data={"task": str(task.pk)})
            woken.add(daemon.pk)
            dispatched.append(task)
        for daemon_id in woken:
            daemon_wake(daemon_id=daemon_id)
    return dispatched


# --------------------------------------------------------------------------- daemon reports (protocol.md)


class NotYourTask(OutOfScope):
    """A daemon reported on a task that is not (or no longer) assigned to it."""


def _daemon_actor(daemon: Any) -> Actor:
    return Actor("daemon", daemon.name)


def _cost(value: float) -> Decimal:
    """A reported cost in dollars as the model's 4-decimal amount."""
    return Decimal(str(value)).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)


def _own_task(*, daemon: Any, task_id: Any, lock: bool = False) -> Task:
    """The task if it is assigned to ``daemon``, else :class:`NotYourTask`
    (the same answer for unknown tasks and other daemons' tasks)."""
    tasks = Task.objects.select_for_update() if lock else Task.objects.all()
    task = tasks.filter(pk=task_id, daemon_id=daemon.pk).first()
    if task is None:
        raise NotYourTask(f"task {task_id} is not assigned to this daemon")
    return task


def task_reconcile_daemon(
    *, daemon: Any, running_task_ids: Iterable[Any]
) -> tuple[list[Task], list[tuple[str, Task | None]]]:
    """Compare what a (re)connecting daemon runs with what the server assigned to it.

    Returns the tasks interrupted because the daemon no longer runs them, and
    the ids the daemon runs that are not assigned to it (with the task when it
    is one of the daemon owner's), which the caller tells it to interrupt.
    Call inside the hello transaction.
    """
    from daemons.models import DaemonCommand

    listed = {str(task_id) for task_id in running_task_ids}
    assigned = list(Task.objects.select_for_update().filter(daemon_id=daemon.pk, status__in=list(Task.ON_DAEMON)))
    # A task dispatched while the daemon was away (or whose spawn_task was lost
    # with the previous socket) is `starting` with its spawn_task still to be
    # delivered: the daemon cannot list it yet, and the command is on its way.
    undelivered = set(
        DaemonCommand.objects.filter(
            daemon_id=daemon.pk,
            command_type=DaemonCommand.CommandType.SPAWN_TASK,
            status__in=[DaemonCommand.Status.QUEUED, DaemonCommand.Status.SENT],
            task_id__in=[t.pk for t in assigned],
        ).values_list("task_id", flat=True)
    )
    interrupted: list[Task] = []
    now = timezone.now()
    for task in assigned:
        if str(task.pk) in listed or (task.status == Task.Status.STARTING and task.pk in undelivered):
            continue
        if task_transition(
            task=task,
            to=Task.Status.INTERRUPTED,
            actor=_daemon_actor(daemon),
            updates={"error": "its daemon reconnected without it"},
            message=f"Daemon {daemon.name} reconnected and no longer runs this task.",
            severity=DirectiveEvent.Severity.WARN,
        ):
            interrupted.append(task)
    Task.objects.filter(daemon_id=daemon.pk, pk__in=listed, status__in=list(Task.ON_DAEMON)).update(
        last_heartbeat_at=now
    )
    strangers = sorted(listed - {str(t.pk) for t in assigned})
    known = {str(t.pk): t for t in Task.objects.filter(pk__in=strangers, owner_id=daemon.owner_id)}
    return interrupted, [(task_id, known.get(task_id)) for task_id in strangers]


def task_heartbeat(*, daemon: Any, task_ids: Iterable[Any]) -> int:
    """The daemon still runs these tasks: renew their lease."""
    return Task.objects.filter(daemon_id=daemon.pk, pk__in=list(task_ids), status__in=list(Task.ON_DAEMON)).update(
        last_heartbeat_at=timezone.now()
    )


def task_report_started(
    *, daemon: Any, task_id: Any, branch: str | None = None, base_commit: str | None = None
) -> Task:
    """``task_started``: the task runs (a paused one resumes). Repeats are harmless;
    a report about a task that already ended changes nothing."""
    updates: dict[str, Any] = {}
    if branch:
        updates["branch"] = branch
    if base_commit:
        updates["base_commit"] = base_commit
    with transaction.atomic():
        task = _own_task(daemon=daemon, task_id=task_id, lock=True)
        if task.status == Task.Status.STARTING:
            task_transition(task=task, to=Task.Status.RUNNING, actor=_daemon_actor(daemon), updates=updates)
        elif task.status == Task.Status.PAUSED:
            _task_resume(task, daemon=daemon, updates=updates)
        elif task.status == Task.Status.RUNNING and updates:
            Task.objects.filter(pk=task.pk).update(**updates, updated_at=timezone.now())
    return task


def _task_resume(task: Task, *, daemon: Any, updates: Mapping[str, Any] | None = None) -> bool:
    # Keep the first start time: task_transition would stamp a new one on every move to running.
    return task_transition(
        task=task,
        to=Task.Status.RUNNING,
        expected=Task.Status.PAUSED,
        actor=_daemon_actor(daemon),
        updates={**(updates or {}), "question": "", "started_at": task.started_at or timezone.now()},
        message="Resumed.",
    )


def task_resume_after_message(*, daemon: Any, task_id: Any) -> bool:
    """The daemon acknowledged a ``send_message`` for a paused task: the agent has its answer and runs again."""
    with transaction.atomic():
        task = Task.objects.select_for_update().filter(pk=task_id, daemon_id=daemon.pk).first()
        if task is None or task.status != Task.Status.PAUSED:
            return False
        return _task_resume(task, daemon=daemon)


def task_report_output(*, daemon: Any, task_id: Any, items: Iterable[Mapping[str, Any]]) -> int:
    """``task_output``: store a batch of lines, each ``(task, attempt, seq)`` once.
    Lines of a task that already ended are kept too (a daemon may re-send after a
    reconnect). The lines belong to the task's current attempt: only the daemon
    the task is assigned to now may report (a retry clears the assignment, so a
    lost daemon's late lines are refused), and the task row read here to check
    that is the one that says which attempt it runs — no query more per batch."""
    task = _own_task(daemon=daemon, task_id=task_id)
    return task_output_append(task=task, items=items)


def task_report_paused(*, daemon: Any, task_id: Any, question: str) -> Task:
    """``task_paused``: the agent waits for input (answered with ``send_message``)."""
    with transaction.atomic():
        task = _own_task(daemon=daemon, task_id=task_id, lock=True)
        actor = _daemon_actor(daemon)
        if task.status == Task.Status.STARTING:
            # task_started was lost or raced: the task evidently ran before it paused.
            task_transition(task=task, to=Task.Status.RUNNING, actor=actor)
        if task.status == Task.Status.RUNNING:
            task_transition(
                task=task, to=Task.Status.PAUSED, actor=actor, updates={"question": question}, message=question[:1000]
            )
        elif task.status == Task.Status.PAUSED and task.question != question:
            Task.objects.filter(pk=task.pk).update(question=question, updated_at=timezone.now())
            task.question = question
    return task


def task_report_progress(*, daemon: Any, task_id: Any, cost_usd: float) -> bool:
    """``task_progress``: the cumulative cost so far. Ignored once the task has ended
    (its final cost came with ``task_finished``)."""
    task = _own_task(daemon=daemon, task_id=task_id)
    return bool(
        Task.objects.filter(pk=task.pk, status__in=list(Task.ON_DAEMON)).update(
            cost_usd=_cost(cost_usd), updated_at=timezone.now()
        )
    )


def task_report_finished(
    *,
    daemon: Any,
    task_id: Any,
    status: str,
    exit_code: int | None = None,
    summary: str | None = None,
    error: str | None = None,
    branch: str | None = None,
    commit_sha: str | None = None,
    cost_usd: float | None = None,
    verifier_results: list[dict[str, Any]] | None = None,
) -> bool:
    """``task_finished``: store the task's end. Returns ``True`` when this call
    stored it, ``False`` for a report about a task that had already ended.

    The task's final cost is added to its directive's total in the same
    transaction as the status change, so exactly once: the compare-and-set on
    the status lets one report win.
    """
    if status not in (Task.Status.DONE, Task.Status.FAILED, Task.Status.INTERRUPTED):
        raise ValueError(f"a daemon cannot finish a task as {status!r}")
    with transaction.atomic():
        task = _own_task(daemon=daemon, task_id=task_id, lock=True)
        if task.status in Task.FINISHED:
            # Ended here first (cancelled, or interrupted by its lease): the
            # outcome stands, but the money the agent spent until it stopped counts.
            ended_here = task.status in (Task.Status.CANCELLED, Task.Status.INTERRUPTED)
            if ended_here and cost_usd is not None and _cost(cost_usd) > task.cost_usd:
                extra = _cost(cost_usd) - task.cost_usd
                Task.objects.filter(pk=task.pk).update(cost_usd=_cost(cost_usd), updated_at=timezone.now())
                if task.directive_id:
                    Directive.objects.filter(pk=task.directive_id).update(total_cost_usd=F("total_cost_usd") + extra)
            return False
        if task.status not in Task.ON_DAEMON:
            raise NotYourTask(f"task {task_id} is not running on this daemon")
        cost = _cost(cost_usd) if cost_usd is not None else task.cost_usd
        updates: dict[str, Any] = {
            "exit_code": exit_code,
            "summary": summary or "",
            "error": error or "",
            "cost_usd": cost,
            "verifier_results": list(verifier_results or []),
        }
        if branch:
            updates["branch"] = branch
        if commit_sha:
            updates["commit_sha"] = commit_sha
        changed = task_transition(
            task=task,
            to=status,
            actor=_daemon_actor(daemon),
            updates=updates,
            message=(error or summary or "")[:1000],
            severity=DirectiveEvent.Severity.INFO if status == Task.Status.DONE else DirectiveEvent.Severity.WARN,
        )
        if changed and task.directive_id and cost:
            Directive.objects.filter(pk=task.directive_id).update(total_cost_usd=F("total_cost_usd") + cost)
    return changed


def task_refused(*, daemon: Any, task_id: Any, reason: str) -> bool:
    """The daemon refused a ``spawn_task`` (``ack`` with ``ok: false``): the task
    goes back to ``pending`` for another daemon, and its step back to ``ready``.
    Its task token is revoked; the next dispatch mints a new one."""
    from daemons.services import token_revoke_for_task
    from directives.models import Step
    from directives.services import step_transition

    with transaction.atomic():
        task = Task.objects.select_for_update().filter(pk=task_id, daemon_id=daemon.pk).first()
        if task is None or task.status != Task.Status.STARTING:
            return False  # it moved on meanwhile (cancelled, or already re-dispatched)
        if not task_transition(
            task=task,
            to=Task.Status.PENDING,
            expected=Task.Status.STARTING,
            actor=_daemon_actor(daemon),
            updates={"daemon": None, "version": F("version") + 1},
            message=f"Daemon {daemon.name} refused the task: {reason}"[:1000],
            severity=DirectiveEvent.Severity.WARN,
        ):
            return False
        token_revoke_for_task(task=task)
        if task.step_id and task.kind == Task.Kind.EXECUTION:
            step = Step.objects.filter(pk=task.step_id).first()
            if step is not None and step.status == Step.Status.RUNNING:
                step_transition(step=step, to=Step.Status.READY, data={"reason": "a daemon refused the task"})
    return True


def task_finished_consequences(*, task_id: Any, owner_id: Any) -> None:
    """After a task ended (and that was committed): let the directive lifecycle
    react at once, then use the freed capacity. Failures are logged, not raised:
    the report is stored and the orchestrator tick retries both."""
    from directives.lifecycle import on_task_finished

    with log_context(task=task_id):  # on_task_finished adds the directive and step
        try:
            on_task_finished(task_id=task_id)  # ends with the owner-wide dispatch
            return
        except Exception:
            logger.exception("handling the end of task %s failed", task_id)
        try:
            task_dispatch_pending(owner_ids=[owner_id])
        except Exception:
            logger.exception("dispatching pending tasks of owner %s failed", owner_id)


# --------------------------------------------------------------------------- answering a paused task

# An answer travels to the daemon in one websocket frame; keep it far below the frame limit.
TASK_MESSAGE_MAX_CHARS = 10_000


def task_answer(*, task: Task, message: str, actor: Actor) -> Any:
    """A person answers a paused task's question: queue a ``send_message`` for
    its daemon and wake the daemon's connection. Returns the ``DaemonCommand``.

    The task stays ``paused`` until the daemon acknowledges the command
    (:func:`task_resume_after_message`). Raises ``Conflict`` when the task is
    not paused, has no daemon, or an earlier answer is still on its way.
    """
    from daemons.models import DaemonCommand
    from daemons.services import command_enqueue, daemon_wake

    if not isinstance(message, str) or not message.strip():
        raise ValidationError({"message": "must not be empty"})
    if len(message) > TASK_MESSAGE_MAX_CHARS:
        raise ValidationError({"message": f"may hold at most {TASK_MESSAGE_MAX_CHARS} characters"})
    with transaction.atomic():
        # The row lock orders two answers (two tabs, a double click) and the daemon's reports.
        current = Task.objects.select_for_update().filter(pk=task.pk).first()
        if current is None:
            raise Conflict("the task no longer exists")
        if current.status != Task.Status.PAUSED:
            raise Conflict(f"only a paused task can be answered; this one is {current.status}")
        if current.daemon_id is None:
            raise Conflict("the task has no daemon to deliver the answer to")
        undelivered = DaemonCommand.objects.filter(
            task=current,
            command_type=DaemonCommand.CommandType.SEND_MESSAGE,
            status__in=[DaemonCommand.Status.QUEUED, DaemonCommand.Status.SENT],
        )
        if undelivered.exists():
            raise Conflict("an answer to this task is already on its way to its daemon")
        command = command_enqueue(
            daemon_id=current.daemon_id,
            owner_id=current.owner_id,
            task=current,
            command_type=DaemonCommand.CommandType.SEND_MESSAGE,
            payload={"task_id": str(current.pk), "message": message},
        )
        event_record(
            directive_id=current.directive_id,
            step_id=current.step_id,
            subject_type="task",
            subject_id=current.pk,
            event_type="task_answered",
            message=message[:1000],
            data={"command": str(command.pk), "name": current.name},
            actor=actor,
        )
        daemon_wake(daemon_id=current.daemon_id)
    return command
