"""Agent output on its way to the server, and frames that fit.

:class:`OutputBatcher` turns the lines an agent emits into ``task_output``
messages (protocol.md): ``seq`` starts at 1 per task and grows by one per
line; a batch goes out when 200 lines or 64 KiB are pending, or every
``interval_s``. Lines the daemon could not send (no connection) stay pending
and go out after a reconnect: the server stores each ``(task, seq)`` once.

:class:`Throttle` sends the cumulative cost (``task_progress``) at most once
per second. :func:`clip` and :func:`fit_report` keep text fields, and so
frames, under the server's size limit (``MAKIMA_WS_MAX_BYTES``, 1 MiB by
default).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger(__name__)

#: ``send(message) -> bool``: False when the message could not go out (no connection).
Send = Callable[[dict[str, Any]], Awaitable[bool]]

#: The server's default frame limit; the daemon stays well under it.
MAX_FRAME_BYTES = 1024 * 1024
#: What a report may take, leaving room for the envelope and JSON escapes.
REPORT_BUDGET = 768 * 1024
MAX_ITEMS = 200
MAX_BATCH_BYTES = 64 * 1024
#: One line of output at most (longer ones keep their head).
MAX_LINE_BYTES = 16 * 1024
#: Summary and error of a report.
MAX_TEXT = 32_000
#: Lines kept for a task while the server cannot be reached; older ones are dropped.
MAX_BACKLOG_BYTES = 8 * 1024 * 1024

#: The streams the server accepts; what agents call their streams maps onto them.
STREAMS = ("stdout", "stderr", "agent", "system")
STREAM_ALIASES = {"assistant": "agent", "tool": "agent"}


def clean(text: str) -> str:
    """Text the server can store: no NUL (PostgreSQL refuses it), no lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def clip(text: str | None, limit: int = MAX_TEXT, *, keep: str = "both") -> str | None:
    """``text`` cut to at most ``limit`` characters with a marker saying how much went.
    ``keep``: "head", "tail" (where errors are) or "both"."""
    if text is None:
        return None
    text = clean(text)
    if len(text) <= limit:
        return text
    dropped = len(text) - limit
    marker = f"\n… [{dropped} characters cut] …\n"
    room = max(limit - len(marker), 0)
    if keep == "head":
        return text[:room] + marker
    if keep == "tail":
        return marker + text[len(text) - room :]
    head = room // 2
    return text[:head] + marker + text[len(text) - (room - head) :]


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "replace"))


