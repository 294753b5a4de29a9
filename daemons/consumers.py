"""The daemon gateway: the server side of the websocket protocol (``docs/protocol.md``).

One :class:`DaemonConsumer` per daemon socket. It authenticates the upgrade,
decodes and validates every frame (:mod:`daemons.protocol`), calls a service
for each message through ``database_sync_to_async`` and delivers the daemon's
outbox. Nothing here is needed for correctness across processes: commands
live in the database and a channel-layer ``outbox.wake`` only shortens the
wait for the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from contracts.services import (
    NotYourTask,
    task_dispatch_pending,
    task_finished_consequences,
    task_report_finished,
    task_report_output,
    task_report_paused,
    task_report_progress,
    task_report_started,
)
from daemons.authentication import bearer_from_header
from daemons.models import ApiToken, Daemon
from daemons.protocol import (
    SERVER_VERSION,
    CloseCode,
    ErrorCode,
    ProtocolError,
    TokenBucket,
    decode_frame,
    error_message,
    message_ref,
    validate_message,
)
from daemons.services import (
    DELIVER,
    REPLACED,
    UnknownCommand,
    command_ack,
    command_claim,
    daemon_disconnect,
    daemon_group,
    daemon_heartbeat,
    daemon_hello,
    token_authenticate,
    token_group,
)
from makima.logs import log_context
from makima.sockets import JsonSocketConsumer

logger = logging.getLogger(__name__)

DAEMON_TOKEN = frozenset({ApiToken.Kind.DAEMON})
# How long a message is handled again while the database is unreachable before the socket is closed.
DB_RETRY_S = 20.0
# While background outbox delivery keeps failing, how often a connection says so (no traceback).
DELIVERY_FAILURE_LOG_S = 60.0


def _db(function: Any) -> Any:
    return database_sync_to_async(function)


class TokenBuckets:
    """One rate limit per daemon token, shared by the sockets that token has open
    in this process, on top of each socket's own: opening more sockets does not
    buy a token more messages. (Each daphne process counts for itself: with N
    processes a token may send N times the rate, which stays bounded.)"""

    def __init__(self) -> None:
        self.buckets: dict[Any, tuple[TokenBucket, int]] = {}

    def join(self, token_id: Any) -> TokenBucket:
        bucket, sockets = self.buckets.get(token_id, (None, 0))
        if bucket is None:
            bucket = TokenBucket(
                rate=settings.MAKIMA_WS_TOKEN_RATE_PER_S,
                burst=settings.MAKIMA_WS_TOKEN_RATE_BURST,
                clock=time.monotonic,
            )
        self.buckets[token_id] = (bucket, sockets + 1)
        return bucket

    def leave(self, token_id: Any) -> None:
        bucket, sockets = self.buckets.get(token_id, (None, 0))
        if bucket is None:
            return
        if sockets <= 1:
            del self.buckets[token_id]  # the count starts afresh with the token's next socket
        else:
            self.buckets[token_id] = (bucket, sockets - 1)


TOKEN_BUCKETS = TokenBuckets()


class DaemonConsumer(JsonSocketConsumer):
    """``/ws/daemon/``: one connected daemon."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner: Any = None
        self.token_id: Any = None
        self.token_expires_at: Any = None
        self.daemon: Daemon | None = None
        self.connection_id = ""
        self.closed = False
        self.bucket: TokenBucket | None = None
        self.token_bucket: TokenBucket | None = None
        # Serialises outbox delivery between the poll loop, wake-ups and handlers,
        # so that commands go out in order and a batch is never interleaved.
        self.deliver_lock = asyncio.Lock()
        self.poll_task: asyncio.Task[None] | None = None
        # Background delivery failures in a row, for rate-limited logging (_deliver_in_background).
        self.delivery_failures = 0
        self.delivery_failing_since = 0.0
        self.delivery_failure_logged_at = 0.0

    # ----------------------------------------------------------------------- connection

    def _plain_token(self) -> str | None:
        for name, value in self.scope.get("headers", []):
            if name.lower() == b"authorization":
                return bearer_from_header(value)
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        values = query.get("token")
        return values[0] if values else None

    async def connect(self) -> None:
        plain = self._plain_token()
        token = await _db(token_authenticate)(plain, kinds=DAEMON_TOKEN) if plain else None
        # Accept before closing so that the client sees 4401 rather than a
        # failed handshake it could not tell from a network error.
        await self.accept()
        if token is None:
            await self._close(CloseCode.UNAUTHORIZED)
            return
        self.owner = token.owner
        self.token_id = token.pk
        # Revoking the token reaches every socket it opened through this group
        # (token_revoked below); its expiry is checked on every frame (receive).
        self.token_expires_at = token.expires_at
        group = token_group(token.pk)
        try:
            await self.channel_layer.group_add(group, self.channel_name)
            self.groups.append(group)
        except Exception:  # the outbox poll still notices a revoked token, a little later
            logger.warning("could not join %s", group, exc_info=True)
        self.bucket = TokenBucket(
            rate=settings.MAKIMA_WS_RATE_PER_S, burst=settings.MAKIMA_WS_RATE_BURST, clock=time.monotonic
        )
        self.token_bucket = TOKEN_BUCKETS.join(token.pk)

    async def disconnect(self, code: int) -> None:
        self.closed = True
        if self.token_bucket is not None:
            TOKEN_BUCKETS.leave(self.token_id)
            self.token_bucket = None
        if self.poll_task is not None:
            self.poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poll_task
        if self.daemon is not None:
            # Compare-and-set on connection_id: a replaced socket closing leaves the daemon connected.
            await _db(daemon_disconnect)(daemon_id=self.daemon.pk, connection_id=self.connection_id)

    async def _close(self, code: int) -> None:
        if not self.closed:
            self.closed = True
            await self.close(code=code)

    async def _error(self, code: ErrorCode | str, message: str, ref: Any = None) -> None:
        if not self.closed:
            await self.send_json(error_message(code, message, ref))

    # ----------------------------------------------------------------------- frames

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        """Size and rate checks on the raw frame, then JSON decoding and dispatch."""
        if self.closed:
            return
        if self.token_expires_at is not None and timezone.now() >= self.token_expires_at:
            await self._close(CloseCode.UNAUTHORIZED)  # expired while connected: nothing more is accepted
            return
        limit = settings.MAKIMA_WS_MAX_BYTES
        raw = text_data if text_data is not None else bytes_data or b""
        if _too_large(raw, limit):
            await self._error(ErrorCode.TOO_LARGE, f"frames may hold at most {limit} bytes")
            await self._close(CloseCode.TOO_LARGE)
            return
        # A frame the socket's own limit drops does not count against its token's.
        allowed = (self.bucket is None or self.bucket.take()) and (
            self.token_bucket is None or self.token_bucket.take()
        )
        if text_data is None:
            if allowed:
                await self._error(ErrorCode.BAD_JSON, "frames must be text frames holding JSON")
            else:
                await self._error(ErrorCode.RATE_LIMITED, "too many messages; this one was dropped")
            return
        try:
            message = decode_frame(text_data)
        except ProtocolError as exc:
            if allowed:
                await self._error(exc.code, exc.message, exc.ref)
            else:
                await self._error(ErrorCode.RATE_LIMITED, "too many messages; this one was dropped")
            return
        if not allowed:
            await self._error(ErrorCode.RATE_LIMITED, "too many messages; this one was dropped", message_ref(message))
            return
        await self.receive_json(message)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Dispatch one decoded message to ``handle_<type>``."""
        ref = message_ref(content)
        kind = content["type"]
        if self.daemon is None and kind != "hello":
            await self._error(ErrorCode.HELLO_REQUIRED, "the first message must be hello", ref)
            return
        # Log lines written while handling it (services included) name the daemon and the task.
        with log_context(daemon=self.daemon.name if self.daemon else content.get("name"), task=_task_id(content)):
            try:
                payload = validate_message(content)
                # validate_message accepts only the protocol's types, so this names an existing handler.
                await self._handle(kind, payload)
            except ProtocolError as exc:
                await self._error(exc.code, exc.message, exc.ref if exc.ref is not None else ref)
            except NotYourTask as exc:
                await self._error(ErrorCode.NOT_YOUR_TASK, str(exc), ref)
            except Exception:
                # A bug or a database failure: the message may be lost, so close and let
                # the daemon reconnect and re-send what it still holds (task_finished).
                logger.exception("daemon %s: handling %s failed", self._name(), kind)
                await self._close(CloseCode.INTERNAL_ERROR)

    def _name(self) -> str:
        return self.daemon.name if self.daemon is not None else "?"

    async def _handle(self, kind: str, payload: dict[str, Any]) -> None:
        """``handle_<kind>``, again while the database is unreachable (a restart or
        a failover cuts every connection for a moment; a deadlock is worth another
        try too). Closing the socket instead would lose what the daemon does not
        keep once sent (task_output batches, found by tests/faults/test_database_restart.py).
        Every message but hello is idempotent: a repeated report, ack, heartbeat
        or output batch changes nothing. A failed hello closes the socket as before:
        the daemon says hello again on a new one."""
        handler = getattr(self, f"handle_{kind}")
        if kind == "hello":
            await handler(payload)
            return
        delay, deadline = 0.1, time.monotonic() + DB_RETRY_S
        while True:
            try:
                await handler(payload)
                return
            except (OperationalError, InterfaceError) as exc:
                if self.closed or time.monotonic() + delay > deadline:
                    raise
                logger.warning("daemon %s: %s; handling %s again in %.1f s", self._name(), exc, kind, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    # ----------------------------------------------------------------------- daemon → server

    async def handle_hello(self, payload: dict[str, Any]) -> None:
        if self.daemon is not None:
            raise ProtocolError(ErrorCode.INVALID, "hello: this connection has already said hello")
        hello = await _db(daemon_hello)(
            owner=self.owner,
            token_id=self.token_id,
            name=payload["name"],
            hostname=payload["hostname"],
            version=payload["version"],
            max_concurrent_tasks=payload["max_concurrent_tasks"],
            agents=payload["agents"],
            running_tasks=payload["running_tasks"],
        )
        self.daemon, self.connection_id = hello.daemon, hello.connection_id
        group = daemon_group(self.daemon.pk)
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups.append(group)  # the base class leaves it on disconnect
        await self.send_json(
            {
                "type": "welcome",
                "daemon_id": str(self.daemon.pk),
                "heartbeat_interval_s": settings.MAKIMA_HEARTBEAT_INTERVAL_S,
                "server_version": SERVER_VERSION,
            }
        )
        for task_id in hello.interrupted_task_ids:
            await _db(task_finished_consequences)(task_id=task_id, owner_id=self.owner.pk)
        await self.deliver()
        await _db(task_dispatch_pending)(owner_ids=[self.owner.pk])
        await self.deliver()
        self.poll_task = asyncio.create_task(self._poll_outbox())

    async def handle_ack(self, payload: dict[str, Any]) -> None:
        try:
            ack = await _db(command_ack)(
                daemon=self.daemon, command_id=payload["command_id"], ok=payload["ok"], error=payload["error"]
            )
        except UnknownCommand:
            # Unknown and foreign commands get the same answer: nothing leaks about other daemons.
            raise ProtocolError(ErrorCode.INVALID, "command_id: no such command for this daemon") from None
        if ack.refused_task_id is not None:
            await _db(task_dispatch_pending)(owner_ids=[self.owner.pk], exclude_daemon_id=self.daemon.pk)

    async def handle_heartbeat(self, payload: dict[str, Any]) -> None:
        beat = await _db(daemon_heartbeat)(
            daemon=self.daemon, connection_id=self.connection_id, running_tasks=payload["running_tasks"]
        )
        if beat.reconnected:
            # While the tick took it for lost (its heartbeats lagged), new tasks found no
            # daemon and stayed pending; they are this daemon's now, as after a hello,
            # rather than at the next tick.
            await _db(task_dispatch_pending)(owner_ids=[self.owner.pk])
        if beat.reconnected or beat.interrupt_task_ids:
            # An interrupt_task for a task retried elsewhere goes out now: every
            # second its agent keeps working is wasted beside the new attempt.
            await self.deliver()

    async def handle_task_started(self, payload: dict[str, Any]) -> None:
        await _db(task_report_started)(daemon=self.daemon, **payload)

    async def handle_task_output(self, payload: dict[str, Any]) -> None:
        await _db(task_report_output)(daemon=self.daemon, task_id=payload["task_id"], items=payload["items"])

    async def handle_task_paused(self, payload: dict[str, Any]) -> None:
        await _db(task_report_paused)(daemon=self.daemon, **payload)

    async def handle_task_progress(self, payload: dict[str, Any]) -> None:
        await _db(task_report_progress)(daemon=self.daemon, **payload)

    async def handle_task_finished(self, payload: dict[str, Any]) -> None:
        report = {key: value for key, value in payload.items() if key != "id"}
        stored = await _db(task_report_finished)(daemon=self.daemon, **report)
        # The service returned, so the report is committed: the daemon may forget it.
        await self.send_json({"type": "received", "id": payload["id"]})
        if stored:
            await _db(task_finished_consequences)(task_id=payload["task_id"], owner_id=self.owner.pk)
            # What that dispatched to this daemon goes out now, without waiting for the wake-up.
            await self.deliver()

    # ----------------------------------------------------------------------- outbox

    async def deliver(self) -> None:
        """Send every queued command of this daemon, oldest first."""
        async with self.deliver_lock:
            while not self.closed and self.daemon is not None:
                delivery = await _db(command_claim)(
                    daemon_id=self.daemon.pk, connection_id=self.connection_id, token_id=self.token_id
                )
                if delivery.state == REPLACED:
                    await self._close(CloseCode.REPLACED)
                    return
                if delivery.state != DELIVER:
                    await self._close(CloseCode.UNAUTHORIZED)  # the daemon's token was revoked
                    return
                for message in delivery.messages:
                    await self.send_json(message)
                if not delivery.messages:
                    return

    async def _poll_outbox(self) -> None:
        # Another process (the tick, an API request) cannot always wake this
        # consumer (in-memory channel layer), so the outbox is also polled.
        while not self.closed:
            await asyncio.sleep(settings.MAKIMA_OUTBOX_POLL_S)
            await self._deliver_in_background()

    async def _deliver_in_background(self) -> None:
        """:meth:`deliver` for the poll loop and wake-ups, where a failure has
        nobody to go to: it is logged, and the next poll tries again.

        While the database is down every poll fails, on every connection; one
        traceback per poll would bury everything else in the log. So the first
        failure is logged with its traceback, then one line at most every
        ``DELIVERY_FAILURE_LOG_S`` while it goes on, and one when it works again.
        """
        try:
            await self.deliver()
        except Exception as exc:
            now = time.monotonic()
            self.delivery_failures += 1
            if self.delivery_failures == 1:
                self.delivery_failing_since = self.delivery_failure_logged_at = now
                logger.exception("daemon %s: outbox delivery failed", self._name())
            elif now - self.delivery_failure_logged_at >= DELIVERY_FAILURE_LOG_S:
                self.delivery_failure_logged_at = now
                logger.error(
                    "daemon %s: outbox delivery still fails (%d failures since the first, %.0f s ago; last: %s)",
                    self._name(),
                    self.delivery_failures,
                    now - self.delivery_failing_since,
                    _one_line(exc),
                )
            return
        if self.delivery_failures:
            logger.info(
                "daemon %s: outbox delivery works again after %d failures in %.0f s",
                self._name(),
                self.delivery_failures,
                time.monotonic() - self.delivery_failing_since,
            )
            self.delivery_failures = 0

    # ----------------------------------------------------------------------- channel layer

    async def outbox_wake(self, event: dict[str, Any]) -> None:
        """``{"type": "outbox.wake"}``: commands were queued for this daemon."""
        if self.closed or self.daemon is None:
            return
        await self._deliver_in_background()

    async def token_revoked(self, event: dict[str, Any]) -> None:
        """``{"type": "token.revoked", "token_id"}``: this socket's daemon token was revoked."""
        if event.get("token_id") == str(self.token_id):
            await self._close(CloseCode.UNAUTHORIZED)

    async def daemon_replaced(self, event: dict[str, Any]) -> None:
        """``{"type": "daemon.replaced", "connection_id"}``: a newer socket said hello with this name."""
        if event.get("connection_id") != self.connection_id:
            await self._close(CloseCode.REPLACED)


