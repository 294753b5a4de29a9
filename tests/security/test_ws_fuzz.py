"""Fuzzing the daemon gateway ``/ws/daemon/`` (protocol.md): malformed JSON,
wrong types in every field of every message type, unknown types, oversized
frames, floods, messages before ``hello`` and about other daemons' tasks.

After each, the server answers as protocol.md says (an ``error`` with the
right code and ``ref``, the connection kept open except for ``too_large``),
nothing changes in the database that should not, and the server still
serves the next connection. Sockets run on the real ASGI application through
Channels' ``WebsocketCommunicator``; the last test does the same on a real
daphne over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
import websockets
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.utils import timezone
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.models import Task, TaskOutput
from daemons.models import ApiToken, Daemon, DaemonCommand
from daemons.protocol import SCHEMAS, ErrorCode, ProtocolError, decode_frame, validate_message
from makima.asgi import application
from tests.daemons.conftest import db, hello_message, say_hello
from tests.e2e.fake_daemon import FakeDaemon, Outcome
from tests.e2e.fake_daemon import api as fake_api
from tests.factories import make_daemon, make_directive, make_task, make_token, make_user
from tests.security import replies_until_handled, security_stack

# --------------------------------------------------------------------------- pure: never anything but ProtocolError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


def valid_messages(task_id: str, command_id: str) -> dict[str, dict[str, Any]]:
    """One valid message of every daemon → server type."""
    return {
        "hello": hello_message("fuzz-box"),
        "ack": {"type": "ack", "command_id": command_id, "ok": True, "error": None},
        "heartbeat": {"type": "heartbeat", "running_tasks": [task_id]},
        "task_started": {"type": "task_started", "task_id": task_id, "branch": "makima/x-1", "base_commit": "a" * 40},
        "task_output": {
            "type": "task_output",
            "task_id": task_id,
            "items": [{"seq": 1, "stream": "stdout", "content": "hi"}],
        },
        "task_paused": {"type": "task_paused", "task_id": task_id, "question": "Which database?"},
        "task_progress": {"type": "task_progress", "task_id": task_id, "cost_usd": 0.5},
        "task_finished": {
            "type": "task_finished",
            "id": "report-1",
            "task_id": task_id,
            "status": "done",
            "exit_code": 0,
            "summary": "ok",
            "error": None,
            "branch": "makima/x-1",
            "commit_sha": "b" * 40,
            "cost_usd": 0.5,
            "verifier_results": [{"name": "pytest", "command": "pytest -q", "passed": True, "exit_code": 0}],
        },
    }


def test_every_message_type_has_a_valid_example_here():
    examples = valid_messages(str(uuid.uuid4()), str(uuid.uuid4()))
    assert set(examples) == set(SCHEMAS)
    for message in examples.values():
        validate_message(message)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(sorted(SCHEMAS)), st.data())
def test_validation_of_any_shape_raises_only_protocol_errors_naming_a_field(kind, data):
    message = copy.deepcopy(valid_messages(str(uuid.uuid4()), str(uuid.uuid4()))[kind])
    for name in data.draw(st.lists(st.sampled_from(sorted(message)), max_size=3, unique=True)):
        if name == "type":
            continue
        if data.draw(st.booleans()):
            del message[name]
        else:
            message[name] = data.draw(JSON)
    try:
        cleaned = validate_message(message)
    except ProtocolError as exc:
        assert exc.code == ErrorCode.INVALID
        assert ":" in exc.message  # "<field path>: <problem>"
    else:
        assert isinstance(cleaned, dict)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.one_of(st.text(max_size=200), JSON.map(json.dumps)))
def test_any_frame_text_decodes_or_raises_only_a_protocol_error(text):
    try:
        message = decode_frame(text)
    except ProtocolError as exc:
        assert exc.code in (ErrorCode.BAD_JSON, ErrorCode.INVALID)
    else:
        assert isinstance(message, dict) and isinstance(message["type"], str)


# --------------------------------------------------------------------------- sockets

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def close_consumer_connections() -> AsyncIterator[None]:
    """Consumers use asgiref's worker thread, whose connection outlives the
    test; close it so that PostgreSQL can drop the test database."""
    yield
    await db(connections.close_all)()


@pytest.fixture
async def sockets() -> AsyncIterator[Any]:
    opened: list[WebsocketCommunicator] = []

    async def open_(token: str | None) -> WebsocketCommunicator:
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        socket = WebsocketCommunicator(application, "/ws/daemon/", headers=headers)
        opened.append(socket)
        connected, _ = await socket.connect()
        assert connected
        return socket

    yield open_
    for socket in opened:
        await socket.disconnect()


@pytest.fixture
async def scene() -> dict[str, Any]:
    """alice's daemon token; a running task of hers on her daemon ``fuzz-box``;
    a running task on her other daemon; bob's task on bob's daemon."""

    @db
    def create() -> dict[str, Any]:
        alice, bob = make_user("alice"), make_user("bob")
        mine = make_daemon(alice, name="fuzz-box")
        other = make_daemon(alice, name="other-box")
        bobs = make_daemon(bob, name="bob-box")
        started = {"status": Task.Status.RUNNING, "started_at": timezone.now()}
        return {
            "alice": alice,
            "daemon": mine,
            "token": make_token(alice, kind=ApiToken.Kind.DAEMON).plain,
            "task": make_task(make_directive(alice), daemon=mine, **started),
            "other_daemons_task": make_task(make_directive(alice, title="other"), daemon=other, **started),
            "bobs_task": make_task(make_directive(bob), daemon=bobs, **started),
        }

    return await create()


async def hello(sockets: Any, scene: dict[str, Any], **fields: Any) -> WebsocketCommunicator:
    socket = await sockets(scene["token"])
    await say_hello(socket, "fuzz-box", running_tasks=[str(scene["task"].pk)], **fields)
    await replies_until_handled(socket)  # whatever the hello dispatched
    return socket


@db
def snapshot(*tasks: Task) -> list[tuple[Any, ...]]:
    """What a message about a task could change: its row, its output, the outbox."""
    rows = []
    for task in tasks:
        task.refresh_from_db()
        rows.append(
            (
                task.status,
                task.cost_usd,
                task.question,
                task.branch,
                task.exit_code,
                TaskOutput.objects.filter(task=task).count(),
            )
        )
    rows.append(tuple(DaemonCommand.objects.order_by("pk").values_list("pk", "status")))
    return rows


async def still_serving(socket: WebsocketCommunicator) -> None:
    """The socket is open and handled: a heartbeat is answered with nothing."""
    await socket.send_json_to({"type": "heartbeat", "running_tasks": []})
    assert await replies_until_handled(socket) == []


MALFORMED = [
    ("not json at all", ErrorCode.BAD_JSON),
    ("{'type': 'hello'}", ErrorCode.BAD_JSON),
    ('{"type": "heartbeat", "running_tasks": [NaN', ErrorCode.BAD_JSON),
    ("[" * 100_000, ErrorCode.BAD_JSON),  # nesting deeper than the decoder's recursion limit
    ("", ErrorCode.BAD_JSON),
    ("[1, 2]", ErrorCode.INVALID),
    ('"hello"', ErrorCode.INVALID),
    ("null", ErrorCode.INVALID),
    ("{}", ErrorCode.INVALID),
    ('{"type": 5}', ErrorCode.INVALID),
    ('{"type": null}', ErrorCode.INVALID),
    ('{"type": ["hello"]}', ErrorCode.INVALID),
    ('{"type": "HELLO"}', ErrorCode.UNKNOWN_TYPE),
    ('{"type": "spawn_task"}', ErrorCode.UNKNOWN_TYPE),  # server → daemon types are not accepted back
    ('{"type": "' + "x" * 10_000 + '"}', ErrorCode.UNKNOWN_TYPE),
    ('{"type": "<script>alert(1)</script>"}', ErrorCode.UNKNOWN_TYPE),
    ('{"type": "heartbeat"}', ErrorCode.INVALID),
    ('{"type": "heartbeat", "running_tasks": "all"}', ErrorCode.INVALID),
    ('{"type": "heartbeat", "running_tasks": ["../../etc/passwd"]}', ErrorCode.INVALID),
    ('{"type": "task_progress", "task_id": "' + str(uuid.UUID(int=1)) + '", "cost_usd": 1e999}', ErrorCode.INVALID),
    ('{"type": "hello", "protocol": 1}', ErrorCode.INVALID),  # a second hello, and an incomplete one
]


@pytest.mark.parametrize(("frame", "code"), MALFORMED, ids=[f"{i}-{c}" for i, (_, c) in enumerate(MALFORMED)])
async def test_a_malformed_frame_gets_its_error_and_the_socket_stays_open(sockets, scene, frame, code):
    socket = await hello(sockets, scene)
    before = await snapshot(scene["task"])

    # send_input: the communicator's send_to refuses an empty frame, a server must not.
    await socket.send_input({"type": "websocket.receive", "text": frame})

    error = await socket.receive_json_from(timeout=2)
    assert (error["type"], error["code"]) == ("error", code), error
    assert len(error["message"]) < 500  # the offending text is not echoed back at length
    await still_serving(socket)
    assert await snapshot(scene["task"]) == before


async def test_a_binary_frame_gets_bad_json_and_the_socket_stays_open(sockets, scene):
    socket = await hello(sockets, scene)

    await socket.send_to(bytes_data=b"\xff\xfe\x00garbage")

    assert (await socket.receive_json_from(timeout=2))["code"] == "bad_json"
    await still_serving(socket)


WRONG_VALUES: list[Any] = [None, True, 0, -1, 1.5, 2**70, "", "x", "💥" * 3, [], [None], {}, {"a": 1}]


def wrong_type_cases() -> list[tuple[str, str, Any]]:
    """(message type, field, value) for every field of every message type and
    every value above that its schema refuses (some are valid for some fields:
    those are left out, ``validate_message`` decides)."""
    examples = valid_messages(str(uuid.UUID(int=7)), str(uuid.UUID(int=8)))
    cases = []
    for kind, message in examples.items():
        for name in message:
            if name == "type":
                continue
            for value in WRONG_VALUES:
                candidate = {**message, name: value}
                try:
                    validate_message(candidate)
                except ProtocolError:
                    cases.append((kind, name, value))
    return cases


async def test_a_wrong_type_in_any_field_of_any_message_is_invalid_names_the_field_and_changes_nothing(
    sockets, scene, settings
):
    settings.MAKIMA_WS_RATE_BURST = 100_000
    socket = await hello(sockets, scene)
    task_id, command_id = str(scene["task"].pk), str(uuid.uuid4())
    examples = valid_messages(task_id, command_id)
    cases = wrong_type_cases()
    assert len(cases) > 200
    before = await snapshot(scene["task"])

    for n, (kind, name, value) in enumerate(cases):
        message = {**examples[kind], name: value}
        if name != "id":
            message["id"] = f"case-{n}"
        await socket.send_json_to(message)
        error = await socket.receive_json_from(timeout=2)
        assert (error["type"], error["code"]) == ("error", "invalid"), (kind, name, value, error)
        assert error["message"].startswith(name), (kind, name, value, error)
        if name != "id":
            assert error["ref"] == f"case-{n}"

    await still_serving(socket)
    assert await snapshot(scene["task"]) == before


def random_message(rng: random.Random, examples: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A message of a known or unknown type whose fields are kept, dropped,
    replaced by random JSON or joined by strange ones."""
    kind = rng.choice([*examples, "self_destruct", "", "task_output "])
    message = copy.deepcopy(examples.get(kind, {"type": kind}))
    for name in list(message):
        if name == "type":
            continue
        roll = rng.random()
        if roll < 0.2:
            del message[name]
        elif roll < 0.5:
            message[name] = random_value(rng, depth=0)
    if rng.random() < 0.3:
        message[rng.choice(["extra", "__proto__", "constructor", "id", "ok"])] = random_value(rng, depth=0)
    return message


