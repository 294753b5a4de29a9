"""TaskRunner: one task from worktree to report, with real git repositories in
tmp_path and small in-test agents (no server: ``send`` and ``keep`` are recorded)."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from makima.worker.base import AgentResult, TaskSpec, Worktree
from makima.worker.git import Workspace
from makima.worker.runner import TaskRunner, build_prompt


@pytest.fixture(autouse=True)
def hermetic_git(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def make_remote(folder: Path) -> Path:
    """A bare repository with one commit on ``main``."""
    seed = folder / "seed"
    seed.mkdir(parents=True)
    git(seed, "init", "-q", "-b", "main")
    (seed / "README.md").write_text("hello\n")
    git(seed, "add", "-A")
    git(seed, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "seed")
    remote = folder / "origin.git"
    git(folder, "clone", "-q", "--bare", str(seed), str(remote))
    return remote


@pytest.fixture
def remote(tmp_path) -> Path:
    return make_remote(tmp_path)


Act = Callable[..., Awaitable[AgentResult]]


class StubAgent:
    """An in-test agent: ``act(task=…, prompt=…, cwd=…, env=…, emit=…, progress=…)`` decides what it does."""

    def __init__(self, act: Act, name: str = "scripted") -> None:
        self.act = act
        self.name = name
        self.calls: list[dict[str, Any]] = []
        self.started = asyncio.Event()
        self.cancelled = False
        self.messages: list[str] = []
        self.accepts_input = False

    async def run(self, *, task, prompt, cwd, env, emit, progress) -> AgentResult:
        self.calls.append({"task": task, "prompt": prompt, "cwd": Path(cwd), "env": dict(env)})
        self.started.set()
        try:
            return await self.act(task=task, prompt=prompt, cwd=Path(cwd), env=env, emit=emit, progress=progress)
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    def send(self, task_id: str, message: str) -> bool:
        if self.accepts_input:
            self.messages.append(message)
        return self.accepts_input


async def writes_a_file(*, cwd, emit, progress, **_) -> AgentResult:
    (cwd / "hello.txt").write_text("hi\n")
    emit("stdout", "wrote hello.txt")
    emit("assistant", "all done")
    progress(0.25)
    return AgentResult(status="done", exit_code=0, summary="wrote a file", cost_usd=0.5)


async def sleeps_forever(**_) -> AgentResult:
    await asyncio.sleep(3600)
    raise AssertionError("unreachable")


class Wire:
    """What the runner sends, in order, and what it spooled (``keep``)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.kept: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> bool:
        self.messages.append(message)
        return True

    def keep(self, report: dict[str, Any]) -> None:
        assert report["type"] == "task_finished" and report not in self.messages  # spooled before it is sent
        self.kept.append(report)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]


def task_spec(remote: Path | None, **fields: Any) -> TaskSpec:
    task_id = str(uuid.uuid4())
    return TaskSpec.from_message(
        {
            "id": task_id,
            "name": "Write hello",
            "kind": "execution",
            "agent": "scripted",
            "plan": "Write hello.txt",
            "repository_url": str(remote) if remote else "",
            "base_branch": "main",
            "branch": f"makima/write-hello-{task_id[:8]}",
            "completion_action": "branch",
            "verifiers": [],
            "env": {"MAKIMA_TASK_ID": task_id, "MAKIMA_API_KEY": "task-token"},
            **fields,
        }
    )


async def run_task(task: TaskSpec, agent: StubAgent, workspace: Any, wire: Wire) -> tuple[TaskRunner, dict]:
    runner = TaskRunner(task, agent=agent, workspace=workspace, send=wire.send, keep=wire.keep, output_interval_s=0.05)
    report = await runner.start()
    assert report is not None
    return runner, report


