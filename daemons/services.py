"""Everything that changes daemons, the command outbox and API tokens."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from daemons.models import ApiToken, Daemon, DaemonCommand
from directives.services import event_record, status_transition
from makima.errors import DomainError
from makima.state import SYSTEM, Actor, InvalidTransition

logger = logging.getLogger(__name__)

# Recording "last used" on every request would turn reads into writes; once a minute is enough.
LAST_USED_RESOLUTION = timedelta(seconds=60)


def daemon_transition(
    *, daemon: Daemon, to: str, actor: Actor = SYSTEM, updates: Mapping[str, Any] | None = None
) -> bool:
    return status_transition(
        daemon,
        to=to,
        transitions=Daemon.TRANSITIONS,
        subject="daemon",
        directive_id=None,
        actor=actor,
        updates=updates,
        data={"name": daemon.name},
    )


def command_transition(
    *, command: DaemonCommand, to: str, actor: Actor = SYSTEM, updates: Mapping[str, Any] | None = None
) -> bool:
    task = command.task
    return status_transition(
        command,
        to=to,
        transitions=DaemonCommand.TRANSITIONS,
        subject="command",
        directive_id=task.directive_id if task else None,
        step_id=task.step_id if task else None,
        actor=actor,
        updates=updates,
        data={"command_type": command.command_type},
    )


def command_enqueue(
    *, daemon_id: Any, owner_id: Any, command_type: str, payload: Mapping[str, Any], task: Any = None
) -> DaemonCommand:
    """Store a command for a daemon in the outbox; it is delivered by the daemon's connection."""
    command = DaemonCommand.objects.create(
        daemon_id=daemon_id, owner_id=owner_id, task=task, command_type=command_type, payload=dict(payload)
    )
    event_record(
        directive_id=getattr(task, "directive_id", None),
        step_id=getattr(task, "step_id", None),
        subject_type="command",
        subject_id=command.pk,
        event_type="command_queued",
        data={"command_type": command_type, "daemon": str(daemon_id)},
    )
    return command


# --------------------------------------------------------------------------- tokens


def token_digest(plain: str) -> str:
    """Tokens are 256-bit random strings, so one unsalted SHA-256 pass is enough to store them safely."""
    return hashlib.sha256(plain.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class NewToken:
    token: ApiToken
    plain: str


def token_create(
    *,
    owner: Any,
    kind: str = ApiToken.Kind.USER,
    name: str = "",
    task: Any = None,
    expires_at: Any = None,
    actor: Actor | None = None,
) -> NewToken:
    """Mint a token. The plain value exists only in the returned object."""
    if kind not in ApiToken.Kind.values:
        raise ValueError(f"unknown token kind {kind!r}")
    if kind == ApiToken.Kind.TASK and task is None:
        raise ValueError("a task token needs its task")
    plain = ApiToken.PREFIXES[kind] + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(
        owner=owner,
        kind=kind,
        name=name[:200],
        prefix=plain[:12],
        digest=token_digest(plain),
        task=task,
        directive_id=getattr(task, "directive_id", None),
        contract_id=getattr(task, "contract_id", None),
        expires_at=expires_at,
    )
    if kind != ApiToken.Kind.TASK:  # a task token's birth is the task's dispatch, already logged
        event_record(
            directive_id=token.directive_id,
            subject_type="token",
            subject_id=token.pk,
            event_type="token_created",
            data={"kind": kind, "prefix": token.prefix},
            actor=actor or SYSTEM,
        )
    return NewToken(token=token, plain=plain)


def token_revoke(*, token: ApiToken, actor: Actor) -> ApiToken:
    """Revoke a token; it stops working at once. Revoking twice is a no-op."""
    if token.revoked_at is not None:
        return token
    now = timezone.now()
    if ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=now):
        token.revoked_at = now
        event_record(
            directive_id=token.directive_id,
            subject_type="token",
            subject_id=token.pk,
            event_type="token_revoked",
            data={"kind": token.kind, "prefix": token.prefix},
            actor=actor,
        )
        if token.kind == ApiToken.Kind.DAEMON:
            # Its open sockets close now (4401), not at their next outbox poll; the
            # poll stays the fallback when the channel layer cannot reach them.
            _group_send_on_commit_to(token_group(token.pk), {"type": "token.revoked", "token_id": str(token.pk)})
    return token


