"""Commands to daemons (protocol.md, Server → daemon; Liveness and delivery):
outbox delivery on hello, by polling and on wake-ups; acks; reconciliation;
dispatch of pending tasks to a connecting daemon."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid

import pytest
from django.db import OperationalError, connection, transaction

from contracts.models import Task
from contracts.services import task_create
from daemons import consumers
from daemons.models import ApiToken, Daemon, DaemonCommand
from daemons.services import command_enqueue, daemon_wake, token_authenticate
from directives.models import Directive, Step
from tests.daemons.conftest import db, receive_all, say_hello
from tests.factories import make_command, make_daemon, make_directive, make_steps, make_task, make_token, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def alice_key():
    @db
    def create():
        user = make_user("alice")
        return user, make_token(user, kind=ApiToken.Kind.DAEMON).plain

    return await create()


@pytest.fixture
def lifecycle_calls(monkeypatch):
    """Records ``directives.lifecycle.on_task_finished`` calls instead of running the orchestrator."""
    calls: list = []
    monkeypatch.setattr("directives.lifecycle.on_task_finished", lambda *, task_id: calls.append(str(task_id)))
    return calls


@db
def fresh(instance):
    instance.refresh_from_db()
    return instance


@db
def interrupt_command(daemon: Daemon, task_id: str, task: Task | None = None) -> DaemonCommand:
    return command_enqueue(
        daemon_id=daemon.pk,
        owner_id=daemon.owner_id,
        task=task,
        command_type=DaemonCommand.CommandType.INTERRUPT_TASK,
        payload={"task_id": task_id, "reason": "stop"},
    )


# --------------------------------------------------------------------------- delivery


async def test_a_queued_command_is_delivered_on_hello_and_marked_sent(open_socket, alice_key):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice)
    task = await db(make_task)(owner=alice, daemon=daemon, status="starting")
    command = await db(make_command)(daemon, task)
    socket = await open_socket(token)

    await say_hello(socket)

    message = await socket.receive_json_from()
    assert message == {"type": "spawn_task", "command_id": str(command.pk), "task": {"id": str(task.pk)}}
    command = await fresh(command)
    assert command.status == DaemonCommand.Status.SENT
    assert command.sent_at is not None


async def test_commands_are_delivered_oldest_first(open_socket, alice_key):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice)
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for task_id in ids:
        await interrupt_command(daemon, task_id)
    socket = await open_socket(token)
    await say_hello(socket)

    messages = await receive_all(socket)

    assert [m["task_id"] for m in messages] == ids
    assert all(m["type"] == "interrupt_task" and m["reason"] == "stop" for m in messages)


async def test_a_command_queued_by_another_process_is_delivered_by_polling(open_socket, alice_key):
    alice, token = alice_key
    socket = await open_socket(token)
    welcome = await say_hello(socket)
    task_id = str(uuid.uuid4())

    def another_process() -> DaemonCommand:
        # A plain thread with its own connection, and no wake-up: only the poll can find it.
        try:
            return command_enqueue(
                daemon_id=welcome["daemon_id"],
                owner_id=alice.pk,
                command_type="interrupt_task",
                payload={"task_id": task_id, "reason": "stop"},
            )
        finally:
            connection.close()

    command = await asyncio.to_thread(another_process)

    message = await socket.receive_json_from(timeout=3)
    assert message == {"type": "interrupt_task", "command_id": str(command.pk), "task_id": task_id, "reason": "stop"}
    assert (await fresh(command)).status == DaemonCommand.Status.SENT


async def test_a_wake_up_delivers_at_once(open_socket, settings, alice_key):
    settings.MAKIMA_OUTBOX_POLL_S = 30  # the poll would come far too late
    alice, token = alice_key
    socket = await open_socket(token)
    welcome = await say_hello(socket)

    @db
    def enqueue_and_wake() -> DaemonCommand:
        with transaction.atomic():
            command = command_enqueue(
                daemon_id=welcome["daemon_id"],
                owner_id=alice.pk,
                command_type="send_message",
                payload={"task_id": str(uuid.uuid4()), "message": "hi"},
            )
            daemon_wake(daemon_id=welcome["daemon_id"])
        return command

    command = await enqueue_and_wake()

    message = await socket.receive_json_from(timeout=0.5)
    assert (message["type"], message["command_id"], message["message"]) == ("send_message", str(command.pk), "hi")


async def test_simultaneous_wake_ups_send_a_command_once(open_socket, settings, alice_key):
    settings.MAKIMA_OUTBOX_POLL_S = 30
    alice, token = alice_key
    socket = await open_socket(token)
    welcome = await say_hello(socket)

    @db
    def enqueue_and_wake_three_times() -> None:
        with transaction.atomic():
            command_enqueue(
                daemon_id=welcome["daemon_id"],
                owner_id=alice.pk,
                command_type="interrupt_task",
                payload={"task_id": str(uuid.uuid4()), "reason": "stop"},
            )
            for _ in range(3):
                daemon_wake(daemon_id=welcome["daemon_id"])

    await enqueue_and_wake_three_times()

    assert len(await receive_all(socket)) == 1


async def test_a_command_sent_but_never_acknowledged_is_sent_again_after_a_reconnect(open_socket, alice_key):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice)
    command = await interrupt_command(daemon, str(uuid.uuid4()))
    first = await open_socket(token)
    await say_hello(first)
    assert (await first.receive_json_from())["command_id"] == str(command.pk)
    await first.disconnect()
    assert (await fresh(command)).status == DaemonCommand.Status.SENT

    second = await open_socket(token)
    await say_hello(second)

    assert (await second.receive_json_from())["command_id"] == str(command.pk)
    await second.send_json_to({"type": "ack", "command_id": str(command.pk), "ok": True})
    assert await second.receive_nothing()
    assert (await fresh(command)).status == DaemonCommand.Status.ACKED


async def test_an_acknowledged_command_is_not_sent_again(open_socket, alice_key):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice)
    command = await interrupt_command(daemon, str(uuid.uuid4()))
    first = await open_socket(token)
    await say_hello(first)
    await first.receive_json_from()
    await first.send_json_to({"type": "ack", "command_id": str(command.pk), "ok": True})
    await first.disconnect()

    second = await open_socket(token)
    await say_hello(second)

    assert await receive_all(second) == []


# --------------------------------------------------------------------------- acks


async def test_an_ack_marks_the_command_acked(open_socket, alice_key):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice)
    command = await interrupt_command(daemon, str(uuid.uuid4()))
    socket = await open_socket(token)
    await say_hello(socket)
    await socket.receive_json_from()

    await socket.send_json_to({"type": "ack", "command_id": str(command.pk), "ok": True})
    await socket.send_json_to({"type": "ack", "command_id": str(command.pk), "ok": True})  # repeats are harmless

    assert await socket.receive_nothing()
    command = await fresh(command)
    assert command.status == DaemonCommand.Status.ACKED
    assert command.acked_at is not None


async def test_a_negative_ack_marks_the_command_failed_with_its_error(open_socket, alice_key):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice)
    command = await interrupt_command(daemon, str(uuid.uuid4()))
    socket = await open_socket(token)
    await say_hello(socket)
    await socket.receive_json_from()

    await socket.send_json_to({"type": "ack", "command_id": str(command.pk), "ok": False, "error": "no such task"})

    assert await socket.receive_nothing()
    command = await fresh(command)
    assert (command.status, command.error) == (DaemonCommand.Status.FAILED, "no such task")


async def test_an_ack_for_an_unknown_or_foreign_command_is_invalid_and_changes_nothing(open_socket, alice_key):
    _, token = alice_key
    bob = await db(make_user)("bob")
    bobs_daemon = await db(make_daemon)(bob, "bobs-box")
    bobs_command = await interrupt_command(bobs_daemon, str(uuid.uuid4()))
    socket = await open_socket(token)
    await say_hello(socket)

    for command_id in (str(uuid.uuid4()), str(bobs_command.pk)):
        await socket.send_json_to({"type": "ack", "id": "a1", "command_id": command_id, "ok": True})
        error = await socket.receive_json_from()
        assert error == {
            "type": "error",
            "code": "invalid",
            "message": "command_id: no such command for this daemon",
            "ref": "a1",
        }
    assert (await fresh(bobs_command)).status == DaemonCommand.Status.QUEUED


@db
def active_directive_with_pending_step_task(owner) -> tuple[Directive, Step, Task]:
    directive = make_directive(owner)
    Directive.objects.filter(pk=directive.pk).update(status=Directive.Status.ACTIVE)
    (step,) = make_steps(directive, {"name": "Build it"})
    task = make_task(directive, step=step)
    return directive, step, task


async def test_a_refused_spawn_task_goes_to_another_daemon(open_socket, alice_key):
    alice, token = alice_key
    _, step, task = await active_directive_with_pending_step_task(alice)
    refusing = await open_socket(token)
    await say_hello(refusing, "box-a")
    spawn = await refusing.receive_json_from()
    assert (spawn["type"], spawn["task"]["id"]) == ("spawn_task", str(task.pk))
    other = await open_socket(token)
    await say_hello(other, "box-b")
    assert await other.receive_nothing()  # the task is taken

    await refusing.send_json_to({"type": "ack", "command_id": spawn["command_id"], "ok": False, "error": "capacity"})

    respawn = await other.receive_json_from(timeout=1)
    assert (respawn["type"], respawn["task"]["id"]) == ("spawn_task", str(task.pk))
    assert respawn["command_id"] != spawn["command_id"]
    assert respawn["task"]["env"]["MAKIMA_API_KEY"] != spawn["task"]["env"]["MAKIMA_API_KEY"]
    task = await db(Task.objects.select_related("daemon").get)(pk=task.pk)
    assert (task.status, task.daemon.name) == (Task.Status.STARTING, "box-b")
    refused = await db(DaemonCommand.objects.get)(pk=spawn["command_id"])
    assert (refused.status, refused.error) == (DaemonCommand.Status.FAILED, "capacity")
    assert (await fresh(step)).status == Step.Status.RUNNING  # ready after the refusal, running again on box-b
    # The first spawn's task token died with the refusal.
    assert await db(token_authenticate)(spawn["task"]["env"]["MAKIMA_API_KEY"]) is None
    assert await refusing.receive_nothing()


async def test_a_refused_spawn_task_waits_pending_with_its_step_ready_when_no_other_daemon_can_take_it(
    open_socket, alice_key
):
    alice, token = alice_key
    _, step, task = await active_directive_with_pending_step_task(alice)
    socket = await open_socket(token)
    await say_hello(socket)
    spawn = await socket.receive_json_from()
    assert (await fresh(step)).status == Step.Status.RUNNING

    await socket.send_json_to({"type": "ack", "command_id": spawn["command_id"], "ok": False, "error": "unknown_agent"})

    assert await socket.receive_nothing(timeout=0.3)  # not offered to the daemon that refused it
    task = await fresh(task)
    assert (task.status, task.daemon_id) == (Task.Status.PENDING, None)
    assert (await fresh(step)).status == Step.Status.READY


# --------------------------------------------------------------------------- dispatch on hello


async def test_a_daemon_with_capacity_receives_its_owners_pending_task_on_hello(open_socket, alice_key):
    alice, token = alice_key
    task = await db(task_create)(
        owner=alice,
        name="Write the docs",
        kind="execution",
        agent="scripted",
        plan="Write them.",
        repository_url="https://example.com/r.git",
    )
    bob = await db(make_user)("bob")
    await db(make_task)(owner=bob)  # not alice's: never offered to her daemon
    socket = await open_socket(token)

    welcome = await say_hello(socket)

    spawn = await socket.receive_json_from()
    assert spawn["type"] == "spawn_task"
    uuid.UUID(spawn["command_id"])
    offered = spawn["task"]
    assert set(offered) == {
        "id",
        "name",
        "kind",
        "agent",
        "plan",
        "repository_url",
        "local_path",
        "base_branch",
        "branch",
        "continue_from",
        "merge_branches",
        "completion_action",
        "verifiers",
        "timeout_s",
        "env",
    }
    task = await fresh(task)
    assert offered["id"] == str(task.pk)
    assert offered["branch"] == task.branch and offered["branch"].startswith("makima/write-the-docs-")
    assert offered["continue_from"] is None
    assert (offered["agent"], offered["repository_url"], offered["base_branch"]) == (
        "scripted",
        "https://example.com/r.git",
        "main",
    )
    assert set(offered["env"]) == {
        "MAKIMA_URL",
        "MAKIMA_API_KEY",
        "MAKIMA_TASK_ID",
        "MAKIMA_DIRECTIVE_ID",
        "MAKIMA_CONTRACT_ID",
        "MAKIMA_STEP_ID",
    }
    assert offered["env"]["MAKIMA_TASK_ID"] == str(task.pk)
    live = await db(token_authenticate)(offered["env"]["MAKIMA_API_KEY"], kinds=frozenset({"task"}))
    assert live is not None and live.task_id == task.pk
    assert (task.status, str(task.daemon_id)) == (Task.Status.STARTING, welcome["daemon_id"])
    command = await db(DaemonCommand.objects.get)(pk=spawn["command_id"])
    assert command.status == DaemonCommand.Status.SENT
    assert await socket.receive_nothing()


async def test_a_daemon_without_the_tasks_agent_is_not_offered_it(open_socket, alice_key):
    alice, token = alice_key
    await db(make_task)(owner=alice, agent="claude")
    socket = await open_socket(token)

    await say_hello(socket, agents=["scripted"])

    assert await socket.receive_nothing()


# --------------------------------------------------------------------------- reconciliation


async def test_hello_interrupts_assigned_tasks_the_daemon_no_longer_runs(open_socket, alice_key, lifecycle_calls):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice)
    lost = await db(make_task)(owner=alice, daemon=daemon, status="running")
    paused = await db(make_task)(owner=alice, daemon=daemon, status="paused")
    kept = await db(make_task)(owner=alice, daemon=daemon, status="running")
    socket = await open_socket(token)

    await say_hello(socket, running_tasks=[str(kept.pk)])

    assert await socket.receive_nothing()
    lost, paused, kept = await fresh(lost), await fresh(paused), await fresh(kept)
    assert (lost.status, paused.status, kept.status) == ("interrupted", "interrupted", "running")
    assert lost.finished_at is not None
    assert kept.last_heartbeat_at is not None
    assert sorted(lifecycle_calls) == sorted([str(lost.pk), str(paused.pk)])


async def test_hello_keeps_a_starting_task_whose_spawn_task_has_not_reached_the_daemon(
    open_socket, alice_key, lifecycle_calls
):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice)
    task = await db(make_task)(owner=alice, daemon=daemon, status="starting")
    command = await db(make_command)(daemon, task)
    socket = await open_socket(token)

    await say_hello(socket, running_tasks=[])

    assert (await socket.receive_json_from())["command_id"] == str(command.pk)
    assert (await fresh(task)).status == Task.Status.STARTING
    assert lifecycle_calls == []


async def test_hello_tells_the_daemon_to_interrupt_tasks_that_are_not_assigned_to_it(
    open_socket, alice_key, lifecycle_calls
):
    alice, token = alice_key
    elsewhere = await db(make_daemon)(alice, "other-box")
    others = await db(make_task)(owner=alice, daemon=elsewhere, status="running")
    finished = await db(make_task)(owner=alice, status="done")
    unknown = str(uuid.uuid4())
    socket = await open_socket(token)

    await say_hello(socket, running_tasks=[str(others.pk), str(finished.pk), unknown])

    messages = await receive_all(socket)
    assert {m["type"] for m in messages} == {"interrupt_task"}
    assert sorted(m["task_id"] for m in messages) == sorted([str(others.pk), str(finished.pk), unknown])
    assert all(m["reason"] for m in messages)
    commands = await db(lambda: {str(c.pk): c.task_id for c in DaemonCommand.objects.all()})()
    assert {commands[m["command_id"]] for m in messages} == {others.pk, finished.pk, None}
    assert (await fresh(others)).status == "running"  # the server's own record is not touched


# --------------------------------------------------------------------------- delivery failures


class FlakyClaims:
    """``command_claim`` as the consumer calls it, failing like a database that is down while ``down``."""

    def __init__(self) -> None:
        self.down = True
        self.failures = 0
        self.real = consumers.command_claim

    def __call__(self, **kwargs):
        if self.down:
            self.failures += 1
            raise OperationalError("connection to server at 127.0.0.1, port 5432 failed: Connection refused")
        return self.real(**kwargs)


@pytest.fixture
async def outage(open_socket, settings, alice_key, monkeypatch, caplog):
    """alice's daemon connected and polling its outbox every 10 ms, then the database goes away."""
    settings.MAKIMA_OUTBOX_POLL_S = 0.01
    _, token = alice_key
    socket = await open_socket(token)
    welcome = await say_hello(socket)
    assert await socket.receive_nothing(timeout=0.1)  # hello has delivered and dispatched
    claims = FlakyClaims()
    monkeypatch.setattr(consumers, "command_claim", claims)
    caplog.set_level(logging.INFO, logger="daemons.consumers")
    return socket, welcome["daemon_id"], claims


