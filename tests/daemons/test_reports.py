"""What daemons report (protocol.md, Daemon → server): heartbeats and the
task_* messages, each only about tasks assigned to the reporting daemon."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from contracts.models import Task, TaskOutput
from daemons.models import ApiToken, Daemon, DaemonCommand
from daemons.services import command_enqueue
from directives.lifecycle import advance, reconcile
from directives.models import Directive, Step
from directives.services import directive_start
from makima.state import Actor
from tests.daemons.conftest import db, say_hello
from tests.factories import make_daemon, make_directive, make_steps, make_task, make_token, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@db
def fresh(instance):
    instance.refresh_from_db()
    return instance


@pytest.fixture
async def alice_key():
    @db
    def create():
        user = make_user("alice")
        return user, make_token(user, kind=ApiToken.Kind.DAEMON).plain

    return await create()


@pytest.fixture
async def connected(open_socket, alice_key):
    """alice's daemon ``build-box-1``, said hello, with a running task of a directive."""
    alice, token = alice_key

    @db
    def create():
        daemon = make_daemon(alice)
        directive = make_directive(alice)
        task = make_task(directive, daemon=daemon, status="running", started_at=timezone.now())
        return daemon, directive, task

    daemon, directive, task = await create()
    socket = await open_socket(token)
    await say_hello(socket, running_tasks=[str(task.pk)])
    return socket, daemon, directive, task


@pytest.fixture
def lifecycle_calls(monkeypatch):
    calls: list = []
    monkeypatch.setattr("directives.lifecycle.on_task_finished", lambda *, task_id: calls.append(str(task_id)))
    return calls


async def settle(socket) -> None:
    """Wait until the socket has handled what was sent (no reply expected)."""
    assert await socket.receive_nothing(timeout=0.2)


def finished_report(task: Task, **fields) -> dict:
    report = {
        "type": "task_finished",
        "id": str(uuid.uuid4()),
        "task_id": str(task.pk),
        "status": "done",
        "exit_code": 0,
        "summary": "Added /healthz.",
        "error": None,
        "branch": "makima/health-1234abcd",
        "commit_sha": "a" * 40,
        "cost_usd": 0.42,
        "verifier_results": [
            {
                "name": "pytest",
                "command": "pytest -q",
                "passed": True,
                "exit_code": 0,
                "duration_s": 3.1,
                "output_tail": "1 passed",
            }
        ],
    }
    report.update(fields)
    return report


# --------------------------------------------------------------------------- heartbeat


async def test_a_heartbeat_renews_the_daemon_and_its_tasks(connected):
    socket, daemon, _, task = connected
    before = timezone.now()
    await asyncio.sleep(0.01)

    await socket.send_json_to({"type": "heartbeat", "running_tasks": [str(task.pk)]})
    await settle(socket)

    daemon, task = await fresh(daemon), await fresh(task)
    assert daemon.last_seen_at > before
    assert task.last_heartbeat_at > before


async def test_a_heartbeat_reconnects_a_daemon_the_tick_thought_lost(connected):
    socket, daemon, _, _ = connected
    await db(lambda: Daemon.objects.filter(pk=daemon.pk).update(status=Daemon.Status.DISCONNECTED))()

    await socket.send_json_to({"type": "heartbeat", "running_tasks": []})
    await settle(socket)

    assert (await fresh(daemon)).status == Daemon.Status.CONNECTED


# --------------------------------------------------------------------------- task_started


async def test_task_started_moves_the_task_to_running_and_stores_its_branch(open_socket, alice_key):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice)
    task = await db(make_task)(owner=alice, daemon=daemon, status="starting")
    socket = await open_socket(token)
    await say_hello(socket, running_tasks=[str(task.pk)])
    message = {"type": "task_started", "task_id": str(task.pk), "branch": "makima/x-1", "base_commit": "b" * 40}

    await socket.send_json_to(message)
    await socket.send_json_to(message)  # idempotent
    await settle(socket)

    task = await fresh(task)
    assert (task.status, task.branch, task.base_commit) == ("running", "makima/x-1", "b" * 40)
    assert task.started_at is not None


