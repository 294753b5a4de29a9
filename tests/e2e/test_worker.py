"""End to end with every real part: daphne, a django-q2 cluster running the
tick, and real `makima daemon run` processes whose scripted agent calls the
real `makima` CLI and commits in real git worktrees of a bare repository.

The demo directive (``directives.demo``): the planner submits a diamond
(Names; Greet and Farewell after it; Document after both); Greet's first
attempt fails its `pytest` verifier and is reworked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from directives import demo
from tests.e2e.fake_daemon import api
from tests.e2e.stack import Stack, running_stack

pytestmark = pytest.mark.slow

FAST = {
    "MAKIMA_TICK_SECONDS": "1",
    "MAKIMA_HEARTBEAT_INTERVAL_S": "1",
    "MAKIMA_TASK_LEASE_S": "3",
}


def git(repository: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repository, capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def start_demo(stack: Stack, repository: Path) -> dict[str, Any]:
    directive = api(
        stack.base_url,
        "POST",
        "/api/v1/directives/",
        stack.api_key,
        {**demo.DIRECTIVE, "repository_url": str(repository)},
    )
    api(stack.base_url, "POST", f"/api/v1/directives/{directive['id']}/start/", stack.api_key)
    return directive


def logs(stack: Stack, tmp_path: Path) -> str:
    parts = [f"--- daphne\n{stack.log.read_text()[-3000:]}"]
    for log in sorted(tmp_path.glob("*.log")):
        parts.append(f"--- {log.name}\n{log.read_text()[-3000:]}")
    return "\n".join(parts)


def wait_for(stack: Stack, tmp_path: Path, directive_id: str, statuses: set[str], timeout: float = 150) -> dict:
    deadline = time.monotonic() + timeout
    current: dict[str, Any] = {}
    while time.monotonic() < deadline:
        current = api(stack.base_url, "GET", f"/api/v1/directives/{directive_id}/", stack.api_key)
        if current["status"] in statuses:
            return current
        if current["status"] in ("paused", "failed") and current["status"] not in statuses:
            break
        time.sleep(0.5)
    events = api(stack.base_url, "GET", f"/api/v1/directives/{directive_id}/events/", stack.api_key)
    items = events["results"] if isinstance(events, dict) else events
    tail = "\n".join(f"{e['event_type']}: {e['message']}" for e in items[-40:])
    raise AssertionError(f"directive is {current.get('status')}, not {statuses}\n{tail}\n{logs(stack, tmp_path)}")


def tasks_of(stack: Stack, directive_id: str) -> list[dict[str, Any]]:
    found, path = [], f"/api/v1/tasks/?directive={directive_id}&page_size=200"
    page = api(stack.base_url, "GET", path, stack.api_key)
    found.extend(page["results"] if isinstance(page, dict) else page)
    return found


def steps_of(stack: Stack, directive_id: str) -> dict[str, dict[str, Any]]:
    page = api(stack.base_url, "GET", f"/api/v1/directives/{directive_id}/steps/?page_size=200", stack.api_key)
    return {s["name"]: s for s in (page["results"] if isinstance(page, dict) else page)}


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return demo.build_repository(tmp_path / "greeter.git")


def test_two_daemons_run_the_demo_diamond_to_a_pushed_directive_branch(tmp_path, repository):
    with running_stack(extra_env=FAST, cluster=True) as stack:
        stack.start_daemon("box-1", tmp_path / "box-1")
        stack.start_daemon("box-2", tmp_path / "box-2")
        directive = start_demo(stack, repository)

        done = wait_for(stack, tmp_path, directive["id"], {"completed"})

        steps = steps_of(stack, directive["id"])
        assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(
            ["Names", "Greet", "Farewell", "Document"], "passed"
        )
        assert steps["Greet"]["rework_count"] == 1  # the buggy first attempt failed pytest
        tasks = tasks_of(stack, directive["id"])
        by_id = {t["id"]: t for t in tasks}
        execution = [t for t in tasks if t["kind"] == "execution"]
        greet = sorted((t for t in execution if t["step"] == steps["Greet"]["id"]), key=lambda t: t["created_at"])
        assert len(greet) == 2
        assert not all(r["passed"] for r in greet[0]["verifier_results"])
        assert all(r["passed"] for r in greet[1]["verifier_results"])
        assert greet[1]["continue_from_task"] == greet[0]["id"]  # rework continues its own worktree
        [document] = [t for t in execution if t["step"] == steps["Document"]["id"]]
        first = by_id[document["continue_from_task"]]
        assert first["step"] in (steps["Greet"]["id"], steps["Farewell"]["id"])
        assert len(document["merge_branches"]) == 1
        assert {t["daemon_name"] for t in tasks} == {"box-1", "box-2"} or len(tasks) >= 2

    # The directive branch is on the remote, with every step's work merged.
    branch = done["pr_branch"]
    assert branch and git(repository, "branch", "--list", branch)
    tree = git(repository, "ls-tree", "-r", "--name-only", branch).splitlines()
    for path in ("greeter/names.py", "greeter/greet.py", "greeter/farewell.py", "tests/test_greet.py"):
        assert path in tree
    assert git(repository, "show", f"{branch}:greeter/greet.py") == demo.GREET.strip()
    assert "## Usage" in git(repository, "show", f"{branch}:README.md")
    log = git(repository, "log", "--format=%s", branch)
    for name in ("Names", "Greet", "Farewell", "Document"):
        assert name in log, log


def slow_script(repository: Path, step: str, seconds: float, **extra: Any) -> None:
    """Make ``step`` of the demo take ``seconds`` (pushed to the repository's main)."""
    work = repository.parent / "edit"
    git(repository.parent, "clone", "-q", str(repository), str(work))
    script = yaml.safe_load((work / ".makima/script.yaml").read_text())
    spec = script["steps"][step]
    spec["sleep"] = seconds
    spec.update(extra)
    (work / ".makima/script.yaml").write_text(yaml.safe_dump(script, sort_keys=False))
    git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", f"slow {step}")
    git(work, "push", "-q", "origin", "main")


def running_task(stack: Stack, directive_id: str, step_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in tasks_of(stack, directive_id):
            if task["step"] == step_id and task["status"] == "running":
                return task
        time.sleep(0.2)
    raise AssertionError("the task never ran")


def test_a_daemon_killed_mid_task_is_replaced_and_the_directive_completes(tmp_path, repository):
    slow_script(repository, "Farewell", 6)
    with running_stack(extra_env=FAST, cluster=True) as stack:
        first = stack.start_daemon("box-1", tmp_path / "box-1", max_tasks=4)
        directive = start_demo(stack, repository)
        deadline = time.monotonic() + 60
        while "Farewell" not in (steps := steps_of(stack, directive["id"])) and time.monotonic() < deadline:
            time.sleep(0.3)
        victim = running_task(stack, directive["id"], steps["Farewell"]["id"])
        assert victim["daemon_name"] == "box-1"

        first.send_signal(signal.SIGKILL)
        first.wait()
        stack.start_daemon("box-2", tmp_path / "box-2", max_tasks=4)
        wait_for(stack, tmp_path, directive["id"], {"completed"})

        farewell = [t for t in tasks_of(stack, directive["id"]) if t["step"] == steps["Farewell"]["id"]]
        [task] = [t for t in farewell if t["kind"] == "execution"]
        assert task["id"] == victim["id"]
        assert (task["status"], task["attempt"], task["daemon_name"]) == ("done", 2, "box-2")


def test_a_daemon_restarted_before_its_report_was_received_has_it_stored_once(tmp_path, repository):
    # The agent talks to the server only before its sleep: `complete: false`
    # leaves out the final `makima supervisor complete`, which would hang
    # while the server is stopped.
    slow_script(repository, "Names", 6, complete=False)
    with running_stack(extra_env={**FAST, "MAKIMA_TASK_LEASE_S": "30"}, cluster=True) as stack:
        daemon = stack.start_daemon("box-1", tmp_path / "box-1")
        directive = start_demo(stack, repository)
        deadline = time.monotonic() + 60
        while "Names" not in (steps := steps_of(stack, directive["id"])) and time.monotonic() < deadline:
            time.sleep(0.3)
        task = running_task(stack, directive["id"], steps["Names"]["id"])
        time.sleep(3)  # past the agent's `makima directive show`, into its sleep
        server = stack.processes[0]
        spool = tmp_path / "box-1" / "spool"

        # The server stops answering; the daemon finishes the task and keeps its report.
        server.send_signal(signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while not (reports := list(spool.glob("*.json"))) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert reports, logs(stack, tmp_path)
            report = json.loads(reports[0].read_text())
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
        finally:
            server.send_signal(signal.SIGCONT)
        assert report.get("task_id", report.get("report", {}).get("task_id")) == task["id"]

        stack.start_daemon("box-1", tmp_path / "box-1")
        wait_for(stack, tmp_path, directive["id"], {"completed"})

        names = [t for t in tasks_of(stack, directive["id"]) if t["step"] == steps["Names"]["id"]]
        assert [(t["status"], t["attempt"]) for t in names if t["kind"] == "execution"] == [("done", 1)]
        events = api(
            stack.base_url, "GET", f"/api/v1/directives/{directive['id']}/events/?page_size=1000", stack.api_key
        )
        items = events["results"] if isinstance(events, dict) else events
        finished = [e for e in items if e["event_type"] == "task_done" and e["subject_id"] == task["id"]]
        assert len(finished) == 1
        assert not list(spool.glob("*.json"))  # received at last, and forgotten
    assert os.path.isdir(tmp_path / "box-1")
