"""Helpers for fault tests on a real stack (daphne, a django-q2 cluster, real
`makima daemon run` processes running the demo directive's scripted agent).

Every fault test ends with the directive completed and then checks, from
three independent records, that nothing was lost or run twice: the server's
audit log (events), its command outbox (database rows) and the daemons' own
logs (which tasks each one really started).
"""

from __future__ import annotations

import copy
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from directives import demo
from tests.e2e.fake_daemon import api
from tests.e2e.stack import Stack
from tests.e2e.test_worker import logs, tasks_of

#: Short liveness settings: a daemon is silent after 3 s, and its tasks' lease runs 3 s after that.
FAST = {
    "MAKIMA_TICK_SECONDS": "1",
    "MAKIMA_HEARTBEAT_INTERVAL_S": "1",
    "MAKIMA_TASK_LEASE_S": "3",
    "MAKIMA_OUTBOX_POLL_S": "0.5",
}

#: Execution tasks per step in a clean demo run: Greet's buggy first attempt is reworked once.
DEMO_EXECUTION_TASKS = {"Names": 1, "Greet": 2, "Farewell": 1, "Document": 1}

STARTED = re.compile(r"task ([0-9a-f-]{36}) \(\w+ .*\): started")


def demo_repository(path: Path, *, sleep: dict[str, float] | None = None) -> Path:
    """The demo's bare repository, with ``sleep`` seconds added to some steps' script."""
    script = copy.deepcopy(demo.SCRIPT)
    for step, seconds in (sleep or {}).items():
        script["steps"][step]["sleep"] = seconds
    return demo.build_repository(path, script=script)


def wait_until(what: str, check: Callable[[], Any], *, timeout: float, stack: Stack, tmp_path: Path) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the logs after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{logs(stack, tmp_path)}")


def events_of(stack: Stack, directive_id: str) -> list[dict[str, Any]]:
    """Every event of the directive, oldest first (the endpoint gives at most 1000 at a time)."""
    found: list[dict[str, Any]] = []
    while True:
        after = f"&after={found[-1]['id']}" if found else ""
        path = f"/api/v1/directives/{directive_id}/events/?limit=1000{after}"
        batch = api(stack.base_url, "GET", path, stack.api_key)
        found.extend(batch)
        if len(batch) < 1000:
            return found


def daemon_status(stack: Stack, name: str) -> str | None:
    body = api(stack.base_url, "GET", "/api/v1/daemons/?page_size=100", stack.api_key)
    rows = body["results"] if isinstance(body, dict) else body
    return next((d["status"] for d in rows if d["name"] == name), None)


@dataclass(frozen=True)
class Command:
    id: str
    task_id: str | None
    command_type: str
    status: str
    daemon: str


def commands_of(stack: Stack) -> list[Command]:
    """The outbox, read from the stack's database (the API does not show it)."""
    query = (
        "SELECT c.id, c.task_id, c.command_type, c.status, d.name FROM daemons_daemoncommand c"
        " JOIN daemons_daemon d ON d.id = c.daemon_id ORDER BY c.created_at"
    )
    url = stack.env["DATABASE_URL"]
    if url.startswith("sqlite:///"):
        with sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True, timeout=30) as conn:
            rows = conn.execute(query).fetchall()
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            rows = conn.execute(query).fetchall()
    # SQLite keeps UUIDs as 32 hex digits, PostgreSQL as uuid: compare them in one form.
    return [
        Command(str(uuid.UUID(str(pk))), str(uuid.UUID(str(task))) if task else None, kind, status, daemon)
        for pk, task, kind, status, daemon in rows
    ]


def started_by_daemons(tmp_path: Path) -> Counter[str]:
    """How many times each task was started by any daemon, from their own logs."""
    counts: Counter[str] = Counter()
    for log in tmp_path.glob("box-*.log"):
        counts.update(STARTED.findall(log.read_text()))
    return counts


def assert_nothing_lost_or_duplicated(
    stack: Stack,
    tmp_path: Path,
    directive_id: str,
    *,
    steps: dict[str, dict[str, Any]],
    attempts: dict[str, int] | None = None,
    dropped: Iterable[str] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Command]]:
    """The checks every fault test ends with, after the directive completed.

    ``attempts`` maps step names to the attempt their (single, or last)
    execution task should end on, and ``planning`` or ``completion`` to the
    attempt of that task; every other task ran once. ``dropped``: the ids of
    commands the server is expected to have dropped rather than delivered.
    Returns the tasks, events and commands for the test's own checks.
    """
    tasks = tasks_of(stack, directive_id)
    events = events_of(stack, directive_id)
    commands = commands_of(stack)
    context = logs(stack, tmp_path)
    by_step = {s["id"]: name for name, s in steps.items()}

    # Per step: the expected execution tasks, on the expected attempts, all done.
    execution = [t for t in tasks if t["kind"] == "execution"]
    assert Counter(by_step[t["step"]] for t in execution) == Counter(DEMO_EXECUTION_TASKS), context
    assert {name: s["status"] for name, s in steps.items()} == dict.fromkeys(DEMO_EXECUTION_TASKS, "passed")
    expected_attempt = {**dict.fromkeys(DEMO_EXECUTION_TASKS, 1), **(attempts or {})}
    for task in execution:
        name = by_step[task["step"]]
        last = max(t["created_at"] for t in execution if t["step"] == task["step"])
        want = expected_attempt[name] if task["created_at"] == last else 1
        assert (name, task["status"], task["attempt"]) == (name, "done", want), context
    assert [t["kind"] for t in tasks].count("completion") == 1, context
    assert [t["kind"] for t in tasks].count("planning") == 1, context
    for task in tasks:
        if task["kind"] != "execution":
            assert (task["name"], task["attempt"]) == (task["name"], (attempts or {}).get(task["kind"], 1)), context

    # Every task ended exactly once; it was interrupted (and retried) once per extra attempt.
    kinds = Counter((e["subject_id"], e["event_type"]) for e in events if e["subject_type"] == "task")
    for task in tasks:
        ends = sum(kinds[(task["id"], f"task_{status}")] for status in ("done", "failed", "cancelled"))
        assert ends == 1, (task["name"], task["status"], context)
        assert kinds[(task["id"], "task_interrupted")] == task["attempt"] - 1, (task["name"], context)
        assert kinds[(task["id"], "task_starting")] == task["attempt"], (task["name"], context)

    # The outbox: every command acknowledged (nothing refused, nothing left undelivered) but
    # those the test expects the server to drop; one acknowledged spawn_task per attempt,
    # except attempts whose spawn_task was dropped (those never reached a daemon).
    assert {c.id for c in commands if c.status != "acked"} == set(dropped), [c for c in commands if c.status != "acked"]
    spawns = Counter(c.task_id for c in commands if c.command_type == "spawn_task" and c.status == "acked")
    lost = Counter(c.task_id for c in commands if c.command_type == "spawn_task" and c.id in set(dropped))
    assert spawns + lost == Counter({t["id"]: t["attempt"] for t in tasks}), context

    # The daemons: each delivered attempt started once, on exactly one daemon, and nothing else started.
    assert started_by_daemons(tmp_path) == spawns, context
    return tasks, events, commands