# --------------------------------------------------------------------------- task_output


async def test_task_output_stores_each_line_once_by_seq(connected):
    socket, _, _, task = connected
    items = [
        {"seq": 1, "stream": "stdout", "content": "collecting"},
        {"seq": 2, "stream": "stderr", "content": "warning"},
        {"seq": 3, "stream": "agent", "content": "thinking"},
    ]

    await socket.send_json_to({"type": "task_output", "task_id": str(task.pk), "items": items})
    await socket.send_json_to(
        {
            "type": "task_output",
            "task_id": str(task.pk),
            "items": [
                {"seq": 3, "stream": "system", "content": "resent"},
                {"seq": 4, "stream": "system", "content": "end"},
            ],
        }
    )
    await settle(socket)

    lines = await db(lambda: list(TaskOutput.objects.filter(task=task).values_list("seq", "stream", "content")))()
    assert lines == [
        (1, "stdout", "collecting"),
        (2, "stderr", "warning"),
        (3, "agent", "thinking"),
        (4, "system", "end"),
    ]


async def test_task_output_accepts_a_full_batch_of_200_lines(connected):
    socket, _, _, task = connected
    items = [{"seq": n, "stream": "stdout", "content": f"line {n}"} for n in range(1, 201)]

    await socket.send_json_to({"type": "task_output", "task_id": str(task.pk), "items": items})
    await settle(socket)

    assert await db(TaskOutput.objects.filter(task=task).count)() == 200


def output_message(task_id: str, seqs: range, text: str) -> dict:
    items = [{"seq": n, "stream": "stdout", "content": f"{text} {n}"} for n in seqs]
    return {"type": "task_output", "task_id": task_id, "items": items}


async def test_a_task_retried_on_another_daemon_keeps_both_attempts_output(open_socket, alice_key, settings):
    """box-a runs attempt 1 and is lost; its lease runs out and the task is
    retried on box-b, whose daemon numbers its lines from 1 again."""
    settings.MAKIMA_TASK_LEASE_S = 1
    settings.MAKIMA_HEARTBEAT_INTERVAL_S = 60  # box-b stays connected through the reconcile below
    alice, token = alice_key
    box_a = await open_socket(token)
    await say_hello(box_a, "box-a")

    @db
    def start() -> str:
        directive = make_directive(alice, agent="scripted")
        make_steps(directive, {"name": "Build it"})
        directive_start(directive=directive, actor=Actor.for_user(alice))
        advance(directive_ids=[directive.pk])
        return str(Step.objects.get(directive=directive).execution_task_id)

    task_id = await start()
    spawn = await box_a.receive_json_from(timeout=2)
    assert (spawn["type"], spawn["task"]["id"]) == ("spawn_task", task_id)
    await box_a.send_json_to({"type": "ack", "command_id": spawn["command_id"], "ok": True})
    await box_a.send_json_to({"type": "task_started", "task_id": task_id})
    await box_a.send_json_to(output_message(task_id, range(1, 4), "first run"))
    await settle(box_a)
    await box_a.disconnect()

    box_b = await open_socket(token)
    await say_hello(box_b, "box-b")
    assert await box_b.receive_nothing()  # still box-a's while its lease runs
    stats = await db(reconcile)(now=timezone.now() + timedelta(seconds=2))
    assert stats["interrupted"] == 1
    respawn = await box_b.receive_json_from(timeout=2)
    assert (respawn["type"], respawn["task"]["id"]) == ("spawn_task", task_id)
    await box_b.send_json_to({"type": "ack", "command_id": respawn["command_id"], "ok": True})
    await box_b.send_json_to({"type": "task_started", "task_id": task_id})
    await box_b.send_json_to(output_message(task_id, range(1, 5), "second run"))
    await box_b.send_json_to(output_message(task_id, range(2, 3), "resent"))  # still stored once
    await settle(box_b)

    task = await db(Task.objects.select_related("daemon").get)(pk=task_id)
    assert (task.attempt, task.status, task.daemon.name) == (2, "running", "box-b")
    lines = await db(lambda: list(TaskOutput.objects.filter(task=task).values_list("attempt", "seq", "content")))()
    assert lines == [(1, n, f"first run {n}") for n in range(1, 4)] + [(2, n, f"second run {n}") for n in range(1, 5)]