def token_revoke_for_task(*, task: Any) -> int:
    """A task's tokens expire when the task ends."""
    return ApiToken.objects.filter(task=task, revoked_at__isnull=True).update(revoked_at=timezone.now())


def token_authenticate(plain: str, *, kinds: frozenset[str] | None = None) -> ApiToken | None:
    """The live token for a plain value, or ``None`` when it is unknown,
    revoked, expired, of another kind, or belongs to a task that has ended."""
    if not plain or not isinstance(plain, str) or len(plain) > 200:
        return None
    digest = token_digest(plain)
    token = ApiToken.objects.select_related("owner", "task").filter(digest=digest).first()
    if token is None or not hmac.compare_digest(token.digest, digest):
        return None
    now = timezone.now()
    if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= now):
        return None
    if kinds is not None and token.kind not in kinds:
        return None
    if not token.owner.is_active:
        return None
    if token.kind == ApiToken.Kind.TASK:
        from contracts.models import Task

        if token.task is None or token.task.status in Task.FINISHED:
            return None
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token


# --------------------------------------------------------------------------- waking consumers


def daemon_group(daemon_id: Any) -> str:
    """The channel-layer group a daemon's live connection listens on."""
    return f"daemon.{daemon_id}"


def daemon_wake(*, daemon_id: Any) -> None:
    """After the current transaction commits, tell the daemon's connection that
    its outbox has work. Only a nudge: the connection also polls its outbox."""

    def send() -> None:
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(daemon_group(daemon_id), {"type": "outbox.wake"})
        except Exception:  # the poll loop delivers anyway; a wake is best effort
            logger.warning("could not wake daemon %s", daemon_id, exc_info=True)

    transaction.on_commit(send)


def token_group(token_id: Any) -> str:
    """The channel-layer group of every socket opened with a daemon token (hello or not)."""
    return f"daemon-token.{token_id}"


def _group_send_on_commit(daemon_id: Any, message: dict[str, Any]) -> None:
    """Send a channel-layer message to a daemon's connection once the current
    transaction commits. Best effort: consumers also poll the database."""
    _group_send_on_commit_to(daemon_group(daemon_id), message)


def _group_send_on_commit_to(group: str, message: dict[str, Any]) -> None:
    def send() -> None:
        from asgiref.sync import async_to_sync
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(group, message)
        except Exception:
            logger.warning("could not notify %s", group, exc_info=True)

    transaction.on_commit(send)


# --------------------------------------------------------------------------- the daemon gateway (protocol.md)

COMMAND_BATCH = 100


class UnknownCommand(DomainError):
    """An ``ack`` for a command that does not exist or belongs to another daemon."""


def _daemon_actor(daemon: Daemon) -> Actor:
    return Actor("daemon", daemon.name)


@dataclass(frozen=True)
class Hello:
    daemon: Daemon
    connection_id: str
    interrupted_task_ids: list[Any]


