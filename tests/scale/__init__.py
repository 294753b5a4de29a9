"""Scale-out tests: several daphne and django-q2 processes on one PostgreSQL
database and one Redis. The helpers below are shared with
``bench/multiprocess_latency.py``."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from tests.e2e.fake_daemon import FakeDaemon, Outcome

T = TypeVar("T")


@dataclass(frozen=True)
class Receipt:
    """When a command reached the daemon: wall clock (to compare with a
    database timestamp written by another process) and ``perf_counter``."""

    wall: float
    perf: float


class RecordingDaemon(FakeDaemon):
    """A :class:`FakeDaemon` that notes when each command arrived and sends
    heartbeats as a real daemon does (so that the tick keeps it connected).

    A daemon acknowledges a command the moment it reads it, so the time its
    ``ack`` is handed to the socket is the command's time of arrival."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands: dict[str, Receipt] = {}

    async def send(self, message: dict[str, Any]) -> None:
        if message.get("type") == "ack":
            # The first arrival counts; a redelivery would show up in the database's command rows.
            self.commands.setdefault(message["command_id"], Receipt(time.time(), time.perf_counter()))
        await super().send(message)

    async def run(self) -> None:
        beats = asyncio.create_task(self._heartbeats())
        try:
            await super().run()
        finally:
            beats.cancel()

    async def _heartbeats(self) -> None:
        while self.welcome is None:
            await asyncio.sleep(0.05)
        while True:
            await asyncio.sleep(self.welcome["heartbeat_interval_s"])
            running = [task_id for task_id, run in self.runs.items() if not run.finished_at]
            await self.send({"type": "heartbeat", "running_tasks": running})


class DaemonThread:
    """Runs a daemon on its own event loop in a background thread, so that a
    synchronous test can call the API and the ORM while the daemon answers."""

    def __init__(self, daemon: RecordingDaemon) -> None:
        self.daemon = daemon
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, name=f"daemon {daemon.name}", daemon=True)
        self.runner: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = self.loop.create_task(self.daemon.run())
        try:
            self.loop.run_until_complete(self.runner)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # reported by the test through .error
            self.error = exc
        finally:
            # Tasks still held by a behaviour die with the daemon, as on a lost machine.
            leftovers = asyncio.all_tasks(self.loop)
            for task in leftovers:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            self.loop.close()

    def start(self, timeout: float = 15.0) -> DaemonThread:
        self.thread.start()
        wait_for(lambda: self.daemon.welcome is not None or self.error is not None or None, timeout=timeout)
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        """Close the socket (as a machine that goes away does) and end the thread."""
        if self.thread.is_alive() and self.runner is not None:
            self.loop.call_soon_threadsafe(self.runner.cancel)
        self.thread.join(timeout=15)

    def __enter__(self) -> DaemonThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Held:
    """A behaviour whose tasks work until the caller finishes them (from any
    thread), one by one or all at once from then on (:meth:`release`)."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}
        self.released = False

    def finish(self, task_id: str, outcome: Outcome | None = None) -> None:
        self.outcomes[task_id] = outcome or Outcome(summary="done")

    def release(self) -> None:
        """Every task held now or started later finishes ``done``."""
        self.released = True

    async def __call__(self, daemon: FakeDaemon, task: dict[str, Any]) -> Outcome:
        while task["id"] not in self.outcomes and not self.released:
            await asyncio.sleep(0.01)
        return self.outcomes.get(task["id"]) or Outcome(summary="done")


def wait_for(
    predicate: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.005,
    message: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy. The interval only
    costs the caller time: latencies are taken from the recorded receipts.
    ``message`` describes the state when it times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    what = getattr(predicate, "__name__", predicate)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}" + (f"\n{message()}" if message else ""))


def new_commands(daemon: RecordingDaemon, seen: set[str], count: int = 1) -> Callable[[], list[str] | None]:
    """A predicate for :func:`wait_for`: the ids of ``count`` commands that arrived since ``seen``."""

    def arrived() -> list[str] | None:
        fresh = [command_id for command_id in list(daemon.commands) if command_id not in seen]
        return fresh if len(fresh) >= count else None

    return arrived


@contextlib.contextmanager
def daemon_thread(**kwargs: Any) -> Iterator[RecordingDaemon]:
    """A :class:`RecordingDaemon` connected and said hello, for the ``with`` block."""
    with DaemonThread(RecordingDaemon(**kwargs)) as thread:
        yield thread.daemon
