"""``makima daemon run``: the client side of the daemon websocket protocol.

:class:`Daemon` keeps one websocket to the server (``protocol.md``):

- connects to ``<server>/ws/daemon/`` with ``Authorization: Bearer <token>``
  and says ``hello``; after ``welcome`` it re-sends every spooled report and
  sends a ``heartbeat`` every ``heartbeat_interval_s``;
- acknowledges every command: ``spawn_task`` starts a
  :class:`~makima.worker.runner.TaskRunner`, ``interrupt_task`` cancels one,
  ``send_message`` hands input to its agent;
- reconnects after a lost connection with capped exponential backoff and
  jitter (0.5 s doubling up to 30 s, reset by a ``welcome``); a refused token
  (close code 4401) or a newer connection with the same name (4409) ends it
  with a non-zero exit status instead;
- stops cleanly on SIGINT/SIGTERM: no new tasks, running agents interrupted
  and their ``interrupted`` reports spooled, a few seconds to deliver what the
  spool holds, close code 1000, exit status 0. A second signal exits at once.

Delivery: ``task_finished`` is written to the spool (:mod:`~makima.worker.spool`)
before it is sent and deleted on ``received``; it is re-sent after every
reconnect and after a restart of the daemon. Until then its task is listed in
``running_tasks`` (hello and heartbeats), or the server would declare the task
interrupted before the report arrives. Output lines that could not be sent
wait in memory and go out after a reconnect; progress is best effort.

One daemon per workdir: it holds ``<workdir>/daemon.lock`` while it runs,
since it prunes the worktrees and re-sends the reports it finds there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import random
import signal
import socket
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from makima.worker.base import Agent, TaskSpec
from makima.worker.output import MAX_FRAME_BYTES, OutputBatcher, fit_report
from makima.worker.runner import TaskRunner, run_in_thread
from makima.worker.spool import Spool

logger = logging.getLogger("makima.daemon")

PROTOCOL = 1
#: Close codes the server uses (protocol.md).
CLOSE_UNAUTHORIZED = 4401
CLOSE_REPLACED = 4409
#: Exit statuses of ``makima daemon run``.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNAUTHORIZED = 3
EXIT_REPLACED = 4

BACKOFF_FIRST_S = 0.5
BACKOFF_CAP_S = 30.0
DEFAULT_HEARTBEAT_S = 10.0
#: How long the server may take to answer hello.
WELCOME_TIMEOUT_S = 30.0
#: After SIGINT/SIGTERM: how long to try to deliver the spool, and to wait for agents to stop.
SHUTDOWN_DELIVERY_S = 5.0
SHUTDOWN_AGENTS_S = 60.0
#: Frames from the server (a spawn_task holds the whole prompt) may be this large.
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
#: The server refuses longer ``running_tasks`` lists.
MAX_RUNNING_TASKS = 1000
#: The error of a report re-made bare after the server refused the full one.
REFUSED = "the daemon's report was refused"


def daemon_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("makima")
    except PackageNotFoundError:
        return "0.1.0"


def websocket_url(server: str) -> str:
    """``http(s)://host[/prefix]`` or ``ws(s)://…`` → ``ws(s)://host[/prefix]/ws/daemon/``."""
    parts = urlsplit(server.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ValueError(f"the server URL must be http(s):// or ws(s)://HOST, not {server!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/ws/daemon"):
        path += "/ws/daemon"
    return urlunsplit((scheme, parts.netloc, path + "/", parts.query, ""))


def backoff_delay(failures: int, *, first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_CAP_S) -> float:
    """The wait before reconnect attempt ``failures + 1``: exponential, capped, with
    jitter (between half and all of it) so that daemons cut off together do not
    come back together."""
    ceiling = min(cap, first * 2 ** min(failures, 30))
    return random.uniform(ceiling / 2, ceiling)


def encode(message: dict[str, Any]) -> str:
    try:
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate slipped through: escapes travel safely
        text = json.dumps(message, separators=(",", ":"))
    return text


class Daemon:
    """One worker daemon (see the module docs). ``agents`` maps the names the
    daemon advertises to the agents that run them; ``workspace`` defaults to a
    :class:`makima.worker.git.Workspace` on ``workdir``."""

    def __init__(
        self,
        *,
        server: str,
        token: str,
        agents: Mapping[str, Agent],
        workdir: Path,
        name: str | None = None,
        max_tasks: int = 2,
        heartbeat_s: float | None = None,
        workspace: Any = None,
        version: str | None = None,
        handle_signals: bool = True,
        shutdown_delivery_s: float = SHUTDOWN_DELIVERY_S,
        output_interval_s: float = 0.25,
        progress_interval_s: float = 1.0,
    ) -> None:
        self.url = websocket_url(server)
        self.token = token
        self.agents = dict(agents)
        self.workdir = Path(workdir).expanduser().resolve()
        self.name = name or socket.gethostname()
        self.hostname = socket.gethostname()
        self.max_tasks = max(0, int(max_tasks))
        self.heartbeat_s = heartbeat_s
        self._workspace = workspace
        self.version = version or daemon_version()
        self.handle_signals = handle_signals
        self.shutdown_delivery_s = shutdown_delivery_s
        self.output_interval_s = output_interval_s
        self.progress_interval_s = progress_interval_s

        self.spool: Spool | None = None
        self.runners: dict[str, TaskRunner] = {}
        #: Output of ended tasks that could not be sent yet (no connection).
        self.backlog: dict[str, OutputBatcher] = {}
        self.daemon_id: str | None = None
        #: The connection once the server said welcome (None otherwise): reports go here.
        self.ws: ClientConnection | None = None
        self.stopping = False
        self.exit_code = EXIT_OK
        self._connection: ClientConnection | None = None
        self._attempt: asyncio.Task[tuple[bool, int | None]] | None = None
        self._finished = False
        self._signals = 0
        self._hard_exit: int | None = None
        self._main: asyncio.Task[Any] | None = None
        self._stopper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._spool_changed = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._lock_file: Any = None

    @property
    def workspace(self) -> Any:
        if self._workspace is None:
            from makima.worker.git import Workspace

            self._workspace = Workspace(self.workdir)
        return self._workspace

    # ---------------------------------------------------------------- life cycle

    async def run(self) -> int:
        """Run until stopped; the exit status (see ``EXIT_*``)."""
        self._main = asyncio.current_task()
        if not self._lock_workdir():
            return EXIT_ERROR
        loop = asyncio.get_running_loop()
        installed: list[int] = []
        try:
            self.spool = Spool(self.workdir)
            self._check_state()
            await self._prune()
            if self.handle_signals:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                        loop.add_signal_handler(signum, self.request_stop, signum)
                        installed.append(signum)
            try:
                code = await self._connect_loop()
                if self._stopper is not None:
                    # Let the shutdown finish its last words (close, log) before the loop goes.
                    await asyncio.wait([self._stopper], timeout=5)
                return code
            except asyncio.CancelledError:
                if self._hard_exit is None:
                    raise
                await self._kill_runners()
                return self._hard_exit
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            for job in list(self._background):
                job.cancel()
            self._unlock_workdir()

    def request_stop(self, signum: int | None = None) -> None:
        """What SIGINT/SIGTERM do: the first stops cleanly, a second exits at once."""
        self._signals += 1
        what = signal.Signals(signum).name if signum else "stop requested"
        if self._signals == 1:
            logger.info("%s: stopping (interrupting %d running task(s))", what, self._active())
            self._stopper = self._spawn(self._shutdown())
        else:
            logger.warning("%s again: exiting now", what)
            self._hard_exit = 128 + (signum or signal.SIGTERM)
            if self._main is not None:
                self._main.cancel()

    def _lock_workdir(self) -> bool:
        self.workdir.mkdir(parents=True, exist_ok=True)
        handle = open(self.workdir / "daemon.lock", "a+")  # noqa: SIM115 — held while the daemon runs
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            logger.error("another daemon is using the workdir %s: give each daemon its own --workdir", self.workdir)
            return False
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle
        return True

    def _unlock_workdir(self) -> None:
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _check_state(self) -> None:
        assert self.spool is not None
        state = self.spool.load_state()
        waiting = self.spool.reports()
        if waiting:
            logger.info("%d report(s) from an earlier run wait in the spool; they go out after welcome", len(waiting))
            if state.get("name") and state["name"] != self.name:
                logger.warning(
                    "the spool's reports were made by the daemon %r; this one is named %r: the server"
                    " will refuse them (not_your_task) unless the name is the same",
                    state["name"],
                    self.name,
                )

    async def _prune(self) -> None:
        """Worktrees of an earlier run: nothing runs yet, so none is needed any more."""
        try:
            removed = await asyncio.shield(run_in_thread(self.workspace.prune, []))
        except Exception as exc:
            logger.warning("could not prune old worktrees: %s", exc)
            return
        if removed:
            logger.info("removed %d worktree(s) left by an earlier run", len(removed))

    def _spawn(self, coroutine: Any) -> asyncio.Task[Any]:
        job = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(job)
        job.add_done_callback(self._background.discard)
        return job

    # ---------------------------------------------------------------- connection

    async def _connect_loop(self) -> int:
        failures = 0
        while not self._finished:
            self._attempt = asyncio.get_running_loop().create_task(self._connect_once())
            try:
                welcomed, code = await self._attempt
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                break  # the shutdown gave up on a connection that was not there
            finally:
                self._attempt = None
            if code == CLOSE_UNAUTHORIZED:
                logger.error("token refused by the server (close code 4401): check --token / MAKIMA_DAEMON_TOKEN")
                return await self._abort(EXIT_UNAUTHORIZED)
            if code == CLOSE_REPLACED:
                logger.error(
                    "replaced: another daemon connected with the name %r (close code 4409); exiting."
                    " Give each daemon its own --name.",
                    self.name,
                )
                return await self._abort(EXIT_REPLACED)
            if self._finished:
                break
            if welcomed:
                failures = 0
            delay = backoff_delay(failures)
            failures += 1
            if self.stopping:
                delay = min(delay, 0.5)  # only a few seconds are left to deliver the spool
            logger.info("reconnecting in %.1f s", delay)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
        return self.exit_code

    async def _connect_once(self) -> tuple[bool, int | None]:
        """One connection, until it ends: (whether welcome came, the close code)."""
        try:
            async with connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self.token}"},
                user_agent_header=f"makima-daemon/{self.version}",
                max_size=MAX_RECEIVE_BYTES,
                open_timeout=10,
                ping_interval=20,
                ping_timeout=20,
                close_timeout=5,
            ) as ws:
                self._connection = ws
                try:
                    welcomed = await self._session(ws)
                finally:
                    self._connection = None
                    self.ws = None
            code = ws.close_code
            reason = ws.close_reason
        except InvalidStatus as exc:
            logger.warning("the server refused the websocket: HTTP %s", exc.response.status_code)
            return False, None
        except InvalidURI as exc:
            logger.error("%s", exc)
            self.exit_code = EXIT_USAGE
            self._finished = True
            return False, None
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
            logger.warning("cannot reach %s: %s", self.url, exc or type(exc).__name__)
            return False, None
        if code not in (CLOSE_UNAUTHORIZED, CLOSE_REPLACED) and not self._finished:
            logger.warning("connection closed (code %s%s)", code, f": {reason}" if reason else "")
        return welcomed, code

    def hello(self) -> dict[str, Any]:
        return {
            "type": "hello",
            "protocol": PROTOCOL,
            "name": self.name,
            "hostname": self.hostname,
            "version": self.version,
            # While stopping: still say hello (to deliver the spool) but take nothing new.
            "max_concurrent_tasks": 0 if self.stopping else self.max_tasks,
            "agents": sorted(self.agents),
            "running_tasks": self.running_tasks(),
        }

    async def _session(self, ws: ClientConnection) -> bool:
        try:
            await ws.send(encode(self.hello()))
            welcome = await self._await_welcome(ws)
        except ConnectionClosed:
            return False
        if welcome is None:
            return False
        self.daemon_id = str(welcome.get("daemon_id") or "")
        try:
            interval = float(self.heartbeat_s or welcome.get("heartbeat_interval_s") or DEFAULT_HEARTBEAT_S)
        except (TypeError, ValueError):
            interval = DEFAULT_HEARTBEAT_S
        interval = min(max(interval, 0.05), 3600.0)
        logger.info(
            "connected to %s as %r (daemon %s, heartbeat every %g s)", self.url, self.name, self.daemon_id, interval
        )
        assert self.spool is not None
        with contextlib.suppress(OSError):
            self.spool.save_state({"name": self.name, "server": self.url, "daemon_id": self.daemon_id})
        self.ws = ws
        heartbeat = asyncio.get_running_loop().create_task(self._heartbeats(interval))
        try:
            await self._after_welcome()
            async for raw in ws:
                await self._handle(raw)
        except ConnectionClosed:
            pass
        finally:
            self.ws = None
            heartbeat.cancel()
        return True

    async def _await_welcome(self, ws: ClientConnection) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(WELCOME_TIMEOUT_S):
                while True:
                    message = _decode(await ws.recv())
                    kind = message.get("type") if message else None
                    if kind == "welcome":
                        return message
                    if kind == "error":
                        logger.error("the server refused hello: %s: %s", message.get("code"), message.get("message"))
                    else:
                        logger.debug("ignored before welcome: %s", kind)
        except TimeoutError:
            logger.warning("no welcome within %g s; reconnecting", WELCOME_TIMEOUT_S)
            await ws.close(1000)
            return None

    async def _after_welcome(self) -> None:
        """Output left from before, then every spooled report (oldest first)."""
        for task_id, batcher in list(self.backlog.items()):
            if not await batcher.flush():
                return
            if not batcher.pending:
                self.backlog.pop(task_id, None)
        assert self.spool is not None
        reports = self.spool.reports()
        if reports:
            logger.info("re-sending %d spooled report(s)", len(reports))
        for report in reports:
            if not await self._send_report(report):
                return

    async def _send_report(self, report: dict[str, Any]) -> bool:
        if len(encode(report).encode("utf-8")) > MAX_FRAME_BYTES and report.get("type") == "task_finished":
            report = fit_report(report)  # a spool file written by hand, or an older daemon
            assert self.spool is not None
            self.spool.put(report)
        return await self.send(report)

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if not await self.send({"type": "heartbeat", "running_tasks": self.running_tasks()}):
                return

    # ---------------------------------------------------------------- sending

    async def send(self, message: dict[str, Any]) -> bool:
        """Send one message on the welcomed connection; False when there is none
        (or it just closed): the caller keeps what must not be lost."""
        ws = self.ws
        if ws is None:
            return False
        text = encode(message)
        size = len(text.encode("utf-8"))
        if size > MAX_FRAME_BYTES:
            logger.error("not sending a %s of %d bytes: over the frame limit", message.get("type"), size)
            return False
        try:
            await ws.send(text)
        except ConnectionClosed:
            return False
        return True

    def keep(self, report: dict[str, Any]) -> None:
        """A ``task_finished`` into the spool, before it is sent: until ``received``
        it is re-sent after every reconnect and restart."""
        assert self.spool is not None
        try:
            self.spool.put(report)
        except OSError as exc:
            logger.error("could not spool the report on task %s (%s): it is sent only once", report["task_id"], exc)
        self._spool_changed.set()

    async def deliver(self, report: dict[str, Any]) -> None:
        """Spool a report, then send it."""
        self.keep(report)
        await self.send(report)

    async def _ack(self, command_id: Any, ok: bool, error: str | None = None) -> None:
        if not isinstance(command_id, str):
            return
        message: dict[str, Any] = {"type": "ack", "command_id": command_id, "ok": ok}
        if not ok:
            message["error"] = (error or "refused")[:10_000]
        await self.send(message)

    # ---------------------------------------------------------------- state

    def _active(self) -> int:
        """Tasks counting against capacity: those whose report is not made yet."""
        return sum(1 for runner in self.runners.values() if not runner.reported)

    def running_tasks(self) -> list[str]:
        """What hello and heartbeats list: running tasks and those whose report awaits ``received``."""
        ids = [task_id for task_id, runner in self.runners.items() if not runner.reported]
        if self.spool is not None:
            ids += self.spool.task_ids()
        return list(dict.fromkeys(ids))[:MAX_RUNNING_TASKS]

    # ---------------------------------------------------------------- receiving

    async def _handle(self, raw: str | bytes) -> None:
        message = _decode(raw)
        if message is None:
            logger.warning("ignored a frame that is not a JSON object")
            return
        kind = message.get("type")
        handler = {
            "spawn_task": self._on_spawn_task,
            "interrupt_task": self._on_interrupt_task,
            "send_message": self._on_send_message,
            "received": self._on_received,
            "error": self._on_error,
        }.get(kind if isinstance(kind, str) else "")
        if handler is None:
            logger.warning("ignored a message of unknown type %r", kind)
            if "command_id" in message:
                await self._ack(message.get("command_id"), False, f"unknown command {kind!r}")
            return
        try:
            await handler(message)
        except Exception as exc:
            logger.exception("handling %s failed", kind)
            if "command_id" in message:
                await self._ack(message.get("command_id"), False, f"the daemon failed: {exc}")

    async def _on_spawn_task(self, message: dict[str, Any]) -> None:
        command_id = message.get("command_id")
        try:
            task = TaskSpec.from_message(message["task"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            await self._ack(command_id, False, f"invalid task: {exc!r}")
            return
        assert self.spool is not None
        runner = self.runners.get(task.id)
        if runner is not None:
            if runner.interrupted and not runner.reported:
                # The server took this task away (an interrupt_task: its lease ran out while
                # this daemon was unreachable) and now hands it back as a new attempt. The old
                # run is still stopping, and its "interrupted" report would count against the
                # new attempt: refuse, and the server dispatches it again once it is gone.
                await self._ack(command_id, False, "busy: stopping the previous run of this task")
            elif runner.reported and runner.report is not None and runner.report["id"] not in self.spool:
                # Its report was received and its worktree is being removed: a new attempt must wait.
                await self._ack(command_id, False, "busy: cleaning up the previous attempt of this task")
            else:
                await self._ack(command_id, True)  # at-least-once delivery: already ours
            return
        if self.spool.has_task(task.id):
            await self._ack(command_id, True)  # finished here; its report is on its way
            return
        if self.stopping:
            await self._ack(command_id, False, "shutting down")
            return
        agent = self.agents.get(task.agent)
        if agent is None:
            await self._ack(command_id, False, "unknown_agent")
            return
        if self._active() >= self.max_tasks:
            await self._ack(command_id, False, "capacity")
            return
        runner = TaskRunner(
            task,
            agent=agent,
            workspace=self.workspace,
            send=self.send,
            keep=self.keep,
            output_interval_s=self.output_interval_s,
            progress_interval_s=self.progress_interval_s,
        )
        self.runners[task.id] = runner
        job = runner.start()
        job.add_done_callback(lambda done, runner=runner: self._runner_done(runner, done))
        logger.info("task %s (%s %r, agent %s): started", task.id, task.kind, task.name, task.agent)
        await self._ack(command_id, True)

    def _runner_done(self, runner: TaskRunner, job: asyncio.Task[Any]) -> None:
        task_id = runner.task.id
        if self.runners.get(task_id) is runner:
            del self.runners[task_id]
        if runner.output.pending:
            self.backlog[task_id] = runner.output
        if job.cancelled():
            return
        error = job.exception()
        if error is not None:
            logger.error("task %s: the runner failed", task_id, exc_info=error)
            if not runner.reported:
                self._spawn(self._report_crash(runner, error))
        elif runner.report is not None:
            report = runner.report
            logger.info("task %s: %s%s", task_id, report["status"], f" ({report['error']})" if report["error"] else "")

    async def _report_crash(self, runner: TaskRunner, error: BaseException) -> None:
        report = fit_report(
            {
                "type": "task_finished",
                "id": str(uuid.uuid4()),
                "task_id": runner.task.id,
                "status": "failed",
                "exit_code": None,
                "summary": "",
                "error": f"the daemon failed while running the task: {error!r}",
                "branch": runner.task.branch or None,
                "commit_sha": None,
                "cost_usd": runner.cost,
                "verifier_results": [],
            }
        )
        await self.deliver(report)

    async def _on_interrupt_task(self, message: dict[str, Any]) -> None:
        task_id = message.get("task_id")
        reason = message.get("reason") or "interrupted by the server"
        runner = self.runners.get(task_id) if isinstance(task_id, str) else None
        if runner is not None and runner.interrupt(str(reason)):
            logger.info("task %s: interrupting (%s)", task_id, reason)
        await self._ack(message.get("command_id"), True)

    async def _on_send_message(self, message: dict[str, Any]) -> None:
        task_id = message.get("task_id")
        runner = self.runners.get(task_id) if isinstance(task_id, str) else None
        if runner is None or runner.reported:
            await self._ack(message.get("command_id"), False, "no such running task on this daemon")
        elif runner.send_message(str(message.get("message") or "")):
            await self._ack(message.get("command_id"), True)
        else:
            await self._ack(
                message.get("command_id"), False, f"the {runner.task.agent} agent of this task cannot take input now"
            )

    async def _on_received(self, message: dict[str, Any]) -> None:
        assert self.spool is not None
        if self.spool.delete(message.get("id")):
            logger.debug("report %s received", message.get("id"))
            self._spool_changed.set()

    async def _on_error(self, message: dict[str, Any]) -> None:
        code, text, ref = message.get("code"), message.get("message"), message.get("ref")
        logger.warning("the server says %s: %s%s", code, text, f" (about {ref})" if ref else "")
        assert self.spool is not None
        report = self.spool.get(ref) if isinstance(ref, str) else None
        if report is None:
            return
        if code == "not_your_task":
            # The task is not (or no longer) ours: re-sending it would be refused forever.
            logger.warning("dropping the report on task %s: the server says it is not this daemon's", report["task_id"])
            self.spool.delete(ref)
            self._spool_changed.set()
        elif code == "invalid" and report.get("type") == "task_finished":
            self.spool.delete(ref)
            self._spool_changed.set()
            if str(report.get("error") or "").startswith(REFUSED):
                logger.error("dropping the report on task %s: the server refuses even its bare form", report["task_id"])
                return
            # Keep the outcome, lose the detail the server could not take.
            bare = {
                "type": "task_finished",
                "id": str(uuid.uuid4()),
                "task_id": report["task_id"],
                "status": report.get("status")
                if report.get("status") in ("done", "failed", "interrupted")
                else "failed",
                "summary": "",
                "error": f"{REFUSED} ({text}); its detail is lost",
                "verifier_results": [],
            }
            await self.deliver(bare)
        elif code == "rate_limited":
            self._spawn(self._resend_later(ref))

    async def _resend_later(self, report_id: str, delay: float = 1.0) -> None:
        await asyncio.sleep(delay)
        assert self.spool is not None
        report = self.spool.get(report_id)
        if report is not None:
            await self._send_report(report)

    # ---------------------------------------------------------------- stopping

    async def _interrupt_all(self, reason: str, timeout: float) -> None:
        """Interrupt every running task and wait (up to ``timeout``) until their reports are spooled."""
        for runner in list(self.runners.values()):
            runner.interrupt(reason)
        deadline = time.monotonic() + timeout
        while any(not r.reported for r in self.runners.values()) and time.monotonic() < deadline:
            jobs = [r.job for r in self.runners.values() if r.job is not None and not r.reported]
            if not jobs:
                break
            await asyncio.wait(jobs, timeout=min(0.1, max(deadline - time.monotonic(), 0)))

    async def _shutdown(self) -> None:
        self.stopping = True
        await self._interrupt_all("the daemon is shutting down", SHUTDOWN_AGENTS_S)
        assert self.spool is not None
        deadline = time.monotonic() + self.shutdown_delivery_s
        self._wake.set()  # reconnect now if the connection is down
        while time.monotonic() < deadline and (self.spool.reports() or self.runners):
            self._spool_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._spool_changed.wait(), min(0.1, max(deadline - time.monotonic(), 0)))
        left = self.spool.reports()
        if left:
            logger.warning("%d report(s) not delivered; they are sent when the daemon runs again", len(left))
        self._finished = True
        self.exit_code = EXIT_OK
        connection = self._connection
        if connection is not None:
            await connection.close(1000, "daemon shutting down")
        elif self._attempt is not None:
            self._attempt.cancel()  # still trying to connect: nothing left to deliver through it
        self._wake.set()
        logger.info("stopped")

    async def _abort(self, code: int) -> int:
        """Leave after the server shut the door: stop the agents, keep their reports for next time."""
        self.stopping = True
        self._finished = True
        await self._interrupt_all("the daemon stopped: its connection was refused", SHUTDOWN_AGENTS_S)
        return code

    async def _kill_runners(self) -> None:
        """A second signal: cancel everything now (agents get SIGKILL)."""
        jobs = [r.job for r in self.runners.values() if r.job is not None and not r.job.done()]
        for job in jobs:
            job.cancel()
        if jobs:
            await asyncio.wait(jobs, timeout=2)


def _decode(raw: str | bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return message if isinstance(message, dict) else None


def _agent_names(options: argparse.Namespace) -> list[str]:
    values = getattr(options, "agents", None) or getattr(options, "agent", None) or ["claude"]
    if isinstance(values, str):
        values = [values]
    return [name.strip() for value in values for name in str(value).split(",") if name.strip()]


def main(options: argparse.Namespace) -> int:
    """``makima daemon run``: the parsed options in, the exit status out."""
    level = str(getattr(options, "log_level", None) or "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # websockets logs every frame at DEBUG; keep it to what matters unless asked.
    logging.getLogger("websockets").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    from makima.worker.agents import make_agents

    extra: dict[str, Any] = {}
    if getattr(options, "command_line", None):
        extra["command_line"] = options.command_line
    try:
        agents = make_agents(
            _agent_names(options),
            script=getattr(options, "script", None),
            claude_bin=getattr(options, "claude_bin", None) or "claude",
            **extra,
        )
        daemon = Daemon(
            server=getattr(options, "server", None) or "",
            token=getattr(options, "token", None) or "",
            agents=agents,
            workdir=Path(getattr(options, "workdir", None) or Path.home() / ".makima"),
            name=getattr(options, "name", None) or None,
            max_tasks=getattr(options, "max_tasks", None) or 2,
            heartbeat_s=getattr(options, "heartbeat_s", None),
        )
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    return asyncio.run(daemon.run())
