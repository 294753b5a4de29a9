"""A heartbeat listing tasks that are no longer the daemon's: it is told to
interrupt them, as a hello would be (protocol.md, Handshake; Liveness).

The case that matters: a daemon that froze (SIGSTOP, a suspended machine)
without its socket closing, whose task the server interrupted when the lease
ran out and retried elsewhere, wakes up and heartbeats on the same socket."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from contracts.models import Task
from contracts.services import task_cancel
from daemons.models import ApiToken, Daemon, DaemonCommand
from daemons.services import daemon_heartbeat
from directives.lifecycle import advance, reconcile
from directives.models import Step
from directives.services import directive_start
from makima.state import SYSTEM, Actor
from tests.daemons.conftest import db, receive_all, say_hello
from tests.factories import make_daemon, make_directive, make_steps, make_task, make_token, make_user

pytestmark = pytest.mark.django_db(transaction=True)

REASON = "this task is no longer assigned to this daemon"


@pytest.fixture
async def alice_key():
    @db
    def create():
        user = make_user("alice")
        return user, make_token(user, kind=ApiToken.Kind.DAEMON).plain

    return await create()


@db
def fresh(instance):
    instance.refresh_from_db()
    return instance


@db
def interrupts(daemon_id, task_id: str | None = None) -> list[DaemonCommand]:
    commands = DaemonCommand.objects.filter(daemon_id=daemon_id, command_type=DaemonCommand.CommandType.INTERRUPT_TASK)
    if task_id is not None:
        commands = commands.filter(payload__task_id=task_id)
    return list(commands.order_by("created_at"))


@db
def start_one_step(owner) -> Task:
    """A started directive with one step, whose execution task is dispatched to a connected daemon."""
    directive = make_directive(owner, agent="scripted")
    make_steps(directive, {"name": "A"})
    directive_start(directive=directive, actor=Actor.for_user(owner))
    advance(directive_ids=[directive.pk])
    return Step.objects.get(directive=directive, name="A").execution_task


async def heartbeat(socket, *task_ids) -> None:
    await socket.send_json_to({"type": "heartbeat", "running_tasks": [str(task_id) for task_id in task_ids]})


async def test_a_daemon_that_wakes_up_on_its_old_socket_is_told_to_stop_the_task_retried_elsewhere(
    open_socket, alice_key, settings
):
    settings.MAKIMA_HEARTBEAT_INTERVAL_S = 10
    settings.MAKIMA_TASK_LEASE_S = 60
    alice, token = alice_key
    with time_machine.travel(timezone.now(), tick=True) as clock:
        frozen = await open_socket(token)
        welcome = await say_hello(frozen, "build-box-1")
        task = await start_one_step(alice)
        spawn = await frozen.receive_json_from(timeout=2)
        assert (spawn["type"], spawn["task"]["id"]) == ("spawn_task", str(task.pk))
        await frozen.send_json_to({"type": "ack", "command_id": spawn["command_id"], "ok": True})
        await frozen.send_json_to({"type": "task_started", "task_id": str(task.pk), "branch": spawn["task"]["branch"]})
        assert await frozen.receive_nothing(timeout=0.2)
        assert (await fresh(task)).status == Task.Status.RUNNING

        # build-box-1 freezes with its socket open: the tick loses it, then its task's lease runs out.
        clock.shift(31)
        await db(reconcile)()
        frozen_daemon = await db(Daemon.objects.get)(pk=welcome["daemon_id"])
        assert frozen_daemon.status == Daemon.Status.DISCONNECTED
        clock.shift(61)
        spare = await open_socket(token)
        await say_hello(spare, "build-box-2")
        await db(reconcile)()
        retry = await spare.receive_json_from(timeout=2)
        assert (retry["type"], retry["task"]["id"]) == ("spawn_task", str(task.pk))
        await spare.send_json_to({"type": "ack", "command_id": retry["command_id"], "ok": True})
        assert await spare.receive_nothing(timeout=0.2)
        task = await fresh(task)
        spare_daemon_id = task.daemon_id
        assert (task.attempt, task.status) == (2, Task.Status.STARTING)
        assert str(spare_daemon_id) != welcome["daemon_id"]

        # build-box-1 wakes up and heartbeats on the same socket, still running attempt 1.
        await heartbeat(frozen, task.pk)

        interrupt = await frozen.receive_json_from(timeout=2)
        assert interrupt == {
            "type": "interrupt_task",
            "command_id": interrupt["command_id"],
            "task_id": str(task.pk),
            "reason": REASON,
        }
        assert (await fresh(frozen_daemon)).status == Daemon.Status.CONNECTED

        # Still listed on the next heartbeat, but the interrupt is not acknowledged yet: not told twice.
        await heartbeat(frozen, task.pk)
        assert await frozen.receive_nothing(timeout=0.3)
        assert len(await interrupts(frozen_daemon.pk, str(task.pk))) == 1

        await frozen.send_json_to({"type": "ack", "command_id": interrupt["command_id"], "ok": True})
        # The agent takes a moment to stop: a heartbeat right after the ack is no reason to remind it.
        await heartbeat(frozen, task.pk)
        assert await frozen.receive_nothing(timeout=0.3)
        (command,) = await interrupts(frozen_daemon.pk, str(task.pk))
        assert command.status == DaemonCommand.Status.ACKED
        assert command.task_id == task.pk

        # The stopped agent's report is refused and attempt 2 is untouched.
        report_id = str(uuid.uuid4())
        await frozen.send_json_to(
            {"type": "task_finished", "id": report_id, "task_id": str(task.pk), "status": "interrupted"}
        )
        error = await frozen.receive_json_from(timeout=2)
        assert (error["type"], error["code"], error["ref"]) == ("error", "not_your_task", report_id)
        task = await fresh(task)
        assert (task.attempt, task.status, task.daemon_id) == (2, Task.Status.STARTING, spare_daemon_id)
        assert await spare.receive_nothing(timeout=0.2)


async def test_a_daemon_that_still_lists_an_interrupted_task_long_after_acknowledging_is_told_again(
    open_socket, alice_key, settings
):
    settings.MAKIMA_TASK_LEASE_S = 60
    alice, token = alice_key
    with time_machine.travel(timezone.now(), tick=True) as clock:
        socket = await open_socket(token)
        welcome = await say_hello(socket)
        elsewhere = await db(make_daemon)(alice, "other-box")
        lost = await db(make_task)(owner=alice, daemon=elsewhere, status="running", attempt=2)
        await heartbeat(socket, lost.pk)
        first = await socket.receive_json_from(timeout=2)
        await socket.send_json_to({"type": "ack", "command_id": first["command_id"], "ok": True})
        assert await socket.receive_nothing(timeout=0.2)  # the ack is handled before the clock moves

        clock.shift(59)
        await heartbeat(socket, lost.pk)
        assert await socket.receive_nothing(timeout=0.3)

        clock.shift(2)
        await heartbeat(socket, lost.pk)
        second = await socket.receive_json_from(timeout=2)

    assert (second["type"], second["task_id"]) == ("interrupt_task", str(lost.pk))
    assert second["command_id"] != first["command_id"]
    assert len(await interrupts(welcome["daemon_id"])) == 2


@pytest.fixture
async def connected(open_socket, alice_key):
    """alice's daemon ``build-box-1``, said hello, with a running task."""
    alice, token = alice_key

    @db
    def create():
        daemon = make_daemon(alice)
        return daemon, make_task(owner=alice, daemon=daemon, status="running", started_at=timezone.now())

    daemon, task = await create()
    socket = await open_socket(token)
    await say_hello(socket, running_tasks=[str(task.pk)])
    return socket, daemon, task