# --------------------------------------------------------------------------- task_paused and resuming


async def test_task_paused_pauses_the_task_with_its_question(connected):
    socket, _, _, task = connected

    await socket.send_json_to({"type": "task_paused", "task_id": str(task.pk), "question": "Which port?"})
    await settle(socket)

    task = await fresh(task)
    assert (task.status, task.question) == ("paused", "Which port?")


async def test_an_acknowledged_answer_resumes_a_paused_task(connected):
    socket, daemon, _, task = connected
    started_at = task.started_at
    await socket.send_json_to({"type": "task_paused", "task_id": str(task.pk), "question": "Which port?"})
    await settle(socket)

    await db(command_enqueue)(
        daemon_id=daemon.pk,
        owner_id=daemon.owner_id,
        task=task,
        command_type="send_message",
        payload={"task_id": str(task.pk), "message": "8080"},
    )
    answer = await socket.receive_json_from(timeout=1.5)
    assert (answer["type"], answer["message"]) == ("send_message", "8080")
    await socket.send_json_to({"type": "ack", "command_id": answer["command_id"], "ok": True})
    await settle(socket)

    task = await fresh(task)
    assert (task.status, task.question, task.started_at) == ("running", "", started_at)


async def test_task_started_resumes_a_paused_task(connected):
    socket, _, _, task = connected
    await socket.send_json_to({"type": "task_paused", "task_id": str(task.pk), "question": "Which port?"})

    await socket.send_json_to({"type": "task_started", "task_id": str(task.pk)})
    await settle(socket)

    task = await fresh(task)
    assert (task.status, task.question) == ("running", "")


async def test_task_output_does_not_resume_a_paused_task(connected):
    socket, _, _, task = connected
    await socket.send_json_to({"type": "task_paused", "task_id": str(task.pk), "question": "Which port?"})

    await socket.send_json_to(
        {"type": "task_output", "task_id": str(task.pk), "items": [{"seq": 1, "stream": "agent", "content": "…"}]}
    )
    await settle(socket)

    assert (await fresh(task)).status == "paused"


# --------------------------------------------------------------------------- task_progress


async def test_task_progress_records_the_cumulative_cost(connected):
    socket, _, directive, task = connected

    await socket.send_json_to({"type": "task_progress", "task_id": str(task.pk), "cost_usd": 0.1})
    await socket.send_json_to({"type": "task_progress", "task_id": str(task.pk), "cost_usd": 0.25})
    await settle(socket)

    assert (await fresh(task)).cost_usd == Decimal("0.25")
    assert (await fresh(directive)).total_cost_usd == 0  # counted once, when the task finishes


# --------------------------------------------------------------------------- task_finished


async def test_task_finished_is_stored_then_received_then_handed_to_the_lifecycle(connected, lifecycle_calls):
    socket, _, directive, task = connected
    report = finished_report(task)

    await socket.send_json_to(report)

    assert await socket.receive_json_from() == {"type": "received", "id": report["id"]}
    task = await fresh(task)
    assert (task.status, task.exit_code, task.summary, task.error) == ("done", 0, "Added /healthz.", "")
    assert (task.branch, task.commit_sha, task.cost_usd) == ("makima/health-1234abcd", "a" * 40, Decimal("0.42"))
    assert task.verifier_results == report["verifier_results"]
    assert task.finished_at is not None
    assert (await fresh(directive)).total_cost_usd == Decimal("0.42")
    assert lifecycle_calls == [str(task.pk)]