def random_value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth < 3 and roll < 0.15:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if depth < 3 and roll < 0.3:
        return {rng.choice(["seq", "stream", "content", "x"]): random_value(rng, depth + 1) for _ in range(3)}
    return rng.choice(
        [None, True, False, 0, -(2**31), 2**31, 2**64, 3.14, -0.0, "", "stdout", "done", "a" * 2000, str(uuid.uuid4())]
    )


async def test_a_stream_of_random_messages_is_answered_message_by_message_and_the_socket_survives(
    sockets, scene, settings
):
    settings.MAKIMA_WS_RATE_BURST = 100_000
    rng = random.Random(20261204)
    socket = await hello(sockets, scene)
    examples = valid_messages(str(scene["bobs_task"].pk), str(uuid.uuid4()))  # never a task of this daemon's
    examples.pop("hello")  # a second hello is covered above; this one must not rename the daemon
    bobs_before = await snapshot(scene["bobs_task"], scene["other_daemons_task"])
    answers: dict[str, int] = {}

    for _ in range(400):
        message = random_message(rng, examples)
        await socket.send_json_to(message)
        replies = await replies_until_handled(socket)
        for reply in replies:
            if reply["type"] == "interrupt_task":
                # A heartbeat that lists a task not its own is told to stop it (the
                # id it sent, echoed; nothing said of whose it is), once while unacknowledged.
                assert message["type"] == "heartbeat" and reply["task_id"] in message["running_tasks"], reply
                answers["interrupt_task"] = answers.get("interrupt_task", 0) + 1
                continue
            assert reply["type"] == "error", reply  # no task of this daemon's is named: nothing succeeds
            assert reply["code"] in ("invalid", "unknown_type", "not_your_task"), reply
            answers[reply["code"]] = answers.get(reply["code"], 0) + 1
        assert len(replies) <= 2, (message, replies)  # one answer per message (two ids in a heartbeat: two)

    assert (
        {"invalid", "unknown_type", "not_your_task"}
        <= set(answers)
        <= {
            "invalid",
            "unknown_type",
            "not_your_task",
            "interrupt_task",
        }
    )
    await still_serving(socket)
    after = await snapshot(scene["bobs_task"], scene["other_daemons_task"])
    assert after[:-1] == bobs_before[:-1]  # the tasks named are untouched
    # The outbox only gained interrupts addressed to this daemon itself.
    known = {pk for pk, _ in bobs_before[-1]}
    added = [pk for pk, _ in after[-1] if pk not in known]
    assert await db(
        lambda: sorted(set(DaemonCommand.objects.filter(pk__in=added).values_list("daemon__name", "command_type")))
    )() == ([("fuzz-box", "interrupt_task")] if added else [])


