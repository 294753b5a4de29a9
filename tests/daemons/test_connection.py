"""The daemon gateway's connection rules (protocol.md, Connection and Handshake):
authentication, hello/welcome, frame errors, rate limiting, replacement and disconnect."""

from __future__ import annotations

import json
import uuid

import pytest
from django.utils import timezone

from daemons.models import ApiToken, Daemon
from daemons.services import token_revoke
from makima.state import SYSTEM
from tests.daemons.conftest import db, hello_message, receive_all, say_hello
from tests.factories import make_daemon, make_task, make_token, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@db
def owner_with_daemon_token(username: str = "alice") -> tuple:
    user = make_user(username)
    return user, make_token(user, kind=ApiToken.Kind.DAEMON).plain


@db
def daemon_row(owner, name: str = "build-box-1") -> Daemon | None:
    return Daemon.objects.filter(owner=owner, name=name).first()


@pytest.fixture
async def alice_key():
    return await owner_with_daemon_token("alice")


# --------------------------------------------------------------------------- authentication


async def test_a_daemon_token_in_the_authorization_header_opens_the_socket(open_socket, alice_key):
    alice, token = alice_key
    socket = await open_socket(token)

    welcome = await say_hello(socket)

    daemon = await daemon_row(alice)
    assert welcome["daemon_id"] == str(daemon.pk)


async def test_a_daemon_token_in_the_query_string_opens_the_socket(open_socket, alice_key):
    alice, token = alice_key
    socket = await open_socket(token, query=True)

    welcome = await say_hello(socket)

    assert welcome["daemon_id"] == str((await daemon_row(alice)).pk)


@db
def bad_token(kind: str) -> str | None:
    user = make_user("mallory")
    if kind == "missing":
        return None
    if kind == "unknown":
        return "mk_d_" + "x" * 43
    if kind == "revoked":
        new = make_token(user, kind=ApiToken.Kind.DAEMON)
        token_revoke(token=new.token, actor=SYSTEM)
        return new.plain
    if kind == "user":
        return make_token(user, kind=ApiToken.Kind.USER).plain
    if kind == "task":
        return make_token(user, kind=ApiToken.Kind.TASK, task=make_task(owner=user)).plain
    if kind == "expired":
        return make_token(user, kind=ApiToken.Kind.DAEMON, expires_at=timezone.now()).plain
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "unknown", "revoked", "user", "task", "expired"])
@pytest.mark.parametrize("query", [False, True], ids=["header", "query"])
async def test_a_socket_without_a_live_daemon_token_is_closed_with_4401_and_nothing_else(open_socket, kind, query):
    token = await bad_token(kind)
    socket = await open_socket(token, query=query)

    closed = await socket.receive_output(timeout=1)

    assert closed == {"type": "websocket.close", "code": 4401}
    assert await socket.receive_nothing()


async def test_a_malformed_authorization_header_is_refused_with_4401(open_socket, alice_key):
    _, token = alice_key
    socket = await open_socket(None, headers=[(b"authorization", b"Token " + token.encode())])

    assert await socket.receive_output(timeout=1) == {"type": "websocket.close", "code": 4401}


async def test_a_daemon_whose_token_is_revoked_while_connected_is_closed_with_4401(open_socket, settings, alice_key):
    settings.MAKIMA_OUTBOX_POLL_S = 0.1
    alice, token = alice_key
    socket = await open_socket(token)
    await say_hello(socket)

    await db(lambda: token_revoke(token=ApiToken.objects.get(owner=alice), actor=SYSTEM))()

    assert await socket.receive_output(timeout=1) == {"type": "websocket.close", "code": 4401}


# --------------------------------------------------------------------------- hello