def _task_id(content: dict[str, Any]) -> str | None:
    """The message's ``task_id`` when it is a UUID (it is not validated yet: nothing else goes into the logs)."""
    value = content.get("task_id")
    try:
        return str(uuid.UUID(value)) if isinstance(value, str) else None
    except ValueError:
        return None


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for a log line that must stay one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _too_large(raw: str | bytes, limit: int) -> bool:
    """Whether a frame exceeds ``limit`` bytes of UTF-8, without encoding it when the length alone decides."""
    if isinstance(raw, bytes) or len(raw) > limit:
        return len(raw) > limit
    if len(raw) * 4 <= limit:
        return False  # a character is at most 4 bytes
    return len(raw.encode("utf-8", "surrogatepass")) > limit


# RFC 6455 §7.4.1 codes an endpoint may send (1004–1006 and 1015 never go on the wire).
RFC_CLOSE_CODES = frozenset({1001, 1002, 1003, *range(1007, 1015)})


def allow_rfc_close_codes_in_daphne() -> None:
    """Let daphne send the close codes the protocol uses (1009 after ``too_large``).

    Daphne hands an application's close code to autobahn's ``sendClose``,
    which accepts only 1000 and 3000–4999 and otherwise fails the socket with
    1011 (django/daphne#374). Codes RFC 6455 allows are sent as they are
    instead; everything else keeps daphne's own path. Idempotent; a no-op
    without daphne.
    """
    try:
        from daphne.ws_protocol import WebSocketProtocol
    except ImportError:  # pragma: no cover - daphne is a dependency, but the gateway does not need it
        return
    if getattr(WebSocketProtocol.serverClose, "makima_patched", False):
        return
    original = WebSocketProtocol.serverClose

    def server_close(self: Any, code: int | None = None) -> None:
        if code in RFC_CLOSE_CODES:
            self.sendCloseFrame(code=code, isReply=False)
        else:
            original(self, code=code)

    server_close.makima_patched = True  # type: ignore[attr-defined]
    WebSocketProtocol.serverClose = server_close
