"""The dashboard's live feed: ``/ws/directives/<id>/`` (spec 5.3).

A signed-in browser that may see the directive receives its events as
``{"type": "events", "events": [...]}``. Events reach this process on the
directive's channel-layer group (``event_broadcast`` after each commit) and,
because an in-memory layer never carries another process's events (the
django-q2 cluster, a second daphne), the consumer also polls the events table.
Both paths meet in one de-duplication by event id: an event is sent once.

The page uses events only as a cue to re-fetch its partials; nothing here is
needed for correctness, the events table stays the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer
from django.db.models import Max

from daemons.protocol import TokenBucket
from directives.selectors import directives_visible_to, events_visible_to
from directives.services import directive_group, event_as_message
from makima.sockets import JsonSocketConsumer

logger = logging.getLogger(__name__)


class LiveCloseCode:
    """Close codes of the dashboard socket (the 44xx mirror HTTP statuses)."""

    UNAUTHORIZED = 4401
    NOT_FOUND = 4404


# Poll interval: with the in-memory layer the poll is the only path for other
# processes' events (they must show within 2 s); with Redis it only catches
# what a lost group message missed.
POLL_S = 1.0
POLL_S_SHARED_LAYER = 5.0
# A transaction that took an event id may commit after one with a higher id;
# ids seen less than this long ago may still have such late neighbours below them.
SETTLE_S = 5.0
# At most this many events per message (a burst is sent over several polls).
BATCH = 200
# Who may still see the directive is checked again this often (a team change).
RECHECK_S = 30.0
# Client messages are tiny; anything bigger is refused without parsing.
CLIENT_MAX_BYTES = 4096
# Sent ids remembered for de-duplication; far more than a page ever receives.
SENT_MEMORY = 10_000


def _db(function: Any) -> Any:
    return database_sync_to_async(function)


def _can_see(user: Any, directive_id: Any) -> bool:
    return directives_visible_to(user).filter(pk=directive_id).exists()


def _last_event_id(user: Any, directive_id: Any) -> int:
    return events_visible_to(user).filter(directive_id=directive_id).aggregate(last=Max("id"))["last"] or 0


def _poll(user: Any, directive_id: Any, floor: int, high: int) -> tuple[list[int], list[dict[str, Any]]]:
    """The ids in ``(floor, high]`` (to find late commits) and the events above ``high``."""
    events = events_visible_to(user).filter(directive_id=directive_id)
    window = list(events.filter(id__gt=floor, id__lte=high).values_list("id", flat=True)) if high > floor else []
    newer = [event_as_message(e) for e in events.filter(id__gt=high).order_by("id")[:BATCH]]
    return window, newer


def _events_by_id(user: Any, directive_id: Any, ids: list[int]) -> list[dict[str, Any]]:
    rows = events_visible_to(user).filter(directive_id=directive_id, id__in=ids).order_by("id")
    return [event_as_message(e) for e in rows]


def _events_after(user: Any, directive_id: Any, after: int) -> list[dict[str, Any]]:
    rows = events_visible_to(user).filter(directive_id=directive_id, id__gt=after).order_by("id")[:BATCH]
    return [event_as_message(e) for e in rows]


class DirectiveLiveConsumer(JsonSocketConsumer):
    """``/ws/directives/<uuid:directive_id>/``: one open directive page."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user: Any = None
        self.directive_id: Any = None
        self.closed = False
        # Ids sent on this socket, oldest first, for de-duplication.
        self.sent: set[int] = set()
        self.sent_order: deque[int] = deque()
        # The highest id sent ("the last event"), and the id below which no late commit is expected.
        self.high = 0
        self.floor = 0
        self.checkpoints: deque[tuple[float, int]] = deque()
        # Serialises sending between the poll loop, group messages and client requests.
        self.send_lock = asyncio.Lock()
        self.poll_task: asyncio.Task[None] | None = None
        self.bucket = TokenBucket(rate=5.0, burst=20, clock=time.monotonic)

    # ----------------------------------------------------------------------- connection

    async def connect(self) -> None:
        # Accept before closing so that the page sees 4401/4404, not a failed handshake.
        await self.accept()
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self._close(LiveCloseCode.UNAUTHORIZED)
            return
        directive_id = self.scope["url_route"]["kwargs"]["directive_id"]
        if not await _db(_can_see)(user, directive_id):
            await self._close(LiveCloseCode.NOT_FOUND)
            return
        self.user, self.directive_id = user, directive_id
        group = directive_group(directive_id)
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups.append(group)  # the base class leaves it on disconnect
        # Join first, then read the last id: an event committed in between is
        # either at most that id (already on the page's next refresh) or arrives by the group.
        self.high = self.floor = await _db(_last_event_id)(user, directive_id)
        self.checkpoints.append((time.monotonic(), self.high))
        self.poll_task = asyncio.create_task(self._poll_loop())

    async def disconnect(self, code: int) -> None:
        self.closed = True
        if self.poll_task is not None:
            self.poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poll_task

    async def _close(self, code: int) -> None:
        if not self.closed:
            self.closed = True
            await self.close(code=code)

    # ----------------------------------------------------------------------- sending

    async def _send_events(self, events: list[dict[str, Any]]) -> None:
        """Send the events this socket has not sent yet, oldest first."""
        async with self.send_lock:
            if self.closed:
                return
            fresh: list[dict[str, Any]] = []
            for event in sorted(events, key=lambda e: e.get("id") or 0):
                event_id = event.get("id")
                if not isinstance(event_id, int) or event_id in self.sent:
                    continue
                self._remember(event_id)
                fresh.append(event)
            if fresh:
                self.high = max(self.high, fresh[-1]["id"])
                await self.send_json({"type": "events", "events": fresh})

    def _remember(self, event_id: int) -> None:
        self.sent.add(event_id)
        self.sent_order.append(event_id)
        if len(self.sent_order) > SENT_MEMORY:
            self.sent.discard(self.sent_order.popleft())

    def _settle(self, now: float) -> None:
        """Move the floor up to the highest id seen at least ``SETTLE_S`` ago."""
        self.checkpoints.append((now, self.high))
        while len(self.checkpoints) > 1 and now - self.checkpoints[1][0] >= SETTLE_S:
            self.checkpoints.popleft()
        if now - self.checkpoints[0][0] >= SETTLE_S:
            self.floor = max(self.floor, self.checkpoints[0][1])

    async def poll_once(self) -> None:
        """Send what another process wrote: events above the last one sent, and
        late commits just below it."""
        window, newer = await _db(_poll)(self.user, self.directive_id, self.floor, self.high)
        missing = [event_id for event_id in window if event_id not in self.sent]
        if missing:
            await self._send_events(await _db(_events_by_id)(self.user, self.directive_id, missing[:BATCH]))
        if newer:
            await self._send_events(newer)
        self._settle(time.monotonic())

    async def _poll_loop(self) -> None:
        interval = POLL_S if isinstance(self.channel_layer, InMemoryChannelLayer) else POLL_S_SHARED_LAYER
        last_check = time.monotonic()
        while not self.closed:
            await asyncio.sleep(interval)
            try:
                if time.monotonic() - last_check >= RECHECK_S:
                    last_check = time.monotonic()
                    if not await _db(_can_see)(self.user, self.directive_id):
                        await self._close(LiveCloseCode.NOT_FOUND)
                        return
                await self.poll_once()
            except Exception:
                logger.exception("live feed of directive %s: polling failed", self.directive_id)

    # ----------------------------------------------------------------------- channel layer

    async def directive_events(self, message: dict[str, Any]) -> None:
        """``{"type": "directive.events", "events": [...]}`` from ``event_broadcast``."""
        events = message.get("events")
        if self.directive_id is None or not isinstance(events, list):
            return
        ours = [e for e in events if isinstance(e, dict) and e.get("directive") == str(self.directive_id)]
        await self._send_events(ours)

    # ----------------------------------------------------------------------- browser → server

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        """Client messages: ``{"type": "resume", "after": <event id>}`` and ``{"type": "ping"}``."""
        if self.closed or self.directive_id is None:
            return
        if not self.bucket.take():
            return  # a page that floods gets nothing more than it already has
        if text_data is None or len(text_data) > CLIENT_MAX_BYTES:
            await self._error("messages must be small JSON text frames")
            return
        try:
            content = json.loads(text_data)
        except ValueError:
            await self._error("messages must be JSON")
            return
        if not isinstance(content, dict):
            await self._error("messages must be JSON objects with a type")
            return
        kind = content.get("type")
        if kind == "resume":
            after = content.get("after")
            if not isinstance(after, int) or isinstance(after, bool) or after < 0:
                await self._error("resume: after must be an event id (a non-negative integer)")
                return
            await self._send_events(await _db(_events_after)(self.user, self.directive_id, after))
        elif kind == "ping":
            await self.send_json({"type": "pong"})
        else:
            await self._error("unknown message type")

    async def _error(self, text: str) -> None:
        if not self.closed:
            await self.send_json({"type": "error", "message": text})
