"""The daemon against a real server: daphne on a free port with a fresh
database (``tests.e2e.stack``), the daemon in-process with in-test agents and
real git repositories in tmp_path. One server for the module; each test uses
its own daemon names and stops its directives, so that none leaves work for
the next."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from makima.worker.base import AgentResult, Worktree
from makima.worker.daemon import (
    EXIT_OK,
    EXIT_REPLACED,
    EXIT_UNAUTHORIZED,
    Daemon,
    backoff_delay,
    websocket_url,
)
from makima.worker.spool import Spool
from tests.e2e.fake_daemon import api
from tests.e2e.stack import Stack, running_stack
from tests.worker.test_runner import (  # noqa: F401 — hermetic_git is an autouse fixture
    StubAgent,
    git,
    hermetic_git,
    make_remote,
    sleeps_forever,
    writes_a_file,
)


@pytest.fixture(scope="module")
def stack() -> Any:
    with running_stack() as server:
        yield server


class Rest:
    """The REST API as alice; every directive made here is stopped at the end."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.directives: list[str] = []

    async def __call__(self, method: str, path: str, body: Any = None) -> Any:
        return await asyncio.to_thread(api, self.stack.base_url, method, path, self.stack.api_key, body)

    async def start_directive(self, remote: Path, title: str) -> dict[str, Any]:
        """A one-step directive (judged by its verifier) started: its execution task is dispatched."""
        directive = await self(
            "POST",
            "/api/v1/directives/",
            {
                "title": title,
                "goal": "Write hello.txt",
                "repository_url": str(remote),
                "agent": "scripted",
                "evaluation_mode": "verifiers",
                "verifiers": ["test -f hello.txt"],
            },
        )
        self.directives.append(directive["id"])
        await self(
            "POST",
            f"/api/v1/directives/{directive['id']}/steps/batch/",
            {"steps": [{"name": f"{title} step", "task_plan": "Write hello.txt"}]},
        )
        await self("POST", f"/api/v1/directives/{directive['id']}/start/")
        return directive

    async def execution_task(self, directive_id: str) -> dict[str, Any] | None:
        page = await self("GET", f"/api/v1/tasks/?directive={directive_id}&kind=execution")
        tasks = page["results"] if isinstance(page, dict) else page
        return tasks[0] if tasks else None

    async def task(self, task_id: str) -> dict[str, Any]:
        return await self("GET", f"/api/v1/tasks/{task_id}/")

    async def events(self, directive_id: str) -> list[dict[str, Any]]:
        page = await self("GET", f"/api/v1/directives/{directive_id}/events/?page_size=1000")
        return page["results"] if isinstance(page, dict) else page

    def stop_all(self) -> None:
        for directive_id in self.directives:
            with contextlib.suppress(AssertionError):
                api(self.stack.base_url, "POST", f"/api/v1/directives/{directive_id}/stop/", self.stack.api_key)


@pytest.fixture
def rest(stack):
    client = Rest(stack)
    yield client
    client.stop_all()


@pytest.fixture
def remote(tmp_path) -> Path:
    return make_remote(tmp_path)


async def eventually(check: Callable[[], Awaitable[Any] | Any], *, timeout: float = 30, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.1)


def make_daemon(stack: Stack, tmp_path: Path, name: str, agent: StubAgent, cls: type[Daemon] = Daemon, **kw) -> Daemon:
    options: dict[str, Any] = {
        "server": stack.base_url,
        "token": stack.daemon_token,
        "agents": {"scripted": agent},
        "workdir": tmp_path / name,
        "name": name,
        "heartbeat_s": 0.3,
        "handle_signals": False,
        "shutdown_delivery_s": 3,
        "output_interval_s": 0.05,
        **kw,
    }
    return cls(**options)


@contextlib.asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[asyncio.Task[int]]:
    """The daemon, connected; stopped cleanly at the end."""
    job = asyncio.create_task(daemon.run())
    try:
        await eventually(lambda: daemon.ws is not None or job.done(), what="welcome")
        assert not job.done(), job.result()
        yield job
    finally:
        if not job.done():
            daemon.request_stop()
            await asyncio.wait_for(job, 30)


async def task_of(rest: Rest, directive_id: str, status: str | set[str]) -> dict[str, Any]:
    wanted = {status} if isinstance(status, str) else status

    async def check() -> dict[str, Any] | None:
        task = await rest.execution_task(directive_id)
        return task if task and task["status"] in wanted else None

    return await eventually(check, what=f"an execution task {wanted}")