async def test_a_second_report_for_a_finished_task_is_received_and_changes_nothing(connected, lifecycle_calls):
    socket, _, directive, task = connected
    await socket.send_json_to(finished_report(task))
    await socket.receive_json_from()
    again = finished_report(task, status="failed", exit_code=3, summary="?", cost_usd=9.0)

    await socket.send_json_to(again)

    assert await socket.receive_json_from() == {"type": "received", "id": again["id"]}
    task = await fresh(task)
    assert (task.status, task.exit_code, task.cost_usd) == ("done", 0, Decimal("0.42"))
    assert (await fresh(directive)).total_cost_usd == Decimal("0.42")  # added once
    assert lifecycle_calls == [str(task.pk)]


async def test_a_failed_task_keeps_its_error_and_its_last_progress_cost(connected, lifecycle_calls):
    socket, _, directive, task = connected
    await socket.send_json_to({"type": "task_progress", "task_id": str(task.pk), "cost_usd": 0.3})
    report = {
        "type": "task_finished",
        "id": "r-1",
        "task_id": str(task.pk),
        "status": "failed",
        "exit_code": 2,
        "error": "tests failed",
    }

    await socket.send_json_to(report)

    assert await socket.receive_json_from() == {"type": "received", "id": "r-1"}
    task = await fresh(task)
    assert (task.status, task.exit_code, task.error, task.cost_usd) == ("failed", 2, "tests failed", Decimal("0.3"))
    assert (await fresh(directive)).total_cost_usd == Decimal("0.3")


async def test_a_report_is_kept_when_the_lifecycle_hook_fails(connected, monkeypatch, caplog):
    socket, _, _, task = connected

    def broken(*, task_id):
        raise RuntimeError("orchestrator bug")

    monkeypatch.setattr("directives.lifecycle.on_task_finished", broken)
    report = finished_report(task)

    await socket.send_json_to(report)

    assert await socket.receive_json_from() == {"type": "received", "id": report["id"]}
    await settle(socket)
    assert (await fresh(task)).status == "done"
    assert "orchestrator bug" in caplog.text
    await socket.send_json_to({"type": "heartbeat", "running_tasks": []})
    assert await socket.receive_nothing()  # still connected


async def test_a_finished_task_frees_capacity_for_a_pending_one(open_socket, alice_key):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice, max_concurrent_tasks=1)
    running = await db(make_task)(owner=alice, daemon=daemon, status="running")
    waiting = await db(make_task)(owner=alice)
    socket = await open_socket(token)
    await say_hello(socket, max_concurrent_tasks=1, running_tasks=[str(running.pk)])
    assert await socket.receive_nothing()  # full

    await socket.send_json_to(finished_report(running))

    assert (await socket.receive_json_from())["type"] == "received"
    spawn = await socket.receive_json_from(timeout=1)
    assert (spawn["type"], spawn["task"]["id"]) == ("spawn_task", str(waiting.pk))


# --------------------------------------------------------------------------- not_your_task