async def test_hello_registers_the_daemon_and_is_answered_with_welcome(open_socket, settings, alice_key):
    settings.MAKIMA_HEARTBEAT_INTERVAL_S = 7
    alice, token = alice_key
    socket = await open_socket(token)
    before = timezone.now()

    welcome = await say_hello(socket, "gpu-box", hostname="gpu.example", version="1.2.3", max_concurrent_tasks=4)

    daemon = await daemon_row(alice, "gpu-box")
    assert welcome == {
        "type": "welcome",
        "daemon_id": str(daemon.pk),
        "heartbeat_interval_s": 7,
        "server_version": "0.1.0",
    }
    assert daemon.status == Daemon.Status.CONNECTED
    assert (daemon.hostname, daemon.version, daemon.max_concurrent_tasks) == ("gpu.example", "1.2.3", 4)
    assert daemon.capabilities == ["scripted", "command"]
    assert daemon.connected_at >= before and daemon.last_seen_at >= before
    assert len(daemon.connection_id) == 32
    assert daemon.token_id is not None


async def test_hello_updates_the_row_of_a_known_daemon_name(open_socket, alice_key):
    alice, token = alice_key
    known = await db(make_daemon)(alice, "build-box-1", version="0.0.1", capabilities=["claude"])
    socket = await open_socket(token)

    welcome = await say_hello(socket, "build-box-1", version="0.2.0")

    daemon = await daemon_row(alice)
    assert welcome["daemon_id"] == str(known.pk)
    assert (daemon.status, daemon.version, daemon.capabilities) == ("connected", "0.2.0", ["scripted", "command"])
    assert await db(Daemon.objects.filter(owner=alice).count)() == 1


async def test_daemon_names_are_per_owner(open_socket, alice_key):
    alice, alice_token = alice_key
    bob, bob_token = await owner_with_daemon_token("bob")
    alices = await open_socket(alice_token)
    bobs = await open_socket(bob_token)

    alice_welcome = await say_hello(alices, "shared-name")
    bob_welcome = await say_hello(bobs, "shared-name")

    assert alice_welcome["daemon_id"] == str((await daemon_row(alice, "shared-name")).pk)
    assert bob_welcome["daemon_id"] == str((await daemon_row(bob, "shared-name")).pk)
    assert alice_welcome["daemon_id"] != bob_welcome["daemon_id"]
    assert await alices.receive_nothing()  # bob's hello does not replace alice's daemon


async def test_a_message_before_hello_gets_hello_required_and_is_ignored(open_socket, alice_key):
    alice, token = alice_key
    socket = await open_socket(token)

    await socket.send_json_to({"type": "heartbeat", "id": "m1", "running_tasks": []})

    assert await socket.receive_json_from() == {
        "type": "error",
        "code": "hello_required",
        "message": "the first message must be hello",
        "ref": "m1",
    }
    assert await daemon_row(alice) is None
    await say_hello(socket)  # the connection stays usable


async def test_a_second_hello_on_the_same_socket_is_refused(open_socket, alice_key):
    _, token = alice_key
    socket = await open_socket(token)
    await say_hello(socket)

    await socket.send_json_to(hello_message("another-name"))

    error = await socket.receive_json_from()
    assert (error["code"], error["message"]) == ("invalid", "hello: this connection has already said hello")


async def test_a_hello_for_another_protocol_version_is_invalid(open_socket, alice_key):
    _, token = alice_key
    socket = await open_socket(token)

    await socket.send_json_to(hello_message(protocol=2))

    error = await socket.receive_json_from()
    assert error["code"] == "invalid"
    assert error["message"].startswith("protocol:")


# --------------------------------------------------------------------------- frame errors


async def test_a_frame_that_is_not_json_gets_bad_json_and_the_socket_stays_open(open_socket, alice_key):
    _, token = alice_key
    socket = await open_socket(token)
    await say_hello(socket)

    await socket.send_to(text_data="{not json")

    error = await socket.receive_json_from()
    assert (error["type"], error["code"], error["ref"]) == ("error", "bad_json", None)
    await socket.send_json_to({"type": "heartbeat", "running_tasks": []})
    assert await socket.receive_nothing()