@pytest.mark.parametrize("whose", ["bobs_task", "other_daemons_task", "unknown"])
@pytest.mark.parametrize("kind", ["task_started", "task_output", "task_paused", "task_progress", "task_finished"])
async def test_a_report_about_a_task_not_assigned_to_this_daemon_is_not_your_task_and_changes_nothing(
    sockets, scene, kind, whose
):
    socket = await hello(sockets, scene)
    task_id = str(scene[whose].pk) if whose != "unknown" else str(uuid.uuid4())
    message = {**valid_messages(task_id, str(uuid.uuid4()))[kind], "id": "foreign"}
    before = await snapshot(scene["bobs_task"], scene["other_daemons_task"], scene["task"])

    await socket.send_json_to(message)

    error = await socket.receive_json_from(timeout=2)
    assert (error["code"], error["ref"]) == ("not_your_task", "foreign")
    assert scene["alice"].username not in error["message"] and "bob" not in error["message"]
    await still_serving(socket)
    assert await snapshot(scene["bobs_task"], scene["other_daemons_task"], scene["task"]) == before


async def test_an_ack_of_another_daemons_command_is_invalid_and_changes_nothing(sockets, scene):
    @db
    def bobs_command() -> DaemonCommand:
        task = scene["bobs_task"]
        return DaemonCommand.objects.create(
            owner=task.owner, daemon=task.daemon, task=task, command_type="spawn_task", status="sent"
        )

    command = await bobs_command()
    socket = await hello(sockets, scene)

    await socket.send_json_to({"type": "ack", "command_id": str(command.pk), "ok": False, "error": "capacity"})

    error = await socket.receive_json_from(timeout=2)
    assert (error["code"], error["message"]) == ("invalid", "command_id: no such command for this daemon")
    await db(command.refresh_from_db)()
    assert command.status == "sent"
    assert (await snapshot(scene["bobs_task"]))[0][0] == Task.Status.RUNNING