def daemon_hello(
    *,
    owner: Any,
    name: str,
    token_id: Any = None,
    hostname: str = "",
    version: str = "",
    max_concurrent_tasks: int = 1,
    agents: list[str] | tuple[str, ...] = (),
    running_tasks: list[str] | tuple[str, ...] = (),
) -> Hello:
    """A daemon said ``hello``: register or update its row, give this socket a
    new ``connection_id`` (an older socket of the same daemon is thereby
    replaced and told so), queue again what was sent but never acknowledged,
    and reconcile its running tasks with the server's (protocol.md, Handshake).

    The caller applies the consequences of the interrupted tasks
    (:func:`contracts.services.task_finished_consequences`) after this returns.
    """
    from contracts.services import task_reconcile_daemon

    connection_id = uuid.uuid4().hex
    now = timezone.now()
    fields: dict[str, Any] = {
        "hostname": hostname,
        "version": version,
        "max_concurrent_tasks": max_concurrent_tasks,
        "capabilities": list(agents),
        "token_id": token_id,
        "connection_id": connection_id,
        "connected_at": now,
        "last_seen_at": now,
    }
    with transaction.atomic():
        daemon, _ = Daemon.objects.get_or_create(owner=owner, name=name)
        # The row lock orders this hello against a concurrent one and against command_claim.
        daemon = Daemon.objects.select_for_update().get(pk=daemon.pk)
        actor = _daemon_actor(daemon)
        previous = daemon.connection_id
        if daemon.status == Daemon.Status.CONNECTED:
            Daemon.objects.filter(pk=daemon.pk).update(**fields, updated_at=now)
            for key, value in fields.items():
                setattr(daemon, key, value)
            if previous:
                event_record(
                    directive_id=None,
                    subject_type="daemon",
                    subject_id=daemon.pk,
                    event_type="daemon_replaced",
                    data={"name": daemon.name},
                    actor=actor,
                )
        else:
            daemon_transition(daemon=daemon, to=Daemon.Status.CONNECTED, actor=actor, updates=fields)
        # Sent on a socket that is gone and never acknowledged: deliver again (at least once).
        for command in DaemonCommand.objects.select_related("task").filter(
            daemon=daemon, status=DaemonCommand.Status.SENT
        ):
            command_transition(command=command, to=DaemonCommand.Status.QUEUED)
        interrupted, strangers = task_reconcile_daemon(daemon=daemon, running_task_ids=running_tasks)
        for task_id, task in strangers:
            command_enqueue(
                daemon_id=daemon.pk,
                owner_id=daemon.owner_id,
                task=task,
                command_type=DaemonCommand.CommandType.INTERRUPT_TASK,
                payload={"task_id": task_id, "reason": "this task is not assigned to this daemon"},
            )
        if previous:
            _group_send_on_commit(daemon.pk, {"type": "daemon.replaced", "connection_id": connection_id})
    return Hello(daemon=daemon, connection_id=connection_id, interrupted_task_ids=[t.pk for t in interrupted])


def daemon_disconnect(*, daemon_id: Any, connection_id: str) -> bool:
    """The socket ``connection_id`` closed. The daemon becomes ``disconnected``
    only if that socket was still its live one (a replaced socket closing
    changes nothing). Its tasks keep running until their lease runs out."""
    with transaction.atomic():
        daemon = Daemon.objects.select_for_update().filter(pk=daemon_id, connection_id=connection_id).first()
        if daemon is None:
            return False
        updates = {"connection_id": "", "last_seen_at": timezone.now()}
        if daemon.status == Daemon.Status.DISCONNECTED:
            Daemon.objects.filter(pk=daemon.pk).update(**updates, updated_at=timezone.now())
        else:
            daemon_transition(
                daemon=daemon, to=Daemon.Status.DISCONNECTED, actor=_daemon_actor(daemon), updates=updates
            )
    return True


@dataclass(frozen=True)
class Heartbeat:
    """What a ``heartbeat`` changed: ``reconnected`` when it brought back a daemon
    the tick had marked disconnected (the caller then hands it the tasks that
    waited meanwhile), and the ids of the tasks it was just told to interrupt
    (the caller delivers the new commands)."""

    reconnected: bool
    interrupt_task_ids: list[str]