async def test_a_heartbeat_listing_only_its_own_tasks_gets_no_command(connected):
    socket, daemon, task = connected
    paused = await db(make_task)(owner=daemon.owner, daemon=daemon, status="paused")
    starting = await db(make_task)(owner=daemon.owner, daemon=daemon, status="starting")

    await heartbeat(socket, task.pk, paused.pk, starting.pk)

    assert await socket.receive_nothing(timeout=0.3)
    assert await interrupts(daemon.pk) == []


async def test_a_task_whose_report_was_stored_may_be_listed_until_received_arrives(connected):
    socket, daemon, task = connected
    done = await db(make_task)(owner=daemon.owner, daemon=daemon, status="done")
    failed = await db(make_task)(owner=daemon.owner, daemon=daemon, status="failed")

    await heartbeat(socket, task.pk, done.pk, failed.pk)

    assert await socket.receive_nothing(timeout=0.3)
    assert await interrupts(daemon.pk) == []


async def test_a_task_the_server_interrupted_while_still_on_this_daemon_is_interrupted_there(connected):
    socket, _, task = connected
    # The lease ran out and no attempts are left (or the retry has not happened yet): it stays on the daemon.
    await db(lambda: Task.objects.filter(pk=task.pk).update(status=Task.Status.INTERRUPTED))()

    await heartbeat(socket, task.pk)

    message = await socket.receive_json_from(timeout=2)
    assert (message["type"], message["task_id"], message["reason"]) == ("interrupt_task", str(task.pk), REASON)