@pytest.mark.parametrize("kind", sorted(set(SCHEMAS) - {"hello"}))
async def test_every_message_before_hello_gets_hello_required_and_is_ignored(sockets, scene, kind):
    socket = await sockets(scene["token"])
    message = {**valid_messages(str(scene["task"].pk), str(uuid.uuid4()))[kind], "id": "early"}
    before = await snapshot(scene["task"])

    await socket.send_json_to(message)

    error = await socket.receive_json_from(timeout=2)
    assert (error["code"], error["ref"]) == ("hello_required", "early")
    assert await snapshot(scene["task"]) == before
    assert (await db(Daemon.objects.get)(pk=scene["daemon"].pk)).status == Daemon.Status.DISCONNECTED
    await say_hello(socket, "fuzz-box", running_tasks=[str(scene["task"].pk)])  # and then it can say hello


@pytest.mark.parametrize("size", [2049, 10_000, 200_000])
async def test_an_oversized_frame_gets_too_large_then_close_1009_and_the_next_connection_works(
    sockets, scene, settings, size
):
    settings.MAKIMA_WS_MAX_BYTES = 2048
    socket = await hello(sockets, scene)
    frame = json.dumps({"type": "task_output", "task_id": str(scene["task"].pk), "items": []})
    frame = frame[:-1] + ', "pad": "' + "x" * (size - len(frame) - 10) + '"}'
    assert len(frame.encode()) > 2048

    await socket.send_to(text_data=frame)

    error = await socket.receive_json_from(timeout=2)
    assert (error["type"], error["code"]) == ("error", "too_large")
    assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 1009}
    assert await socket.receive_nothing(timeout=0.2)
    again = await hello(sockets, scene)
    await still_serving(again)