def daemon_heartbeat(*, daemon: Daemon, connection_id: str, running_tasks: list[str] | tuple[str, ...]) -> Heartbeat:
    """``heartbeat``: the daemon and the tasks it lists are alive; listed tasks
    that are no longer its own get an ``interrupt_task`` (see
    :func:`_interrupt_strangers`)."""
    from contracts.services import task_heartbeat

    now = timezone.now()
    Daemon.objects.filter(pk=daemon.pk).update(last_seen_at=now)
    # The tick marks a daemon that was silent for too long disconnected; when
    # its socket turns out to be alive after all, it is connected again.
    reconnected = False
    current = Daemon.objects.filter(pk=daemon.pk, connection_id=connection_id).first()
    if current is not None and current.status == Daemon.Status.DISCONNECTED:
        try:
            reconnected = daemon_transition(daemon=current, to=Daemon.Status.CONNECTED, actor=_daemon_actor(current))
        except InvalidTransition:
            pass  # it changed meanwhile (drained); leave it
    listed = _uuid_strings(running_tasks)
    if not listed:
        return Heartbeat(reconnected=reconnected, interrupt_task_ids=[])
    renewed = task_heartbeat(daemon=daemon, task_ids=listed)
    # The common case: the lease renewal matched every listed task, so they are
    # all this daemon's running ones and nothing more needs reading. A socket
    # that was replaced (current is None) leaves reconciling to its successor's hello.
    if renewed == len(listed) or current is None:
        return Heartbeat(reconnected=reconnected, interrupt_task_ids=[])
    told = _interrupt_strangers(daemon=current, connection_id=connection_id, listed=listed, now=now)
    return Heartbeat(reconnected=reconnected, interrupt_task_ids=told)


def _uuid_strings(values: list[str] | tuple[str, ...]) -> set[str]:
    """The canonical form of the UUIDs among ``values`` (the gateway refuses a
    ``heartbeat`` listing anything else before it gets here)."""
    ids: set[str] = set()
    for value in values:
        try:
            ids.add(str(uuid.UUID(str(value))))
        except ValueError:
            continue
    return ids


def _interrupt_strangers(*, daemon: Daemon, connection_id: str, listed: set[str], now: Any) -> list[str]:
    """Queue an ``interrupt_task`` for every listed task that is no longer this
    daemon's, as hello does (protocol.md, Handshake); return their ids.

    A daemon that froze (SIGSTOP, a suspended machine) without its socket
    closing comes back on the same socket, and its heartbeats are then the
    first thing to reach the server: meanwhile the tick may have interrupted
    its tasks when their lease ran out and retried them elsewhere. Its agents
    must stop, or they work (and spend, and push the same branch) beside the
    new attempt. Which listed ids it is told about:

    - not one of its owner's tasks (another owner's, or no task at all): told,
      with no task attached, exactly like an unknown id, so that nothing is
      learnt about other owners' tasks;
    - assigned to another daemon, or to none (pending again): told;
    - assigned to it and ``starting``/``running``/``paused``: its own, never
      told (their leases were just renewed);
    - assigned to it and ``done``/``failed``: only the daemon itself reports
      these, and it keeps listing the task until its report's ``received``
      arrives, so not told;
    - assigned to it and ``interrupted`` or ``cancelled``: the server ended it
      (a lease that ran out, a cancel) and the work is wasted, so told. When
      the daemon itself reported ``interrupted`` and a heartbeat overtook the
      ``received``, the one interrupt it gets is a harmless no-op.

    Heartbeats come every few seconds, so a daemon is told about a task again
    only when no earlier ``interrupt_task`` for it is still queued or sent (a
    cancel queues its own), and no earlier one was acknowledged within
    ``MAKIMA_TASK_LEASE_S``: the time a daemon gets to stop the agent and
    report before it is reminded, the same grace a silent daemon gets.
    """
    from contracts.models import Task

    mine = {str(task.pk): task for task in Task.objects.filter(pk__in=listed, owner_id=daemon.owner_id)}
    own_statuses = Task.ON_DAEMON | {Task.Status.DONE, Task.Status.FAILED}

    def still_its_own(task: Task | None) -> bool:
        return task is not None and task.daemon_id == daemon.pk and task.status in own_statuses

    strangers = sorted(task_id for task_id in listed if not still_its_own(mine.get(task_id)))
    if not strangers:
        return []
    reminded_after = now - timedelta(seconds=settings.MAKIMA_TASK_LEASE_S)
    told: list[str] = []
    with transaction.atomic():
        # The row lock orders this against a concurrent hello or heartbeat of the
        # same daemon, so that the check below cannot let two interrupts through.
        if not Daemon.objects.select_for_update().filter(pk=daemon.pk, connection_id=connection_id).exists():
            return []  # replaced meanwhile: the new socket's hello reconciles
        pending = set(
            DaemonCommand.objects.filter(
                daemon_id=daemon.pk,
                command_type=DaemonCommand.CommandType.INTERRUPT_TASK,
                payload__task_id__in=strangers,
            )
            .filter(
                Q(status__in=[DaemonCommand.Status.QUEUED, DaemonCommand.Status.SENT]) | Q(acked_at__gte=reminded_after)
            )
            .values_list("payload__task_id", flat=True)
        )
        for task_id in strangers:
            if task_id in pending:
                continue
            command_enqueue(
                daemon_id=daemon.pk,
                owner_id=daemon.owner_id,
                task=mine.get(task_id),
                command_type=DaemonCommand.CommandType.INTERRUPT_TASK,
                payload={"task_id": task_id, "reason": "this task is no longer assigned to this daemon"},
            )
            told.append(task_id)
    if told:
        logger.warning(
            "daemon %s still runs %d task(s) that are no longer its own; told to interrupt %s",
            daemon.name,
            len(told),
            ", ".join(told),
        )
    return told