async def test_a_cancelled_task_gets_the_interrupt_of_its_cancel_and_no_second_one(connected):
    socket, daemon, task = connected
    await db(lambda: task_cancel(tasks=[task], actor=SYSTEM, reason="the directive was stopped"))()
    cancel = await socket.receive_json_from(timeout=2)
    assert (cancel["type"], cancel["reason"]) == ("interrupt_task", "the directive was stopped")

    await heartbeat(socket, task.pk)

    assert await socket.receive_nothing(timeout=0.3)
    assert len(await interrupts(daemon.pk)) == 1


async def test_foreign_and_unknown_task_ids_get_the_same_answer_and_nothing_changes(connected):
    socket, daemon, task = connected

    @db
    def bobs_task() -> Task:
        bob = make_user("bob")
        return make_task(owner=bob, daemon=make_daemon(bob, "bobs-box"), status="running")

    foreign = await bobs_task()
    unknown = str(uuid.uuid4())

    await heartbeat(socket, task.pk, foreign.pk, unknown)

    messages = await receive_all(socket)
    assert sorted(m["task_id"] for m in messages) == sorted([str(foreign.pk), unknown])
    assert [{k: v for k, v in m.items() if k not in ("command_id", "task_id")} for m in messages] == [
        {"type": "interrupt_task", "reason": REASON}
    ] * 2
    # No command (nor its event) is tied to bob's task; bob's task runs on.
    assert [c.task_id for c in await interrupts(daemon.pk)] == [None, None]
    foreign = await fresh(foreign)
    assert (foreign.status, foreign.last_heartbeat_at) == (Task.Status.RUNNING, None)
    # The connection goes on as before.
    await heartbeat(socket, task.pk, foreign.pk, unknown)
    assert await socket.receive_nothing(timeout=0.3)


async def test_a_heartbeat_listing_something_that_is_not_a_uuid_is_invalid_and_the_socket_stays_open(connected):
    socket, daemon, task = connected

    await heartbeat(socket, task.pk, "not-a-uuid")

    error = await socket.receive_json_from(timeout=2)
    assert (error["type"], error["code"]) == ("error", "invalid")
    await heartbeat(socket, task.pk)
    assert await socket.receive_nothing(timeout=0.3)
    assert await interrupts(daemon.pk) == []


# --------------------------------------------------------------------------- the service


def test_a_heartbeat_of_its_own_running_tasks_costs_no_more_queries_than_an_empty_one(alice, django_assert_num_queries):
    daemon = make_daemon(alice, status=Daemon.Status.CONNECTED, connection_id="c1")
    tasks = [make_task(owner=alice, daemon=daemon, status=status) for status in ("running", "paused", "starting")]
    with django_assert_num_queries(2):
        daemon_heartbeat(daemon=daemon, connection_id="c1", running_tasks=[])

    with django_assert_num_queries(3):  # the same two, and the lease renewal
        beat = daemon_heartbeat(daemon=daemon, connection_id="c1", running_tasks=[str(t.pk) for t in tasks])

    assert beat.interrupt_task_ids == []
    assert not DaemonCommand.objects.exists()


def test_a_replaced_socket_heartbeat_renews_leases_but_tells_nothing(alice):
    daemon = make_daemon(alice, status=Daemon.Status.CONNECTED, connection_id="new")
    elsewhere = make_task(owner=alice, status="pending", attempt=2)

    beat = daemon_heartbeat(daemon=daemon, connection_id="old", running_tasks=[str(elsewhere.pk)])

    assert beat.interrupt_task_ids == []
    assert not DaemonCommand.objects.exists()


def test_an_interrupt_acknowledged_longer_ago_than_the_lease_does_not_hold_back_a_new_one(alice, settings):
    settings.MAKIMA_TASK_LEASE_S = 60
    daemon = make_daemon(alice, status=Daemon.Status.CONNECTED, connection_id="c1")
    elsewhere = make_task(owner=alice, status="pending")
    listed = [str(elsewhere.pk)]
    beat = daemon_heartbeat(daemon=daemon, connection_id="c1", running_tasks=listed)
    assert beat.interrupt_task_ids == listed
    DaemonCommand.objects.update(status=DaemonCommand.Status.ACKED, acked_at=timezone.now() - timedelta(seconds=61))

    assert daemon_heartbeat(daemon=daemon, connection_id="c1", running_tasks=listed).interrupt_task_ids == listed