async def test_a_binary_frame_gets_bad_json(open_socket, alice_key):
    _, token = alice_key
    socket = await open_socket(token)

    await socket.send_to(bytes_data=b'{"type": "hello"}')

    assert (await socket.receive_json_from())["code"] == "bad_json"


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ([1, 2], "a message must be a JSON object"),
        ({"id": "m7"}, "type: is required"),
        ({"type": 3, "id": "m7"}, "type: must be a string"),
    ],
)
async def test_a_message_without_a_string_type_is_invalid(open_socket, alice_key, message, problem):
    _, token = alice_key
    socket = await open_socket(token)
    await say_hello(socket)

    await socket.send_to(text_data=json.dumps(message))

    error = await socket.receive_json_from()
    assert (error["code"], error["message"]) == ("invalid", problem)
    assert error["ref"] == (message.get("id") if isinstance(message, dict) else None)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"type": "heartbeat"}, "running_tasks: is required"),
        ({"type": "heartbeat", "running_tasks": ["nope"]}, "running_tasks[0]: must be a UUID string"),
        ({"type": "ack", "command_id": str(uuid.uuid4())}, "ok: is required"),
        ({"type": "ack", "command_id": str(uuid.uuid4()), "ok": "yes"}, "ok: must be true or false"),
        ({"type": "task_started", "task_id": 12}, "task_id: must be a UUID string"),
        ({"type": "task_progress", "task_id": str(uuid.uuid4()), "cost_usd": -1}, "cost_usd: must be at least 0"),
        ({"type": "task_progress", "task_id": str(uuid.uuid4()), "cost_usd": True}, "cost_usd: must be a number"),
        (
            {
                "type": "task_output",
                "task_id": str(uuid.uuid4()),
                "items": [{"seq": 0, "stream": "stdout", "content": ""}],
            },
            "items[0].seq: must be at least 1",
        ),
        (
            {
                "type": "task_output",
                "task_id": str(uuid.uuid4()),
                "items": [{"seq": 1, "stream": "tty", "content": ""}],
            },
            "items[0].stream: must be one of stdout, stderr, agent, system",
        ),
        (
            {
                "type": "task_output",
                "task_id": str(uuid.uuid4()),
                "items": [{"seq": n, "stream": "stdout", "content": "x"} for n in range(1, 202)],
            },
            "items: must hold at most 200 items",
        ),
        (
            {"type": "task_finished", "id": "r1", "task_id": str(uuid.uuid4()), "status": "cancelled"},
            "status: must be one of done, failed, interrupted",
        ),
        (
            {"type": "task_finished", "id": "r1", "task_id": str(uuid.uuid4()), "status": "done", "exit_code": "0"},
            "exit_code: must be an integer or null",
        ),
        (
            {
                "type": "task_finished",
                "id": "r1",
                "task_id": str(uuid.uuid4()),
                "status": "done",
                "verifier_results": [{"name": "pytest"}],
            },
            "verifier_results[0].passed: is required",
        ),
    ],
)
async def test_a_message_that_breaks_its_schema_is_invalid_naming_the_field(open_socket, alice_key, message, field):
    _, token = alice_key
    socket = await open_socket(token)
    await say_hello(socket)

    await socket.send_json_to({**message, "id": "m9"} if "id" not in message else message)

    error = await socket.receive_json_from()
    assert (error["type"], error["code"], error["message"]) == ("error", "invalid", field)
    assert error["ref"] == message.get("id", "m9")
    assert await socket.receive_nothing()


async def test_a_hello_without_a_name_is_invalid(open_socket, alice_key):
    alice, token = alice_key
    socket = await open_socket(token)
    message = hello_message()
    del message["name"]

    await socket.send_json_to(message)

    error = await socket.receive_json_from()
    assert (error["code"], error["message"]) == ("invalid", "name: is required")
    assert await daemon_row(alice) is None


async def test_an_unknown_message_type_gets_unknown_type(open_socket, alice_key):
    _, token = alice_key
    socket = await open_socket(token)
    await say_hello(socket)

    await socket.send_json_to({"type": "self_destruct", "id": 5})

    error = await socket.receive_json_from()
    assert (error["code"], error["ref"]) == ("unknown_type", 5)
    await socket.send_json_to({"type": "heartbeat", "running_tasks": []})
    assert await socket.receive_nothing()