def finished_events(events: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e["subject_id"] == task_id and e["event_type"] in ("task_done", "task_failed")]


# --------------------------------------------------------------------------- pure helpers


def test_server_urls_become_the_daemon_endpoint():
    assert websocket_url("http://h:8000") == "ws://h:8000/ws/daemon/"
    assert websocket_url("https://h/makima/") == "wss://h/makima/ws/daemon/"
    assert websocket_url("ws://h/ws/daemon/") == "ws://h/ws/daemon/"
    assert websocket_url("wss://h") == "wss://h/ws/daemon/"
    with pytest.raises(ValueError):
        websocket_url("h:8000")


def test_backoff_doubles_from_half_a_second_to_a_30_second_cap_with_jitter():
    for failures, ceiling in [(0, 0.5), (1, 1.0), (3, 4.0), (6, 30.0), (40, 30.0)]:
        delays = [backoff_delay(failures) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


# --------------------------------------------------------------------------- against the server


@pytest.mark.slow
async def test_it_says_hello_and_its_heartbeats_show_in_the_daemon_list(stack, tmp_path):
    daemon = make_daemon(stack, tmp_path, "hello-box", StubAgent(writes_a_file), max_tasks=3)
    async with running(daemon):

        async def listed() -> dict[str, Any] | None:
            page = await asyncio.to_thread(api, stack.base_url, "GET", "/api/v1/daemons/", stack.api_key)
            rows = page["results"] if isinstance(page, dict) else page
            return next((d for d in rows if d["name"] == "hello-box"), None)

        first = await eventually(listed)
        assert (first["status"], first["capabilities"], first["max_concurrent_tasks"]) == (
            "connected",
            ["scripted"],
            3,
        )
        assert first["version"] and first["hostname"]
        await eventually(lambda: _later(listed, first["last_seen_at"]), what="a newer last_seen_at")
    assert (await listed())["status"] == "disconnected"


async def _later(listed: Callable[[], Awaitable[dict[str, Any] | None]], seen: str) -> bool:
    row = await listed()
    return bool(row and row["last_seen_at"] and row["last_seen_at"] > seen)


@pytest.mark.slow
async def test_a_spawned_task_runs_and_its_report_is_stored(stack, rest, tmp_path, remote):
    agent = StubAgent(writes_a_file)
    daemon = make_daemon(stack, tmp_path, "runner-box", agent)
    async with running(daemon):
        directive = await rest.start_directive(remote, "Happy path")
        task = await task_of(rest, directive["id"], {"done", "failed"})
        await eventually(lambda: not Spool(tmp_path / "runner-box").reports(), what="an empty spool")

    assert task["status"] == "done", task
    assert task["daemon_name"] == "runner-box"
    assert task["summary"] == "wrote a file"
    assert float(task["cost_usd"]) == 0.5
    assert task["commit_sha"] and task["branch"].startswith("makima/")
    assert [(v["command"], v["passed"]) for v in task["verifier_results"]] == [("test -f hello.txt", True)]
    output = await rest("GET", f"/api/v1/tasks/{task['id']}/output/")
    lines = output["items"]
    assert [(line["seq"], line["stream"], line["content"]) for line in lines][:2] == [
        (1, "stdout", "wrote hello.txt"),
        (2, "agent", "all done"),
    ]
    assert await asyncio.to_thread(git, remote, "rev-parse", task["branch"]) == task["commit_sha"]
    assert agent.calls[0]["env"]["MAKIMA_TASK_ID"] == task["id"]


class Overpromising(Daemon):
    """Advertises more room than it has, so that the server sends a spawn it must refuse."""

    def hello(self) -> dict[str, Any]:
        return {**super().hello(), "max_concurrent_tasks": self.max_tasks + 1}


@pytest.mark.slow
async def test_a_spawn_beyond_capacity_is_refused_and_goes_to_another_daemon(stack, rest, tmp_path, remote):
    slow = StubAgent(sleeps_forever)
    tight = make_daemon(stack, tmp_path, "tight-box", slow, cls=Overpromising, max_tasks=1)
    async with running(tight):
        first = await rest.start_directive(remote, "Capacity one")
        second = await rest.start_directive(remote, "Capacity two")

        async def refused() -> dict[str, Any] | None:
            for directive in (first, second):
                for event in await rest.events(directive["id"]):
                    if "refused the task: capacity" in event["message"]:
                        return directive
            return None

        bounced = await eventually(refused, what="a refused spawn")
        assert len(slow.calls) == 1
        assert (await rest.execution_task(bounced["id"]))["status"] == "pending"  # no other daemon yet

        spare = make_daemon(stack, tmp_path, "spare-box", StubAgent(writes_a_file))
        async with running(spare):
            task = await task_of(rest, bounced["id"], "done")
        assert task["daemon_name"] == "spare-box"


@pytest.mark.slow
async def test_stopping_a_directive_interrupts_the_running_agent(stack, rest, tmp_path, remote):
    agent = StubAgent(sleeps_forever)
    daemon = make_daemon(stack, tmp_path, "stop-box", agent)
    async with running(daemon):
        directive = await rest.start_directive(remote, "Stop me")
        task = await task_of(rest, directive["id"], "running")
        await eventually(agent.started.is_set)

        await rest("POST", f"/api/v1/directives/{directive['id']}/stop/")

        await eventually(lambda: agent.cancelled, what="the agent cancelled")
        await eventually(lambda: not daemon.runners and not Spool(tmp_path / "stop-box").reports())
        assert (await rest.task(task["id"]))["status"] == "cancelled"
        assert daemon.ws is not None  # still connected, ready for more


def crash(daemon: Daemon, job: asyncio.Task[int]) -> list[asyncio.Task[Any]]:
    """As if the process died: everything stops, nothing is reported."""
    jobs = [job, *(r.job for r in daemon.runners.values() if r.job is not None)]
    for each in jobs:
        each.cancel()
    return jobs


@pytest.mark.slow
async def test_a_spooled_report_is_resent_after_a_restart_and_stored_once(stack, rest, tmp_path, remote):
    workdir = tmp_path / "phoenix"
    daemon = make_daemon(stack, tmp_path, "phoenix", StubAgent(sleeps_forever))
    job = asyncio.create_task(daemon.run())
    await eventually(lambda: daemon.ws is not None)
    directive = await rest.start_directive(remote, "Restart")
    task = await task_of(rest, directive["id"], "running")
    await eventually(lambda: daemon.runners.get(task["id"]) and daemon.runners[task["id"]].worktree)
    await asyncio.gather(*crash(daemon, job), return_exceptions=True)

    # The report the dead daemon had spooled but not yet seen received.
    report = {
        "type": "task_finished",
        "id": str(uuid.uuid4()),
        "task_id": task["id"],
        "status": "done",
        "exit_code": 0,
        "summary": "finished just before the crash",
        "error": None,
        "branch": task["branch"],
        "commit_sha": None,
        "cost_usd": 0.125,
        "verifier_results": [],
    }
    Spool(workdir).put(report)

    again = StubAgent(writes_a_file)
    reborn = make_daemon(stack, tmp_path, "phoenix", again)
    async with running(reborn):
        stored = await eventually(lambda: _status(rest, task["id"], "done"), what="the spooled report stored")
        await eventually(lambda: not Spool(workdir).reports(), what="the spool emptied by received")
    assert stored["summary"] == "finished just before the crash"
    assert float(stored["cost_usd"]) == 0.125
    assert again.calls == []

    # The same report once more (as if `received` had been lost): answered, not stored twice.
    Spool(workdir).put(report)
    third = make_daemon(stack, tmp_path, "phoenix", StubAgent(writes_a_file))
    async with running(third):
        await eventually(lambda: not Spool(workdir).reports(), what="the duplicate received")
    assert len(finished_events(await rest.events(directive["id"]), task["id"])) == 1
    assert (await rest.task(task["id"]))["summary"] == "finished just before the crash"


async def _status(rest: Rest, task_id: str, status: str) -> dict[str, Any] | None:
    task = await rest.task(task_id)
    return task if task["status"] == status else None


@pytest.mark.slow
async def test_a_refused_token_ends_the_daemon_fast_with_a_non_zero_status(stack, tmp_path):
    daemon = make_daemon(stack, tmp_path, "intruder", StubAgent(writes_a_file), token="not-a-token")

    started = time.monotonic()
    code = await asyncio.wait_for(daemon.run(), 15)

    assert code == EXIT_UNAUTHORIZED != 0
    assert time.monotonic() - started < 5


@pytest.mark.slow
async def test_a_second_connection_with_the_same_name_replaces_the_first_which_exits(stack, tmp_path):
    first = make_daemon(stack, tmp_path / "a", "twin", StubAgent(writes_a_file))
    job = asyncio.create_task(first.run())
    await eventually(lambda: first.ws is not None)

    second = make_daemon(stack, tmp_path / "b", "twin", StubAgent(writes_a_file))
    async with running(second):
        assert await asyncio.wait_for(job, 15) == EXIT_REPLACED


@pytest.mark.slow
async def test_a_clean_stop_interrupts_running_agents_and_delivers_their_reports(stack, rest, tmp_path, remote):
    agent = StubAgent(sleeps_forever)
    daemon = make_daemon(stack, tmp_path, "leaving-box", agent)
    job = asyncio.create_task(daemon.run())
    await eventually(lambda: daemon.ws is not None)
    directive = await rest.start_directive(remote, "Leaving")
    task = await task_of(rest, directive["id"], "running")
    await eventually(agent.started.is_set)

    daemon.request_stop()
    code = await asyncio.wait_for(job, 20)

    assert code == EXIT_OK
    assert agent.cancelled
    assert not Spool(tmp_path / "leaving-box").reports()
    events = await rest.events(directive["id"])
    assert any(e["subject_id"] == task["id"] and "shutting down" in e["message"] for e in events), events


class Proxy:
    """A TCP relay between the daemon and the server that the test can cut and restore."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()


@pytest.mark.slow
async def test_after_the_connection_drops_it_reconnects_and_delivers_the_report_it_kept(stack, rest, tmp_path, remote):
    release = asyncio.Event()

    async def waits_for_release(*, cwd, **_) -> AgentResult:
        await release.wait()
        (cwd / "hello.txt").write_text("late\n")
        return AgentResult(status="done", exit_code=0, summary="finished while cut off")

    proxy = Proxy(int(stack.base_url.rsplit(":", 1)[1]))
    await proxy.start()
    agent = StubAgent(waits_for_release)
    daemon = make_daemon(stack, tmp_path, "flaky-box", agent, server=f"http://127.0.0.1:{proxy.port}")
    async with running(daemon):
        directive = await rest.start_directive(remote, "Flaky")
        task = await task_of(rest, directive["id"], "running")
        await eventually(agent.started.is_set)

        await proxy.cut()
        await eventually(lambda: daemon.ws is None, what="the daemon noticing")
        release.set()
        spool = Spool(tmp_path / "flaky-box")
        await eventually(spool.reports, what="the report spooled while disconnected")
        assert (await rest.task(task["id"]))["status"] == "running"
        await asyncio.sleep(1.5)  # a few failed attempts: the backoff grows

        await proxy.start()  # the same port again
        stored = await eventually(lambda: _status(rest, task["id"], "done"), what="the report delivered")
        await eventually(lambda: not spool.reports(), what="received")
    assert stored["summary"] == "finished while cut off"
    assert stored["daemon_name"] == "flaky-box"


# --------------------------------------------------------------------------- commands, without a server


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, text: str) -> None:
        self.sent.append(json.loads(text))


class QuickWorkspace:
    """Worktrees as plain directories: the commands are under test here, not git."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self, task):
        path = self.root / task.id
        path.mkdir(parents=True)
        return Worktree(path=path, branch=task.branch, base_commit="0" * 40)

    def finish(self, worktree, *, message: str, push: bool) -> str:
        return "1" * 40

    def remove(self, worktree) -> None:
        pass


@pytest.fixture
def offline(tmp_path):
    """A daemon whose 'connection' records what it sends; commands are fed to it directly."""
    agent = StubAgent(sleeps_forever)
    daemon = Daemon(
        server="http://127.0.0.1:9",
        token="t",
        agents={"scripted": agent},
        workdir=tmp_path / "offline",
        name="offline",
        max_tasks=1,
        handle_signals=False,
        workspace=QuickWorkspace(tmp_path / "trees"),
    )
    daemon.spool = Spool(daemon.workdir)
    socket = FakeSocket()
    daemon.ws = socket  # type: ignore[assignment]
    return daemon, socket, agent


def spawn(task_id: str, agent: str = "scripted") -> str:
    return json.dumps(
        {
            "type": "spawn_task",
            "command_id": str(uuid.uuid4()),
            "task": {"id": task_id, "name": "t", "kind": "execution", "agent": agent, "plan": "p", "branch": "b"},
        }
    )


def acks(socket: FakeSocket) -> list[tuple[bool, str | None]]:
    return [(m["ok"], m.get("error")) for m in socket.sent if m["type"] == "ack"]


async def test_every_command_is_acknowledged_and_spawns_are_refused_with_the_protocols_reasons(offline):
    daemon, socket, agent = offline
    first, second, spooled = (str(uuid.uuid4()) for _ in range(3))
    daemon.spool.put({"type": "task_finished", "id": str(uuid.uuid4()), "task_id": spooled, "status": "done"})

    await daemon._handle(spawn(first))
    await daemon._handle(spawn(first))  # delivered again: a no-op
    await daemon._handle(spawn(spooled))  # finished here, report not yet received: a no-op
    await daemon._handle(spawn(second, agent="claude"))
    await daemon._handle(spawn(second))  # max_tasks 1
    await daemon._handle('{"type": "spawn_task", "command_id": "c", "task": {}}')
    await daemon._handle('{"type": "interrupt_task", "command_id": "i", "task_id": "nope"}')
    await daemon._handle('{"type": "send_message", "command_id": "m", "task_id": "nope", "message": "hi"}')

    assert acks(socket)[:5] == [(True, None), (True, None), (True, None), (False, "unknown_agent"), (False, "capacity")]
    assert acks(socket)[5][0] is False and "invalid task" in acks(socket)[5][1]
    assert acks(socket)[6:] == [(True, None), (False, "no such running task on this daemon")]
    assert daemon.running_tasks() == [first, spooled]

    await eventually(agent.started.is_set)
    await daemon._handle(json_message(type="send_message", command_id="m2", task_id=first, message="hi"))
    assert acks(socket)[-1] == (False, "the scripted agent of this task cannot take input now")

    daemon.stopping = True
    await daemon._handle(spawn(str(uuid.uuid4())))
    assert acks(socket)[-1] == (False, "shutting down")

    await daemon._handle(json_message(type="interrupt_task", command_id="i2", task_id=first, reason="stop it"))
    assert acks(socket)[-1] == (True, None)
    await eventually(lambda: not daemon.runners)
    assert agent.cancelled
    [report] = [m for m in socket.sent if m["type"] == "task_finished"]
    assert (report["status"], report["error"]) == ("interrupted", "stop it")
    assert report["id"] in daemon.spool


async def test_a_task_handed_back_while_its_old_run_is_still_stopping_is_refused_until_it_is_gone(offline):
    daemon, socket, agent = offline
    task_id = str(uuid.uuid4())
    await daemon._handle(spawn(task_id))
    await eventually(agent.started.is_set)

    # The server took the task away, then hands it back as a new attempt before the old run stopped.
    await daemon._handle(json_message(type="interrupt_task", command_id="i", task_id=task_id, reason="lease"))
    await daemon._handle(spawn(task_id))
    assert acks(socket)[-2:] == [(True, None), (False, "busy: stopping the previous run of this task")]

    await eventually(lambda: not daemon.runners)
    [report] = [m for m in socket.sent if m["type"] == "task_finished"]
    assert (report["status"], report["error"]) == ("interrupted", "lease")
    await daemon._handle(json_message(type="received", id=report["id"]))
    await daemon._handle(spawn(task_id))  # once the old run is gone, the new attempt starts
    assert acks(socket)[-1] == (True, None)
    assert daemon.runners[task_id].interrupted is False
    await daemon._handle(json_message(type="interrupt_task", command_id="i2", task_id=task_id, reason="done"))
    await eventually(lambda: not daemon.runners)


async def test_received_forgets_a_report_and_not_your_task_drops_it(offline):
    daemon, _, _ = offline
    kept, refused = ({"type": "task_finished", "id": str(uuid.uuid4()), "task_id": str(uuid.uuid4())} for _ in "ab")
    for report in (kept, refused):
        daemon.spool.put({**report, "status": "done"})

    await daemon._handle(json_message(type="received", id=kept["id"]))
    await daemon._handle(json_message(type="error", code="not_your_task", message="no", ref=refused["id"]))
    await daemon._handle(json_message(type="error", code="invalid", message="whatever", ref=None))

    assert daemon.spool.reports() == []


async def test_a_report_the_server_finds_invalid_is_replaced_by_its_bare_outcome(offline):
    daemon, socket, _ = offline
    report = {
        "type": "task_finished",
        "id": str(uuid.uuid4()),
        "task_id": str(uuid.uuid4()),
        "status": "done",
        "summary": "x",
        "verifier_results": [{"odd": True}],
    }
    daemon.spool.put(report)

    await daemon._handle(
        json_message(type="error", code="invalid", message="verifier_results[0].passed", ref=report["id"])
    )

    [bare] = daemon.spool.reports()
    assert (bare["task_id"], bare["status"], bare["verifier_results"]) == (report["task_id"], "done", [])
    assert "refused" in bare["error"]
    assert socket.sent[-1] == bare
    await daemon._handle(json_message(type="error", code="invalid", message="again", ref=bare["id"]))
    assert daemon.spool.reports() == []


def json_message(**fields: Any) -> str:
    return json.dumps(fields)