async def test_a_task_runs_in_its_worktree_and_its_branch_is_pushed(tmp_path, remote):
    wire, agent = Wire(), StubAgent(writes_a_file)
    task = task_spec(remote, verifiers=["test -f hello.txt"])

    runner, report = await run_task(task, agent, Workspace(tmp_path / "work"), wire)

    [started] = wire.of("task_started")
    assert started == {
        "type": "task_started",
        "task_id": task.id,
        "branch": task.branch,
        "base_commit": git(remote, "rev-parse", "main"),
    }
    [call] = agent.calls
    assert call["prompt"] == "Write hello.txt"
    assert call["cwd"].is_relative_to(tmp_path / "work" / "worktrees")
    env = call["env"]
    assert (env["MAKIMA_TASK_KIND"], env["MAKIMA_TASK_NAME"]) == ("execution", "Write hello")
    assert env["MAKIMA_WORKTREE"] == str(call["cwd"])
    assert env["MAKIMA_API_KEY"] == "task-token" and "PATH" in env

    assert report["type"] == "task_finished" and report["task_id"] == task.id
    assert (report["status"], report["exit_code"], report["summary"], report["error"]) == (
        "done",
        0,
        "wrote a file",
        None,
    )
    assert report["cost_usd"] == 0.5
    assert report["branch"] == task.branch
    assert report["commit_sha"] == git(remote, "rev-parse", task.branch)
    assert git(remote, "show", f"{task.branch}:hello.txt") == "hi"
    [verifier] = report["verifier_results"]
    assert (verifier["command"], verifier["passed"]) == ("test -f hello.txt", True)
    uuid.UUID(report["id"])

    # The output went out before the report, numbered from 1, in the server's streams.
    kinds = [m["type"] for m in wire.messages]
    assert kinds.index("task_finished") == len(kinds) - 1
    items = [i for m in wire.of("task_output") for i in m["items"]]
    assert [i["seq"] for i in items] == list(range(1, len(items) + 1))
    assert items[:2] == [
        {"seq": 1, "stream": "stdout", "content": "wrote hello.txt"},
        {"seq": 2, "stream": "agent", "content": "all done"},
    ]
    assert wire.kept == [report]
    assert runner.reported
    assert not call["cwd"].exists()  # removed once reported: the branch lives on the remote


async def test_a_git_failure_before_the_agent_fails_the_task_without_running_it(tmp_path, remote):
    wire, agent = Wire(), StubAgent(writes_a_file)
    task = task_spec(remote, base_branch="no-such-branch")

    _, report = await run_task(task, agent, Workspace(tmp_path / "work"), wire)

    assert report["status"] == "failed"
    assert "could not prepare the worktree" in report["error"] and "no-such-branch" in report["error"]
    assert agent.calls == []
    assert wire.of("task_started") == []


async def test_a_failing_agent_skips_the_verifiers_but_its_work_is_committed(tmp_path, remote):
    async def fails(*, cwd, emit, **_) -> AgentResult:
        (cwd / "partial.txt").write_text("half\n")
        emit("stderr", "boom")
        return AgentResult(status="failed", exit_code=3, error="exited with status 3")

    wire, agent = Wire(), StubAgent(fails)
    task = task_spec(remote, verifiers=["touch ran-verifier"])

    _, report = await run_task(task, agent, Workspace(tmp_path / "work"), wire)

    assert (report["status"], report["exit_code"], report["error"]) == ("failed", 3, "exited with status 3")
    assert report["verifier_results"] == []
    assert report["commit_sha"] == git(remote, "rev-parse", task.branch)
    files = git(remote, "ls-tree", "--name-only", task.branch).splitlines()
    assert "partial.txt" in files and "ran-verifier" not in files


async def test_failing_verifiers_do_not_change_the_status(tmp_path, remote):
    wire = Wire()
    task = task_spec(remote, verifiers=["test -f hello.txt", "exit 4"])

    _, report = await run_task(task, StubAgent(writes_a_file), Workspace(tmp_path / "work"), wire)

    assert report["status"] == "done"
    assert [(v["passed"], v["exit_code"]) for v in report["verifier_results"]] == [(True, 0), (False, 4)]


async def test_a_task_over_its_time_limit_is_stopped_and_fails(tmp_path, remote):
    agent = StubAgent(sleeps_forever)
    task = task_spec(remote, timeout_s=0.3)

    started = time.monotonic()
    _, report = await run_task(task, agent, Workspace(tmp_path / "work"), Wire())

    assert time.monotonic() - started < 5
    assert agent.cancelled
    assert (report["status"], report["error"]) == ("failed", "timed out after 0.3 s")


async def test_an_interrupt_cancels_the_agent_and_reports_interrupted_without_pushing(tmp_path, remote):
    agent = StubAgent(sleeps_forever)
    task = task_spec(remote)
    wire = Wire()
    runner = TaskRunner(task, agent=agent, workspace=Workspace(tmp_path / "work"), send=wire.send, keep=wire.keep)
    job = runner.start()
    await asyncio.wait_for(agent.started.wait(), 30)
    worktree = agent.calls[0]["cwd"]

    assert runner.interrupt("Directive stopped by alice") is True
    report = await asyncio.wait_for(job, 10)

    assert agent.cancelled
    assert (report["status"], report["error"], report["commit_sha"]) == (
        "interrupted",
        "Directive stopped by alice",
        None,
    )
    assert task.branch not in git(remote, "branch", "--list")
    assert not worktree.exists()
    assert runner.interrupt("again") is False


async def test_an_agent_that_crashes_fails_the_task_and_the_runner_survives(tmp_path, remote):
    async def crashes(**_) -> AgentResult:
        raise RuntimeError("agent bug")

    _, report = await run_task(task_spec(remote), StubAgent(crashes), Workspace(tmp_path / "work"), Wire())

    assert report["status"] == "failed"
    assert "agent bug" in report["error"]