@dataclass(frozen=True)
class Delivery:
    """What a connection must do with its outbox: send ``messages``, or close
    because it was ``replaced`` or its token was ``revoked``."""

    state: str
    messages: list[dict[str, Any]]


DELIVER, REPLACED, REVOKED = "deliver", "replaced", "revoked"


def command_message(command: DaemonCommand) -> dict[str, Any]:
    """The protocol message for an outbox command."""
    payload = {key: value for key, value in (command.payload or {}).items() if key not in ("type", "command_id")}
    return {"type": command.command_type, "command_id": str(command.pk), **payload}


def command_claim(*, daemon_id: Any, connection_id: str, token_id: Any = None, limit: int = COMMAND_BATCH) -> Delivery:
    """Claim the daemon's queued commands (oldest first) for the socket
    ``connection_id``, marking them ``sent``; the caller sends them.

    Claiming before sending means two connections, processes or wake-ups can
    never send one command twice; a command claimed for a socket that then
    dies stays ``sent`` and is queued again by the next ``hello``.
    """
    row = Daemon.objects.filter(pk=daemon_id).values_list("connection_id", flat=True).first()
    if row != connection_id:
        return Delivery(REPLACED, [])
    if token_id is not None:
        now = timezone.now()
        live = (
            ApiToken.objects.filter(pk=token_id, revoked_at__isnull=True, owner__is_active=True)
            .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
            .exists()
        )
        if not live:
            return Delivery(REVOKED, [])
    # Cheap check first: most polls find nothing and should not take a write lock.
    if not DaemonCommand.objects.filter(daemon_id=daemon_id, status=DaemonCommand.Status.QUEUED).exists():
        return Delivery(DELIVER, [])
    messages: list[dict[str, Any]] = []
    with transaction.atomic():
        # Locking the daemon row orders this claim against a replacing hello:
        # either the claim commits first (and hello queues the commands again
        # for the new socket) or the claim sees the new connection_id.
        if not Daemon.objects.select_for_update().filter(pk=daemon_id, connection_id=connection_id).exists():
            return Delivery(REPLACED, [])
        commands = (
            DaemonCommand.objects.select_related("task")
            .filter(daemon_id=daemon_id, status=DaemonCommand.Status.QUEUED)
            # A later spawn of the same task supersedes this one (see _spawn_moved_on),
            # read in the same query rather than once per command.
            .annotate(
                superseded=Exists(
                    DaemonCommand.objects.filter(
                        task_id=OuterRef("task_id"),
                        command_type=DaemonCommand.CommandType.SPAWN_TASK,
                        created_at__gt=OuterRef("created_at"),
                    )
                )
            )
            .order_by("created_at", "pk")[:limit]
        )
        now = timezone.now()
        for command in commands:
            if _spawn_moved_on(command):
                # Queued again by a hello (or never delivered) after the task's lease ran
                # out and it was retried elsewhere, cancelled or finished: sending it would
                # have this daemon run a task that is no longer its own, beside its new
                # daemon. At-least-once delivery covers commands still due, not stale ones.
                command_transition(
                    command=command,
                    to=DaemonCommand.Status.FAILED,
                    updates={"error": "not sent: the task is no longer this daemon's to start"},
                )
                continue
            if command_transition(command=command, to=DaemonCommand.Status.SENT, updates={"sent_at": now}):
                messages.append(command_message(command))
    return Delivery(DELIVER, messages)