async def test_a_frame_over_the_size_limit_gets_too_large_and_closes_with_1009(open_socket, settings, alice_key):
    settings.MAKIMA_WS_MAX_BYTES = 2048
    _, token = alice_key
    socket = await open_socket(token)
    await say_hello(socket)

    # Multi-byte characters: 700 characters but 2100 bytes.
    await socket.send_json_to({"type": "heartbeat", "running_tasks": [], "padding": "€" * 700})

    error = await socket.receive_json_from()
    assert (error["type"], error["code"]) == ("error", "too_large")
    assert await socket.receive_output(timeout=1) == {"type": "websocket.close", "code": 1009}


# --------------------------------------------------------------------------- rate limiting


async def test_messages_over_the_rate_limit_get_rate_limited_and_are_dropped(open_socket, settings, alice_key):
    settings.MAKIMA_WS_RATE_BURST = 3
    settings.MAKIMA_WS_RATE_PER_S = 0.1
    _, token = alice_key
    socket = await open_socket(token)
    await say_hello(socket)  # 1 of 3

    for n in range(2):  # 2 and 3 of 3
        await socket.send_json_to({"type": "heartbeat", "running_tasks": [], "id": f"h{n}"})
    await socket.send_json_to({"type": "self_destruct", "id": "over"})

    error = await socket.receive_json_from()
    assert (error["code"], error["ref"]) == ("rate_limited", "over")  # dropped: not even unknown_type
    await socket.send_to(text_data="{not json")
    assert (await socket.receive_json_from())["code"] == "rate_limited"
    assert await socket.receive_nothing()  # the connection stays open


# --------------------------------------------------------------------------- one live connection per name


async def test_a_second_connection_with_the_same_name_replaces_the_first_with_4409(open_socket, alice_key):
    alice, token = alice_key
    first = await open_socket(token)
    first_welcome = await say_hello(first)
    second = await open_socket(token)

    second_welcome = await say_hello(second)

    assert second_welcome["daemon_id"] == first_welcome["daemon_id"]
    assert await first.receive_output(timeout=1) == {"type": "websocket.close", "code": 4409}
    await first.disconnect()
    daemon = await daemon_row(alice)
    assert daemon.status == Daemon.Status.CONNECTED  # the replaced socket closing changes nothing
    assert daemon.connection_id
    await second.send_json_to({"type": "heartbeat", "running_tasks": []})
    assert await second.receive_nothing()


async def test_a_replaced_connection_notices_from_its_outbox_poll_without_a_notification(
    open_socket, settings, alice_key
):
    settings.MAKIMA_OUTBOX_POLL_S = 0.1
    alice, token = alice_key
    first = await open_socket(token)
    await say_hello(first)

    # Another process took the name over: only the database says so.
    await db(lambda: Daemon.objects.filter(owner=alice).update(connection_id=uuid.uuid4().hex))()

    assert await first.receive_output(timeout=1) == {"type": "websocket.close", "code": 4409}


async def test_closing_the_socket_marks_the_daemon_disconnected(open_socket, alice_key):
    alice, token = alice_key
    socket = await open_socket(token)
    await say_hello(socket)

    await socket.disconnect()

    daemon = await daemon_row(alice)
    assert daemon.status == Daemon.Status.DISCONNECTED
    assert daemon.connection_id == ""


async def test_closing_the_socket_leaves_the_daemons_tasks_running(open_socket, alice_key):
    alice, token = alice_key
    daemon = await db(make_daemon)(alice)
    task = await db(make_task)(owner=alice, daemon=daemon, status="running")
    socket = await open_socket(token)
    await say_hello(socket, running_tasks=[str(task.pk)])

    await socket.disconnect()

    await db(task.refresh_from_db)()
    assert task.status == "running"


async def test_nothing_is_sent_on_a_quiet_connection(open_socket, alice_key):
    _, token = alice_key
    socket = await open_socket(token)
    await say_hello(socket)

    assert await receive_all(socket) == []