async def test_completion_action_none_pushes_nothing_and_removes_the_worktree(tmp_path, remote):
    agent = StubAgent(writes_a_file)
    task = task_spec(remote, completion_action="none", kind="monitoring")

    _, report = await run_task(task, agent, Workspace(tmp_path / "work"), Wire())

    assert report["status"] == "done"
    assert report["commit_sha"]  # committed locally, for the record
    assert task.branch not in git(remote, "branch", "--list")
    assert not agent.calls[0]["cwd"].exists()


async def test_a_task_without_a_repository_gets_a_scratch_worktree(tmp_path):
    agent = StubAgent(writes_a_file)

    _, report = await run_task(task_spec(None), agent, Workspace(tmp_path / "work"), Wire())

    assert report["status"] == "done" and report["commit_sha"]


async def test_progress_is_throttled_and_the_final_cost_is_in_the_report(tmp_path, remote):
    async def spends(*, progress, **_) -> AgentResult:
        for step in range(1, 31):
            progress(step / 100)
            await asyncio.sleep(0.02)
        return AgentResult(status="done", exit_code=0)

    wire = Wire()
    runner = TaskRunner(
        task_spec(remote),
        agent=StubAgent(spends),
        workspace=Workspace(tmp_path / "work"),
        send=wire.send,
        keep=wire.keep,
        progress_interval_s=0.25,
    )
    report = await runner.start()

    costs = [m["cost_usd"] for m in wire.of("task_progress")]
    assert 1 <= len(costs) <= 4  # ~0.6 s of spending at most once per 0.25 s
    assert costs == sorted(costs)
    assert report["cost_usd"] == 0.3


def test_conflicting_merge_branches_put_a_preamble_before_the_plan():
    task = task_spec(None, plan="Do the thing.")
    clean = Worktree(path=Path("/w"), branch="b", base_commit="c")
    conflicted = Worktree(path=Path("/w"), branch="b", base_commit="c", conflicts=["makima/a-1", "makima/b-2"])

    assert build_prompt(task, clean) == "Do the thing."
    prompt = build_prompt(task, conflicted)
    assert prompt.endswith("\n\nDo the thing.")
    preamble = prompt.removesuffix("Do the thing.")
    assert "- makima/a-1\n- makima/b-2" in preamble
    assert "git merge" in preamble and "conflict" in preamble


class SlowWorkspace:
    """Prepares slowly (git is blocking); records removals."""

    def __init__(self, root: Path, conflicts: list[str] | None = None) -> None:
        self.root = root
        self.conflicts = conflicts or []
        self.removed: list[Path] = []

    def prepare(self, task: TaskSpec) -> Worktree:
        time.sleep(0.4)
        path = self.root / task.id
        path.mkdir(parents=True)
        return Worktree(path=path, branch=task.branch, base_commit="0" * 40, conflicts=self.conflicts)

    def finish(self, worktree: Worktree, *, message: str, push: bool) -> str:
        return "1" * 40

    def remove(self, worktree: Worktree) -> None:
        self.removed.append(worktree.path)


async def test_the_agent_is_told_about_conflicts_git_left_to_it(tmp_path):
    agent = StubAgent(writes_a_file)
    workspace = SlowWorkspace(tmp_path, conflicts=["makima/other-1"])

    _, report = await run_task(task_spec(None, plan="Plan."), agent, workspace, Wire())

    assert report["status"] == "done"
    assert "makima/other-1" in agent.calls[0]["prompt"] and agent.calls[0]["prompt"].endswith("Plan.")


async def test_an_interrupt_while_git_prepares_waits_for_it_then_removes_the_worktree(tmp_path):
    agent = StubAgent(writes_a_file)
    workspace = SlowWorkspace(tmp_path)
    task = task_spec(None)
    wire = Wire()
    runner = TaskRunner(task, agent=agent, workspace=workspace, send=wire.send, keep=wire.keep)
    job = runner.start()
    await asyncio.sleep(0.1)

    runner.interrupt("stop")
    report = await asyncio.wait_for(job, 5)

    assert report["status"] == "interrupted"
    assert agent.calls == []
    assert workspace.removed == [tmp_path / task.id]
    assert wire.of("task_started") == []


async def test_messages_reach_an_agent_that_takes_input(tmp_path):
    agent = StubAgent(sleeps_forever)
    runner = TaskRunner(
        task_spec(None), agent=agent, workspace=SlowWorkspace(tmp_path), send=Wire().send, keep=Wire().keep
    )
    assert runner.send_message("too early") is False
    job = runner.start()
    await asyncio.wait_for(agent.started.wait(), 5)

    assert runner.send_message("hello?") is False
    agent.accepts_input = True
    assert runner.send_message("hello?") is True
    assert agent.messages == ["hello?"]
    runner.interrupt("done here")
    await job