async def eventually(predicate, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def gateway_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "daemons.consumers"]


async def test_an_outbox_that_cannot_be_read_logs_one_traceback_not_one_per_poll(outage, caplog):
    socket, daemon_id, claims = outage

    await eventually(lambda: claims.failures >= 20)
    claims.down = False
    await eventually(lambda: len(gateway_records(caplog)) >= 2)
    await asyncio.sleep(0.05)  # a few good polls more: they log nothing

    failed, recovered = gateway_records(caplog)
    assert (failed.levelname, failed.getMessage()) == ("ERROR", "daemon build-box-1: outbox delivery failed")
    assert isinstance(failed.exc_info[1], OperationalError)
    assert recovered.levelname == "INFO"
    assert recovered.exc_info is None
    failures = int(re.search(r"works again after (\d+) failures", recovered.getMessage()).group(1))
    assert failures == claims.failures >= 20

    # It really works again: a command queued meanwhile goes out with the next poll.
    command = await interrupt_command(await db(Daemon.objects.get)(pk=daemon_id), str(uuid.uuid4()))
    assert (await socket.receive_json_from(timeout=2))["command_id"] == str(command.pk)


async def test_a_long_outage_is_reported_at_most_once_a_period_without_traceback(outage, caplog, monkeypatch):
    _, _, claims = outage
    monkeypatch.setattr(consumers, "DELIVERY_FAILURE_LOG_S", 0.1)

    await eventually(lambda: claims.failures >= 50)
    claims.down = False
    await eventually(lambda: "works again" in gateway_records(caplog)[-1].getMessage())

    first, *still, recovered = gateway_records(caplog)
    assert first.exc_info is not None
    assert 1 <= len(still) <= (recovered.created - first.created) / 0.1 + 1  # at most one a period
    assert len(still) < claims.failures - 1  # not one a failure
    assert all(r.levelname == "ERROR" and r.exc_info is None and "still fails" in r.getMessage() for r in still)
    assert all("OperationalError: connection to server" in r.getMessage() for r in still)
    counts = [int(re.search(r"\((\d+) failures since the first", r.getMessage()).group(1)) for r in still]
    assert counts == sorted(counts) and counts[-1] <= claims.failures
    assert recovered.exc_info is None


async def test_wake_ups_during_an_outage_share_the_polls_single_traceback(outage, caplog, settings):
    _, daemon_id, claims = outage
    settings.MAKIMA_OUTBOX_POLL_S = 30  # after at most one more poll, only the wake-ups try
    await asyncio.sleep(0.05)
    before = claims.failures

    for _ in range(5):
        await db(lambda: daemon_wake(daemon_id=daemon_id))()
    await eventually(lambda: claims.failures >= before + 5)

    assert [r.exc_info is not None for r in gateway_records(caplog)] == [True]
