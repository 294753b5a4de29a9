"""A daemon's network goes silent mid-task: no close frame, no FIN, no RST.

box-1 reaches daphne through a :class:`~tests.faults.tcp_proxy.TcpProxy`;
while it runs the demo's Names step (slowed by a ``sleep``) the proxy is
frozen. Only the heartbeat deadline can tell the server that box-1 is gone:
after 3 silent heartbeat intervals the tick marks it disconnected, after the
lease the task is interrupted and retried, and box-2 (connected directly)
runs attempt 2. Then the link comes back, either as it was (``thaw``: box-1's
piled-up heartbeats and its late report of attempt 1 arrive on the very same
socket) or reset (``cut``: box-1 reconnects and says hello listing the task).
Either way the late report must be refused, not stored over attempt 2.

The agent's own REST calls (the `makima` CLI) go to the server directly, as
they would from a machine whose websocket alone went through a dead NAT.

The link can also go silent while a ``spawn_task`` is on its way: then the
command stays unacknowledged in the outbox after the task went to box-2, and
box-1's next hello must not bring it back to life.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from django.db.models import F

from contracts.models import Task
from contracts.services import task_dispatch_pending, task_transition
from daemons.models import DaemonCommand
from daemons.services import command_claim, daemon_disconnect, daemon_hello
from tests.e2e.stack import running_stack, start_ticker
from tests.e2e.test_worker import logs, start_demo, steps_of, tasks_of, wait_for
from tests.factories import make_daemon, make_task
from tests.faults.conftest import (
    FAST,
    assert_nothing_lost_or_duplicated,
    commands_of,
    daemon_status,
    demo_repository,
    wait_until,
)
from tests.faults.tcp_proxy import TcpProxy


def git(repository: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repository, capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["thaw", "cut"])
def test_a_daemon_gone_silent_loses_its_task_to_another_daemon_and_its_late_report_changes_nothing(
    tmp_path: Path, ending: str
) -> None:
    repository = demo_repository(tmp_path / "greeter.git", sleep={"Names": 6})
    with running_stack(extra_env=FAST, cluster=True) as stack:
        start_ticker(stack)
        port = int(stack.base_url.rsplit(":", 1)[1])
        with TcpProxy("127.0.0.1", port) as proxy:
            # argparse keeps the last --server: box-1's websocket goes through the proxy.
            stack.start_daemon("box-1", tmp_path / "box-1", extra=("--server", proxy.url))
            wait_until(
                "box-1 to connect",
                lambda: daemon_status(stack, "box-1") == "connected",
                timeout=30,
                stack=stack,
                tmp_path=tmp_path,
            )
            directive = start_demo(stack, repository)
            steps = wait_until(
                "the plan",
                lambda: (s := steps_of(stack, directive["id"])) and "Names" in s and s,
                timeout=60,
                stack=stack,
                tmp_path=tmp_path,
            )
            names = steps["Names"]["id"]

            def names_task() -> dict | None:
                found = [t for t in tasks_of(stack, directive["id"]) if t["step"] == names]
                return found[0] if len(found) == 1 else None

            victim = wait_until(
                "Names to run on box-1",
                lambda: (t := names_task()) and t["status"] == "running" and t,
                timeout=60,
                stack=stack,
                tmp_path=tmp_path,
            )
            assert (victim["daemon_name"], victim["attempt"]) == ("box-1", 1)

            proxy.freeze()
            sockets = proxy.accepted
            stack.start_daemon("box-2", tmp_path / "box-2")

            # The server hears nothing (no close): the heartbeat deadline is all it has.
            wait_until(
                "box-1 to be marked disconnected",
                lambda: daemon_status(stack, "box-1") == "disconnected",
                timeout=30,
                stack=stack,
                tmp_path=tmp_path,
            )
            retried = wait_until(
                "Names to run again on box-2",
                lambda: (t := names_task()) and t["attempt"] == 2 and t["status"] == "running" and t,
                timeout=45,
                stack=stack,
                tmp_path=tmp_path,
            )
            assert retried["daemon_name"] == "box-2"
            # Still the socket box-1 had: it noticed nothing (a reconnect would be another one).
            assert proxy.accepted == sockets, logs(stack, tmp_path)

            if ending == "thaw":
                proxy.thaw()
            else:
                proxy.cut()
            done = wait_for(stack, tmp_path, directive["id"], {"completed"}, timeout=120)

            steps = steps_of(stack, directive["id"])
            tasks, _events, commands = assert_nothing_lost_or_duplicated(
                stack, tmp_path, directive["id"], steps=steps, attempts={"Names": 2}
            )
            [task] = [t for t in tasks if t["step"] == names and t["kind"] == "execution"]
            assert (task["id"], task["status"], task["attempt"], task["daemon_name"]) == (
                victim["id"],
                "done",
                2,
                "box-2",
            )
            # box-1's attempt 1 did report (late) and was told the task is not its own any more.
            box_1 = (tmp_path / "box-1.log").read_text()
            assert f"dropping the report on task {victim['id']}" in box_1, logs(stack, tmp_path)
            assert not list((tmp_path / "box-1" / "spool").glob("*.json"))
            interrupts = [c for c in commands if c.command_type == "interrupt_task"]
            if ending == "thaw":
                # The same socket carried on: its heartbeats made box-1 connected again, no hello. A
                # heartbeat that still listed the task (before its late report was dropped) was told,
                # once, to interrupt it (daemons.services._interrupt_strangers).
                assert proxy.accepted == sockets, box_1
                assert daemon_status(stack, "box-1") == "connected"
                assert [(c.task_id, c.daemon, c.status) for c in interrupts] in (
                    [],
                    [(victim["id"], "box-1", "acked")],
                )
            else:
                # A new socket: hello listed the task, which is box-2's now, so box-1 was told to drop it.
                assert proxy.accepted == sockets + 1, box_1
                assert [(c.task_id, c.daemon, c.status) for c in interrupts] == [(victim["id"], "box-1", "acked")]
            # Attempt 2's work is what the branch holds, not attempt 1's late push.
            assert git(repository, "rev-parse", f"refs/heads/{task['branch']}") == task["commit_sha"]
            assert done["status"] == "completed"


@pytest.mark.slow
def test_a_spawn_task_stuck_in_a_silent_link_is_not_run_after_its_task_moved_on(tmp_path: Path) -> None:
    # box-1's link is frozen before the directive starts: the planning task's
    # spawn_task is sent into it and never arrives. The lease gives the task to
    # box-2. When box-1's link is reset and it says hello again, the command
    # still waits unacknowledged in its outbox; sending it now would have box-1
    # run a task that is box-2's (with a dead token, pushing to its branch).
    # Heartbeats every 2 s: the directive's start has 6 s to dispatch to box-1
    # before the silence counts.
    repository = demo_repository(tmp_path / "greeter.git")
    with running_stack(extra_env={**FAST, "MAKIMA_HEARTBEAT_INTERVAL_S": "2"}, cluster=True) as stack:
        start_ticker(stack)
        port = int(stack.base_url.rsplit(":", 1)[1])
        with TcpProxy("127.0.0.1", port) as proxy:
            stack.start_daemon("box-1", tmp_path / "box-1", extra=("--server", proxy.url))
            wait_until(
                "box-1 to connect",
                lambda: daemon_status(stack, "box-1") == "connected",
                timeout=30,
                stack=stack,
                tmp_path=tmp_path,
            )
            proxy.freeze()
            sockets = proxy.accepted
            directive = start_demo(stack, repository)
            [planning] = tasks_of(stack, directive["id"])
            assert (planning["status"], planning["daemon_name"]) == ("starting", "box-1")
            stack.start_daemon("box-2", tmp_path / "box-2")
            wait_until(
                "planning to be retried on box-2",
                lambda: (t := tasks_of(stack, directive["id"])[0])["attempt"] == 2 and t["daemon_name"] == "box-2",
                timeout=45,
                stack=stack,
                tmp_path=tmp_path,
            )
            [stale] = [c for c in commands_of(stack) if c.daemon == "box-1"]
            assert (stale.task_id, stale.command_type, stale.status) == (planning["id"], "spawn_task", "sent")

            proxy.cut()
            wait_until(
                "box-1 to say hello again",
                lambda: daemon_status(stack, "box-1") == "connected",
                timeout=30,
                stack=stack,
                tmp_path=tmp_path,
            )
            wait_for(stack, tmp_path, directive["id"], {"completed"}, timeout=120)

            steps = steps_of(stack, directive["id"])
            tasks, _events, commands = assert_nothing_lost_or_duplicated(
                stack, tmp_path, directive["id"], steps=steps, attempts={"planning": 2}, dropped=[stale.id]
            )
            [task] = [t for t in tasks if t["id"] == planning["id"]]
            assert (task["status"], task["attempt"], task["daemon_name"]) == ("done", 2, "box-2")
            [dropped] = [c for c in commands if c.id == stale.id]
            assert dropped.status == "failed"
            box_1 = (tmp_path / "box-1.log").read_text()
            assert f"task {planning['id']} (planning" not in box_1, box_1
            assert proxy.accepted == sockets + 1


@pytest.mark.django_db
def test_a_spawn_task_whose_task_moved_on_is_dropped_when_its_daemon_says_hello_again(alice) -> None:
    # The same story as above without processes: what command_claim does with
    # a spawn_task that hello queued again after its task went to another daemon.
    box_1 = make_daemon(alice, "box-1")
    moved, due = make_task(owner=alice, name="Moved"), make_task(owner=alice, name="Due")
    first = daemon_hello(owner=alice, name="box-1", agents=["scripted"], max_concurrent_tasks=2)
    assert {t.pk for t in task_dispatch_pending(owner_ids=[alice.pk])} == {moved.pk, due.pk}
    sent = command_claim(daemon_id=box_1.pk, connection_id=first.connection_id).messages
    assert len(sent) == 2  # into a socket that goes silent: never acknowledged

    # The lease runs out for Moved only (say Due was started after all) and it is retried on box-2.
    daemon_disconnect(daemon_id=box_1.pk, connection_id=first.connection_id)
    daemon_hello(owner=alice, name="box-2", agents=["scripted"], max_concurrent_tasks=2)
    moved.refresh_from_db()
    task_transition(task=moved, to=Task.Status.INTERRUPTED)
    task_transition(
        task=moved, to=Task.Status.PENDING, updates={"daemon": None, "attempt": 2, "version": F("version") + 1}
    )
    assert [t.pk for t in task_dispatch_pending(owner_ids=[alice.pk])] == [moved.pk]

    again = daemon_hello(owner=alice, name="box-1", running_tasks=[str(due.pk)])
    delivery = command_claim(daemon_id=box_1.pk, connection_id=again.connection_id)

    assert [m["task"]["id"] for m in delivery.messages] == [str(due.pk)]  # still due: sent again
    stale = DaemonCommand.objects.get(daemon=box_1, task=moved)
    assert stale.status == DaemonCommand.Status.FAILED
    assert "no longer this daemon's" in stale.error
    assert DaemonCommand.objects.get(task=moved, daemon__name="box-2").status == DaemonCommand.Status.QUEUED


@pytest.mark.django_db
def test_an_older_spawn_task_of_a_task_dispatched_again_to_the_same_daemon_is_dropped(alice) -> None:
    # The retry can land on the very daemon that never acknowledged attempt 1
    # (a tick dispatches it right after box-1's hello): then both spawn_tasks
    # wait in its outbox, and only attempt 2's carries a task token that works.
    box_1 = make_daemon(alice, "box-1")
    task = make_task(owner=alice, name="Retried")
    first = daemon_hello(owner=alice, name="box-1", agents=["scripted"], max_concurrent_tasks=2)
    task_dispatch_pending(owner_ids=[alice.pk])
    [old] = command_claim(daemon_id=box_1.pk, connection_id=first.connection_id).messages
    daemon_disconnect(daemon_id=box_1.pk, connection_id=first.connection_id)
    task.refresh_from_db()
    task_transition(task=task, to=Task.Status.INTERRUPTED)
    task_transition(
        task=task, to=Task.Status.PENDING, updates={"daemon": None, "attempt": 2, "version": F("version") + 1}
    )

    again = daemon_hello(owner=alice, name="box-1", agents=["scripted"], max_concurrent_tasks=2)
    assert [t.pk for t in task_dispatch_pending(owner_ids=[alice.pk])] == [task.pk]
    [sent] = command_claim(daemon_id=box_1.pk, connection_id=again.connection_id).messages

    assert sent["command_id"] != old["command_id"]
    assert sent["task"]["env"]["MAKIMA_API_KEY"] != old["task"]["env"]["MAKIMA_API_KEY"]
    assert DaemonCommand.objects.get(pk=old["command_id"]).status == DaemonCommand.Status.FAILED