def _spawn_moved_on(command: DaemonCommand) -> bool:
    """Whether a ``spawn_task`` no longer applies: its task is gone, assigned to
    another daemon (or none), not on a daemon any more, or dispatched again
    since (a later attempt, even to this same daemon, carries the live task token)."""
    from contracts.models import Task

    if command.command_type != DaemonCommand.CommandType.SPAWN_TASK:
        return False
    task = command.task
    if task is None or task.daemon_id != command.daemon_id or task.status not in Task.ON_DAEMON:
        return True
    return command.superseded  # annotated by command_claim


@dataclass(frozen=True)
class Ack:
    command: DaemonCommand
    refused_task_id: Any = None


def command_ack(*, daemon: Daemon, command_id: Any, ok: bool, error: str | None = None) -> Ack:
    """``ack``: the daemon accepted (``ok``) or refused a command. A refused
    ``spawn_task`` puts its task back to ``pending`` (``refused_task_id`` tells
    the caller to dispatch again elsewhere); an accepted ``send_message``
    resumes a paused task. Acknowledging twice is a no-op."""
    from contracts.models import Task
    from contracts.services import task_refused, task_resume_after_message

    now = timezone.now()
    refused_task_id = None
    with transaction.atomic():
        command = (
            DaemonCommand.objects.select_for_update(of=("self",))
            .select_related("task")
            .filter(pk=command_id, daemon_id=daemon.pk)
            .first()
        )
        if command is None:
            raise UnknownCommand(f"no command {command_id} for this daemon")
        if command.status in DaemonCommand.TERMINAL:
            return Ack(command=command)
        actor = _daemon_actor(daemon)
        if command.status == DaemonCommand.Status.QUEUED:
            # Queued again by a reconnect but acknowledged from the first delivery.
            command_transition(command=command, to=DaemonCommand.Status.SENT, actor=actor, updates={"sent_at": now})
        if ok:
            command_transition(command=command, to=DaemonCommand.Status.ACKED, actor=actor, updates={"acked_at": now})
            if command.command_type == DaemonCommand.CommandType.SEND_MESSAGE and command.task_id:
                task_resume_after_message(daemon=daemon, task_id=command.task_id)
        else:
            reason = error or "refused"
            command_transition(
                command=command,
                to=DaemonCommand.Status.FAILED,
                actor=actor,
                updates={"acked_at": now, "error": reason},
            )
            if (
                command.command_type == DaemonCommand.CommandType.SPAWN_TASK
                and command.task_id
                and command.task is not None
                and command.task.status == Task.Status.STARTING
                and task_refused(daemon=daemon, task_id=command.task_id, reason=reason)
            ):
                refused_task_id = command.task_id
    return Ack(command=command, refused_task_id=refused_task_id)