async def test_a_frame_of_exactly_the_limit_is_accepted(sockets, scene, settings):
    settings.MAKIMA_WS_MAX_BYTES = 2048
    socket = await hello(sockets, scene)
    frame = json.dumps({"type": "heartbeat", "running_tasks": [], "pad": ""})
    frame = frame[:-2] + "é" * ((2048 - len(frame.encode())) // 2) + '"}'
    frame = frame[:-2] + "x" * (2048 - len(frame.encode())) + '"}'
    assert len(frame.encode()) == 2048

    await socket.send_to(text_data=frame)

    assert await replies_until_handled(socket) == []


async def test_a_flood_gets_rate_limited_drops_only_the_excess_and_the_socket_recovers(sockets, scene, settings):
    settings.MAKIMA_WS_RATE_BURST = 20
    settings.MAKIMA_WS_RATE_PER_S = 50
    socket = await hello(sockets, scene)  # hello took one of the 20
    await asyncio.sleep(0.5)  # full again
    task = scene["task"]

    for n in range(1, 201):  # 200 output batches at once, one line each
        await socket.send_json_to(
            {
                "type": "task_output",
                "task_id": str(task.pk),
                "id": n,
                "items": [{"seq": n, "stream": "stdout", "content": f"{n}"}],
            }
        )
    replies = await replies_until_handled(socket)

    limited = [reply["ref"] for reply in replies if reply.get("code") == "rate_limited"]
    assert all(reply["code"] == "rate_limited" for reply in replies)
    stored = await db(lambda: set(TaskOutput.objects.filter(task=task).values_list("seq", flat=True)))()
    assert stored | set(limited) == set(range(1, 201))  # each was stored or refused, none both
    assert not stored & set(limited)
    assert 20 <= len(stored) < 60
    await asyncio.sleep(0.2)  # the bucket refills at 50 a second
    await still_serving(socket)


async def test_more_sockets_do_not_buy_a_token_more_messages_and_other_tokens_are_not_slowed(sockets, scene, settings):
    from daemons.consumers import TOKEN_BUCKETS

    settings.MAKIMA_WS_RATE_BURST = 1000  # each socket alone would let all of it through
    settings.MAKIMA_WS_TOKEN_RATE_BURST = 30
    settings.MAKIMA_WS_TOKEN_RATE_PER_S = 0.1  # no refill to speak of during the test
    first = await hello(sockets, scene)  # the hello took one of the 30
    second = await sockets(scene["token"])
    await say_hello(second, "second-box")
    await replies_until_handled(second)
    bobs_token = await db(lambda: make_token(scene["bobs_task"].owner, kind=ApiToken.Kind.DAEMON).plain)()
    bobs = await sockets(bobs_token)
    await say_hello(bobs, "bob-box", running_tasks=[str(scene["bobs_task"].pk)])
    await replies_until_handled(bobs)

    # Spent so far: 2 hellos and 2 sync frames (replies_until_handled sends one): 26 left.
    for n in range(20):  # 40 heartbeats on alice's token, alternating sockets
        for socket in (first, second):
            await socket.send_json_to({"type": "heartbeat", "running_tasks": [], "id": n})
    answers = [*await replies_until_handled(first), *await replies_until_handled(second)]
    assert [a["code"] for a in answers] == ["rate_limited"] * 14
    for _ in range(12):  # bob's token has its own count (2 + 12 × 2 of its 30)
        await bobs.send_json_to({"type": "heartbeat", "running_tasks": [str(scene["bobs_task"].pk)]})
        assert await replies_until_handled(bobs) == []

    token_ids = await db(
        lambda: list(ApiToken.objects.filter(kind=ApiToken.Kind.DAEMON).values_list("pk", flat=True))
    )()
    assert all(token_id in TOKEN_BUCKETS.buckets for token_id in token_ids)
    for socket in (first, second, bobs):
        await socket.disconnect()
    assert not any(token_id in TOKEN_BUCKETS.buckets for token_id in token_ids)  # released with the last socket


async def test_after_all_of_it_the_daemon_is_connected_and_its_task_untouched(sockets, scene, settings):
    settings.MAKIMA_WS_RATE_BURST = 100_000
    socket = await hello(sockets, scene)
    rng = random.Random(7)
    examples = valid_messages(str(uuid.uuid4()), str(uuid.uuid4()))
    for _ in range(100):
        await socket.send_to(text_data=json.dumps(random_message(rng, examples))[: rng.randint(1, 400)])
    await replies_until_handled(socket)

    daemon = await db(Daemon.objects.get)(pk=scene["daemon"].pk)
    task = await db(Task.objects.get)(pk=scene["task"].pk)
    assert (daemon.status, daemon.name) == (Daemon.Status.CONNECTED, "fuzz-box")
    assert (task.status, task.cost_usd) == (Task.Status.RUNNING, Decimal("0"))
    await still_serving(socket)


# --------------------------------------------------------------------------- a real daphne


@pytest.mark.slow
@pytest.mark.django_db(transaction=False)
def test_a_real_server_survives_garbage_floods_and_oversized_frames_and_serves_the_next_daemon():
    env = {"MAKIMA_WS_MAX_BYTES": "65536", "MAKIMA_WS_RATE_BURST": "50", "MAKIMA_WS_RATE_PER_S": "20"}

    async def abuse(url: str, token: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        seen: dict[str, Any] = {"codes": {}}
        async with websockets.connect(url, additional_headers=headers, max_size=2**22) as socket:
            await socket.send(json.dumps(hello_message("abuser")))
            assert json.loads(await socket.recv())["type"] == "welcome"
            rng = random.Random(1)
            examples = valid_messages(str(uuid.uuid4()), str(uuid.uuid4()))
            for _ in range(500):  # ten times the burst, as fast as the socket takes them
                await socket.send(json.dumps(random_message(rng, examples)))
            await socket.send(b"\x00\x01binary")
            await socket.send("{" * 50_000)
            try:
                while True:
                    reply = json.loads(await asyncio.wait_for(socket.recv(), 1))
                    key = reply.get("code") or reply["type"]  # a heartbeat naming tasks: interrupt_task
                    seen["codes"][key] = seen["codes"].get(key, 0) + 1
            except TimeoutError:
                pass
            await socket.send(json.dumps({"type": "heartbeat", "running_tasks": [], "pad": "x" * 70_000}))
            seen["too_large"] = json.loads(await asyncio.wait_for(socket.recv(), 5))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), 5)
            seen["close"] = closed.value.rcvd.code if closed.value.rcvd else None
        # A client that floods and closes without reading: answers still on their way may
        # meet a closed socket (makima.sockets; tests/test_sockets.py makes it happen for sure).
        async with websockets.connect(url, additional_headers=headers) as socket:
            await socket.send(json.dumps(hello_message("dropper")))
            for n in range(40):  # each one read from the database before its not_your_task
                await socket.send(json.dumps({"type": "task_progress", "task_id": str(uuid.uuid4()), "cost_usd": n}))
        async with websockets.connect(url, additional_headers=headers) as socket:
            await socket.send(json.dumps(hello_message("next-daemon")))
            seen["next"] = json.loads(await asyncio.wait_for(socket.recv(), 5))
        await asyncio.sleep(1)  # the dropped socket's answers have been tried by now
        return seen

    with security_stack(env) as stack:
        seen = asyncio.run(abuse(stack.ws_url, stack.daemon_token))
        assert seen["codes"].get("rate_limited", 0) > 100
        assert set(seen["codes"]) <= {
            "rate_limited",
            "invalid",
            "unknown_type",
            "not_your_task",
            "bad_json",
            "interrupt_task",
        }
        assert (seen["too_large"]["code"], seen["close"]) == ("too_large", 1009)
        assert seen["next"]["type"] == "welcome"
        assert stack.processes[0].poll() is None  # daphne is still running
        log = stack.log.read_text()
        assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:5000]