def frame_size(message: dict[str, Any]) -> int:
    """The bytes ``message`` takes on the wire (as the daemon encodes it)."""
    return len(json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace"))


def fit_report(report: dict[str, Any], budget: int = REPORT_BUDGET) -> dict[str, Any]:
    """A ``task_finished`` that fits in ``budget`` bytes: summary, error and the
    verifiers' output tails are clipped, more and more until it fits."""
    fitted = dict(report)
    fitted["summary"] = clip(fitted.get("summary"), keep="head")
    fitted["error"] = clip(fitted.get("error"), keep="tail")
    results = [dict(r) for r in fitted.get("verifier_results") or []]
    for result in results:
        for key in ("name", "command", "output_tail"):
            if isinstance(result.get(key), str):
                result[key] = clip(result[key], 4000 if key == "output_tail" else 500, keep="tail")
    fitted["verifier_results"] = results
    limit = MAX_TEXT
    while frame_size(fitted) > budget and limit > 200:
        limit //= 2
        fitted["summary"] = clip(fitted["summary"], limit, keep="head")
        fitted["error"] = clip(fitted["error"], limit, keep="tail")
        for result in results:
            if isinstance(result.get("output_tail"), str):
                result["output_tail"] = clip(result["output_tail"], min(limit, 4000), keep="tail")
    if frame_size(fitted) > budget:  # thousands of verifiers: keep the verdicts, drop the detail
        fitted["verifier_results"] = [{"name": r.get("name"), "passed": bool(r.get("passed"))} for r in results][:1000]
    return fitted


class OutputBatcher:
    """Numbers one task's lines and sends them in ``task_output`` batches.

    ``add`` is called synchronously by the agent (from the event loop);
    ``run`` is the background loop that sends; ``close`` sends what is left
    and stops the loop. Lines that could not be sent stay pending."""

    def __init__(
        self,
        task_id: str,
        send: Send,
        *,
        max_items: int = MAX_ITEMS,
        max_bytes: int = MAX_BATCH_BYTES,
        interval_s: float = 0.25,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_backlog_bytes: int = MAX_BACKLOG_BYTES,
    ) -> None:
        self.task_id = task_id
        self.send = send
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.interval_s = interval_s
        self.max_line_bytes = max_line_bytes
        self.max_backlog_bytes = max_backlog_bytes
        self.seq = 0
        self.pending: deque[tuple[dict[str, Any], int]] = deque()
        self.pending_bytes = 0
        self.dropped = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._closed = False

    def add(self, stream: str, content: str) -> None:
        """Queue one line; a full batch wakes the sender at once."""
        stream = STREAM_ALIASES.get(stream, stream)
        if stream not in STREAMS:
            stream = "system"
        content = clean(content)
        size = _utf8_len(content)
        if size > self.max_line_bytes:
            head = content.encode("utf-8")[: self.max_line_bytes].decode("utf-8", "ignore")
            content = f"{head} … [{size - _utf8_len(head)} more bytes]"
            size = _utf8_len(content)
        self.seq += 1
        self.pending.append(({"seq": self.seq, "stream": stream, "content": content}, size))
        self.pending_bytes += size
        while self.pending_bytes > self.max_backlog_bytes and len(self.pending) > 1:
            # Only reached while the server is unreachable: keep the newest lines.
            _, dropped_size = self.pending.popleft()
            self.pending_bytes -= dropped_size
            self.dropped += 1
        if len(self.pending) >= self.max_items or self.pending_bytes >= self.max_bytes:
            self._wake.set()

    def _batch(self) -> list[tuple[dict[str, Any], int]]:
        batch: list[tuple[dict[str, Any], int]] = []
        size = 0
        for item in self.pending:
            if batch and (len(batch) >= self.max_items or size + item[1] > self.max_bytes):
                break
            batch.append(item)
            size += item[1]
        return batch

    async def flush(self) -> bool:
        """Send everything pending, batch by batch; False when a send failed (the rest stays)."""
        async with self._lock:
            while self.pending:
                batch = self._batch()
                message = {"type": "task_output", "task_id": self.task_id, "items": [item for item, _ in batch]}
                if not await self.send(message):
                    return False
                for _ in batch:
                    _, size = self.pending.popleft()
                    self.pending_bytes -= size
            if self.dropped:
                logger.warning("task %s: %d output lines dropped while disconnected", self.task_id, self.dropped)
                self.dropped = 0
            return True

    async def run(self) -> None:
        """Send batches until :meth:`close`: when one is full, else every ``interval_s``."""
        while not self._closed:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            if self.pending and not self._closed:
                await self.flush()

    async def close(self) -> bool:
        """Stop the loop and send what is left; False when some lines are still pending."""
        self._closed = True
        self._wake.set()
        return await self.flush()


class Throttle:
    """The latest value of something reported at most once per ``interval_s``
    (``task_progress``: the cumulative cost). ``update`` is synchronous; the
    newest value always goes out, at the latest ``interval_s`` after it came."""

    def __init__(self, send: Callable[[float], Awaitable[Any]], *, interval_s: float = 1.0) -> None:
        self.send = send
        self.interval_s = interval_s
        self.value: float | None = None
        self._sent: float | None = None
        self._last = float("-inf")
        self._timer: asyncio.Task[None] | None = None

    def update(self, value: float) -> None:
        self.value = value
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(self._later())

    async def _later(self) -> None:
        # A value that arrives while one is being sent goes out in the next round.
        while self.value is not None and self.value != self._sent:
            delay = self._last + self.interval_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            value = self.value
            self._last = time.monotonic()
            self._sent = value
            await self.send(value)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