@pytest.mark.parametrize(
    "message",
    [
        {"type": "task_started", "branch": "makima/evil"},
        {"type": "task_output", "items": [{"seq": 1, "stream": "stdout", "content": "evil"}]},
        {"type": "task_paused", "question": "evil?"},
        {"type": "task_progress", "cost_usd": 1000},
        {"type": "task_finished", "status": "failed", "cost_usd": 1000},
    ],
    ids=lambda m: m["type"],
)
@pytest.mark.parametrize("whose", ["other daemon", "other owner", "unknown"])
async def test_reports_about_tasks_not_assigned_to_the_daemon_get_not_your_task(open_socket, alice_key, message, whose):
    alice, token = alice_key

    @db
    def create():
        directive = make_directive(alice)
        if whose == "other owner":
            bob = make_user("bob")
            return directive, make_task(owner=bob, daemon=make_daemon(bob), status="running")
        return directive, make_task(directive, daemon=make_daemon(alice, "other-box"), status="running")

    directive, task = await create()
    task_id = str(uuid.uuid4()) if whose == "unknown" else str(task.pk)
    socket = await open_socket(token)
    await say_hello(socket)

    await socket.send_json_to({**message, "id": "r-9", "task_id": task_id})

    error = await socket.receive_json_from()
    assert (error["type"], error["code"], error["ref"]) == ("error", "not_your_task", "r-9")
    assert await socket.receive_nothing()
    unchanged = await fresh(task)
    assert (unchanged.status, unchanged.branch, unchanged.question, unchanged.cost_usd) == ("running", "", "", 0)
    assert await db(TaskOutput.objects.count)() == 0
    assert (await fresh(directive)).total_cost_usd == 0


async def test_a_daemon_cannot_report_on_a_task_after_it_was_given_to_another(open_socket, alice_key):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice)
    # Retried after the lease ran out: pending again, no daemon.
    task = await db(make_task)(owner=alice, status="pending", agent="claude")
    socket = await open_socket(token)
    await say_hello(socket, agents=["scripted"])

    await socket.send_json_to({"type": "task_progress", "task_id": str(task.pk), "cost_usd": 5})

    assert (await socket.receive_json_from())["code"] == "not_your_task"
    assert await db(DaemonCommand.objects.filter(daemon=daemon).count)() == 0
    assert (await fresh(task)).status == "pending"


async def test_the_directive_total_counts_every_finished_task_once(open_socket, alice_key, lifecycle_calls):
    alice, token = alice_key

    @db
    def create():
        daemon = make_daemon(alice)
        directive = make_directive(alice)
        Directive.objects.filter(pk=directive.pk).update(total_cost_usd=Decimal("1.0"))
        tasks = [make_task(directive, daemon=daemon, status="running") for _ in range(2)]
        return directive, tasks

    directive, tasks = await create()
    socket = await open_socket(token)
    await say_hello(socket, running_tasks=[str(t.pk) for t in tasks])

    for cost, task in zip((0.5, 0.25), tasks, strict=True):
        await socket.send_json_to(finished_report(task, cost_usd=cost))
        await socket.send_json_to(finished_report(task, cost_usd=cost))
    replies = [await socket.receive_json_from() for _ in range(4)]

    assert {r["type"] for r in replies} == {"received"}
    assert (await fresh(directive)).total_cost_usd == Decimal("1.75")


@pytest.mark.parametrize("ended_as", ["cancelled", "interrupted"])
async def test_the_late_report_of_a_task_ended_by_the_server_still_adds_its_cost(connected, lifecycle_calls, ended_as):
    socket, _, directive, task = connected
    await socket.send_json_to({"type": "task_progress", "task_id": str(task.pk), "cost_usd": 0.3})
    await settle(socket)

    @db
    def end_here():
        # What a stop (cancel) or an expired lease (interrupt) does before the daemon reports.
        Task.objects.filter(pk=task.pk).update(status=ended_as)
        Directive.objects.filter(pk=directive.pk).update(total_cost_usd=Decimal("0.3"))

    await end_here()
    report = finished_report(task, status="interrupted", cost_usd=0.5)

    for _ in range(2):  # re-sent after a reconnect: counted once
        await socket.send_json_to(report)
        assert await socket.receive_json_from() == {"type": "received", "id": report["id"]}

    task = await fresh(task)
    assert (task.status, task.cost_usd) == (ended_as, Decimal("0.5"))
    assert (await fresh(directive)).total_cost_usd == Decimal("0.5")
    assert lifecycle_calls == []  # the outcome stands: nothing to apply again