@pytest.mark.slow
@pytest.mark.django_db(transaction=False)
def test_a_directive_completes_on_a_real_server_while_another_daemon_floods_it_and_its_agent_is_hostile():
    """The server keeps its promises under abuse: one daemon floods the
    gateway with garbage while a well-behaved one runs a directive whose agent
    sends script payloads, oversized files and traversal names. The directive
    completes; every step ran exactly once; nothing hostile was stored."""
    env = {
        "MAKIMA_WS_RATE_BURST": "50",
        "MAKIMA_WS_RATE_PER_S": "20",
        "MAKIMA_MAX_CONTRACT_FILE_BYTES": "4096",
    }
    script = "<script>alert('agent')</script>"
    refused: list[tuple[str, int]] = []

    def status_of(base: str, method: str, path: str, token: str, body: Any) -> int:
        try:
            fake_api(base, method, path, token, body)
        except AssertionError as exc:  # fake_api raises on an HTTP error, naming the status
            return int(str(exc).split("→ ")[1].split(":")[0])
        return 200

    async def hostile_agent(daemon: FakeDaemon, task: dict[str, Any]) -> Outcome:
        env_ = task["env"]
        files = f"/api/v1/contracts/{env_['MAKIMA_CONTRACT_ID']}/files/"
        for name, content in (("big.txt", "x" * 5000), ("../../etc/passwd", "root::0:0"), (".env", "SECRET=1")):
            status = await asyncio.to_thread(
                status_of, env_["MAKIMA_URL"], "POST", files, env_["MAKIMA_API_KEY"], {"name": name, "content": content}
            )
            refused.append((name, status))
        await daemon.api_for(task)("POST", f"/api/v1/tasks/{task['id']}/complete/")
        return Outcome(summary=script, output=[f"{script} line {n}" for n in range(150)])

    async def flood(url: str, token: str, stop: asyncio.Event) -> int:
        sent = 0
        headers = {"Authorization": f"Bearer {token}"}
        async with websockets.connect(url, additional_headers=headers, max_size=2**22) as socket:
            # No agents and no capacity: nothing is ever dispatched to it.
            await socket.send(json.dumps(hello_message("flooder", agents=[], max_concurrent_tasks=0)))
            rng = random.Random(3)
            examples = valid_messages(str(uuid.uuid4()), str(uuid.uuid4()))
            examples.pop("hello")
            while not stop.is_set():
                await socket.send(json.dumps(random_message(rng, examples)))
                sent += 1
                if sent % 50 == 0:
                    await asyncio.sleep(0.01)
        return sent

    async def scenario(stack: Any) -> dict[str, Any]:
        async def rest(method: str, path: str, body: Any = None) -> Any:
            return await asyncio.to_thread(fake_api, stack.base_url, method, path, stack.api_key, body)

        directive = await rest(
            "POST",
            "/api/v1/directives/",
            {"title": "Under fire", "goal": "g", "agent": "scripted", "evaluation_mode": "off"},
        )
        steps = [{"name": "A"}, {"name": "B", "depends_on": ["A"]}, {"name": "C", "depends_on": ["A"]}]
        await rest("POST", f"/api/v1/directives/{directive['id']}/steps/batch/", {"steps": steps})
        stop = asyncio.Event()
        flooder = asyncio.create_task(flood(stack.ws_url, stack.daemon_token, stop))
        daemon = FakeDaemon(ws_url=stack.ws_url, token=stack.daemon_token, behaviour=hostile_agent, name="worker")
        runner = asyncio.create_task(daemon.run())
        try:
            deadline = asyncio.get_running_loop().time() + 60
            while daemon.welcome is None:
                await asyncio.sleep(0.05)
            await rest("POST", f"/api/v1/directives/{directive['id']}/start/")
            while (current := await rest("GET", f"/api/v1/directives/{directive['id']}/"))["status"] != "completed":
                assert asyncio.get_running_loop().time() < deadline, current
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            sent = await flooder
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        tasks = (await rest("GET", f"/api/v1/tasks/?directive={directive['id']}&page_size=100"))["results"]
        events = await rest("GET", f"/api/v1/directives/{directive['id']}/events/?limit=1000")
        outputs = {t["id"]: (await rest("GET", f"/api/v1/tasks/{t['id']}/output/?limit=1000"))["items"] for t in tasks}
        return {"daemon": daemon, "tasks": tasks, "events": events, "sent": sent, "outputs": outputs}

    with security_stack(env) as stack:
        seen = asyncio.run(scenario(stack))
        log = stack.log.read_text()

    assert seen["sent"] > 200  # the flood went on the whole time
    daemon, tasks = seen["daemon"], seen["tasks"]
    assert not daemon.errors, daemon.errors
    executions = Counter(t["name"] for t in tasks if t["kind"] == "execution")
    assert executions == Counter({"A": 1, "B": 1, "C": 1})  # every step ran once: nothing lost or duplicated
    assert Counter(t["kind"] for t in tasks) == Counter({"execution": 3, "completion": 1})
    assert all(t["status"] == "done" for t in tasks)
    assert len(daemon.spawn_times) == len({task["id"] for _, task in daemon.spawn_times}) == 4
    passed = Counter(e["step"] for e in seen["events"] if e["event_type"] == "step_passed")
    assert len(passed) == 3 and set(passed.values()) == {1}
    # Each hostile write was refused; the text was stored as sent (escaping is the pages' job).
    assert set(refused) == {("big.txt", 400), ("../../etc/passwd", 400), (".env", 400)}
    outputs = list(seen["outputs"].values())
    assert len(outputs) == 4
    assert all(len(items) == 150 and items[0]["content"].startswith(script) for items in outputs)
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:5000]
