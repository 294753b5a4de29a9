"""daphne crashes while a command is on its way to a daemon, and comes back.

box-1 is stopped (SIGSTOP: its socket stays open, it reads nothing) before
the directive starts, so the planning task's ``spawn_task`` is sent into its
socket and never acknowledged. Then daphne is killed with SIGKILL (no close
frame, no consumer clean-up) and a new daphne starts on the same port and
database. box-1 resumes: it reads the command that waited in its socket
buffer and starts the task, but its ``ack`` goes nowhere; it reconnects
(capped backoff), says hello listing the task, and the server sends the
unacknowledged command again (at-least-once delivery). The repeat must be a
no-op on the daemon (protocol.md), so the task runs once, and the directive
completes with nothing lost or run twice.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.e2e.stack import restart_server, running_stack
from tests.e2e.test_worker import logs, start_demo, steps_of, tasks_of, wait_for
from tests.faults.conftest import (
    FAST,
    assert_nothing_lost_or_duplicated,
    daemon_status,
    demo_repository,
    events_of,
    wait_until,
)

pytestmark = pytest.mark.slow

# The daemon is stopped for several seconds while the server is restarted:
# long enough to be marked disconnected, too short for its lease to run out.
# Heartbeats every 2 s leave the directive's start 6 s to reach it first.
ENV = {**FAST, "MAKIMA_HEARTBEAT_INTERVAL_S": "2", "MAKIMA_TASK_LEASE_S": "60"}

CONNECTED = re.compile(r"connected to ws://\S+ as 'box-1'")


def test_commands_sent_before_a_server_crash_are_sent_again_and_run_once(tmp_path: Path) -> None:
    repository = demo_repository(tmp_path / "greeter.git")
    with running_stack(extra_env=ENV, cluster=True) as stack:
        daemon = stack.start_daemon("box-1", tmp_path / "box-1")
        wait_until(
            "box-1 to connect",
            lambda: daemon_status(stack, "box-1") == "connected",
            timeout=30,
            stack=stack,
            tmp_path=tmp_path,
        )
        daemon.send_signal(signal.SIGSTOP)
        try:
            directive = start_demo(stack, repository)

            def planning_spawn() -> list[dict]:
                return [
                    e
                    for e in events_of(stack, directive["id"])
                    if e["event_type"] == "command_sent" and e["data"].get("command_type") == "spawn_task"
                ]

            [sent] = wait_until(
                "the planning task's spawn_task to be sent to the stopped daemon",
                planning_spawn,
                timeout=30,
                stack=stack,
                tmp_path=tmp_path,
            )
            [planning] = tasks_of(stack, directive["id"])
            assert (planning["kind"], planning["status"], planning["daemon_name"]) == ("planning", "starting", "box-1")

            server = restart_server(stack)  # SIGKILL, then a new daphne on the same port
            assert server.poll() is None
        finally:
            resumed_at = len((tmp_path / "box-1.log").read_text())
            daemon.send_signal(signal.SIGCONT)

        wait_for(stack, tmp_path, directive["id"], {"completed"}, timeout=150)

        steps = steps_of(stack, directive["id"])
        tasks, events, commands = assert_nothing_lost_or_duplicated(stack, tmp_path, directive["id"], steps=steps)
        by_id = {t["id"]: t for t in tasks}
        assert (by_id[planning["id"]]["status"], by_id[planning["id"]]["daemon_name"]) == ("done", "box-1")

        # The command: sent to the first daphne, queued again by the hello to the
        # second one, sent again, and acknowledged once.
        [command] = [c for c in commands if c.task_id == planning["id"]]
        assert command.id == sent["subject_id"]
        history = Counter(e["event_type"] for e in events if e["subject_id"] == command.id)
        assert history == Counter({"command_queued": 2, "command_sent": 2, "command_acked": 1}), history

        # box-1 started the task from the copy that waited in its old socket,
        # before it reconnected; the copy sent again after hello changed nothing.
        box_1 = (tmp_path / "box-1.log").read_text()
        assert box_1.count(f"task {planning['id']} (planning") == 1, box_1
        resumed = box_1[resumed_at:]
        reconnected = CONNECTED.search(resumed)
        assert reconnected is not None, logs(stack, tmp_path)
        assert resumed.index(f"task {planning['id']} (planning") < reconnected.start(), resumed
        assert daemon_status(stack, "box-1") == "connected"
