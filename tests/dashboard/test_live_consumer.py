"""The dashboard's live feed ``/ws/directives/<id>/`` on the real ASGI application."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.db import connections
from django.db.models import Max
from django.test import Client

from directives import consumers
from directives.models import Directive, DirectiveEvent
from directives.services import directive_pause, directive_start, event_record
from makima.asgi import application
from makima.state import Actor
from tests.factories import make_directive, make_steps, make_team, make_user

pytestmark = pytest.mark.django_db(transaction=True)

db = database_sync_to_async
Open = Callable[..., Awaitable[WebsocketCommunicator]]


def allowed_origin() -> bytes:
    """An Origin the route accepts: one of the hosts the server answers to."""
    host = next((h for h in settings.ALLOWED_HOSTS if h not in ("*", "testserver") and not h.startswith(".")), None)
    return f"http://{host or 'localhost'}".encode()


@db
def session_cookie(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


@pytest.fixture(autouse=True)
async def close_consumer_connections() -> AsyncIterator[None]:
    """Consumers reach the database from asgiref's worker thread; close its
    connection so that PostgreSQL can drop the test database at the end."""
    yield
    await db(connections.close_all)()


@pytest.fixture
async def people():
    """alice owns a directive shared with her team (carol); bob is a stranger."""

    @db
    def create():
        alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
        team = make_team("platform", alice, carol)
        directive = make_directive(alice, team=team)
        make_steps(directive, {"name": "A"})
        return alice, bob, carol, directive

    return await create()


@pytest.fixture
async def open_page() -> AsyncIterator[Open]:
    """``await open_page(user, directive)``: a browser socket on the directive's feed
    (``user=None``: anonymous). Every socket is disconnected at the end of the test."""
    opened: list[WebsocketCommunicator] = []

    async def open_(user, directive, *, origin: bytes | None = None) -> WebsocketCommunicator:
        headers = [(b"origin", origin if origin is not None else allowed_origin())]
        if user is not None:
            headers.append((b"cookie", await session_cookie(user)))
        socket = WebsocketCommunicator(application, f"/ws/directives/{directive.pk}/", headers=headers)
        opened.append(socket)
        return socket

    yield open_
    for socket in opened:
        # A socket the server closed (or a test that failed mid-way) must not
        # break the teardown: a broken teardown leaves rows behind for the next test.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await socket.disconnect()


async def connected(socket: WebsocketCommunicator) -> WebsocketCommunicator:
    ok, _ = await socket.connect()
    assert ok
    # The subscription is in place once the consumer answers a ping.
    await socket.send_json_to({"type": "ping"})
    assert await socket.receive_json_from(timeout=2) == {"type": "pong"}
    return socket


async def received_events(socket: WebsocketCommunicator, seconds: float) -> list[dict[str, Any]]:
    """Every event that arrives within ``seconds``."""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    # receive_nothing waits without cancelling the consumer (a receive timeout would).
    while (left := deadline - time.monotonic()) > 0 and not await socket.receive_nothing(timeout=left, interval=0.01):
        message = await socket.receive_json_from()
        assert message["type"] == "events", message
        events.extend(message["events"])
    return events


async def first_event(socket: WebsocketCommunicator, event_type: str, timeout: float = 2.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0 and not await socket.receive_nothing(timeout=left, interval=0.01):
        message = await socket.receive_json_from()
        for event in message.get("events", []):
            if event["event_type"] == event_type:
                return event
    raise AssertionError(f"no {event_type} event within {timeout} s")


@db
def insert_without_broadcast(directive: Directive, event_type: str = "written_elsewhere") -> DirectiveEvent:
    """What another process (the cluster) writes: a row this process's channel layer never hears of."""
    return DirectiveEvent.objects.create(directive=directive, event_type=event_type, subject_type="directive")


# --------------------------------------------------------------------------- who may listen


async def test_the_owner_receives_the_event_of_a_change_made_through_a_service(open_page, people):
    alice, _, _, directive = people
    socket = await connected(await open_page(alice, directive))
    await db(directive_start)(directive=directive, actor=Actor.for_user(alice))
    event = await first_event(socket, "directive_active", timeout=1.0)
    assert event["directive"] == str(directive.pk)
    assert event["data"]["to"] == "active"
    assert event["actor"] == "alice"


async def test_a_teammate_can_listen_to_a_shared_directive(open_page, people):
    alice, _, carol, directive = people
    socket = await connected(await open_page(carol, directive))
    await db(directive_start)(directive=directive, actor=Actor.for_user(alice))
    assert (await first_event(socket, "directive_active"))["actor"] == "alice"


async def test_a_stranger_is_closed_with_4404(open_page, people):
    _, bob, _, directive = people
    socket = await open_page(bob, directive)
    ok, _ = await socket.connect()
    assert ok
    assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 4404}


async def test_an_unknown_directive_is_closed_with_4404(open_page, people):
    alice, _, _, _ = people
    socket = await open_page(alice, Directive(title="never saved"))
    await socket.connect()
    assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 4404}


async def test_an_anonymous_visitor_is_closed_with_4401(open_page, people):
    _, _, _, directive = people
    socket = await open_page(None, directive)
    ok, _ = await socket.connect()
    assert ok
    assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 4401}


async def test_a_socket_from_another_site_is_refused(open_page, people):
    alice, _, _, directive = people
    socket = await open_page(alice, directive, origin=b"https://evil.example")
    ok, _ = await socket.connect()
    assert not ok


async def test_a_socket_without_an_origin_is_refused(people):
    alice, _, _, directive = people
    socket = WebsocketCommunicator(
        application, f"/ws/directives/{directive.pk}/", headers=[(b"cookie", await session_cookie(alice))]
    )
    ok, _ = await socket.connect()
    assert not ok


# --------------------------------------------------------------------------- delivery


def poll_every(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The feed's poll interval, whichever channel layer the suite runs with."""
    monkeypatch.setattr(consumers, "POLL_S", seconds)
    monkeypatch.setattr(consumers, "POLL_S_SHARED_LAYER", seconds)


@pytest.fixture
def in_memory_layer(settings):
    """The embedded default (also when the suite runs against Redis): the one
    layer that never carries another process's events, so the poll must."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


async def test_an_event_written_by_another_process_arrives_within_two_seconds(open_page, people, in_memory_layer):
    alice, _, _, directive = people
    socket = await connected(await open_page(alice, directive))
    row = await insert_without_broadcast(directive)
    event = await first_event(socket, "written_elsewhere", timeout=2.0)
    assert event["id"] == row.pk


async def test_an_event_seen_by_both_the_group_and_the_poll_is_sent_once(open_page, people, monkeypatch):
    poll_every(monkeypatch, 0.2)
    alice, _, _, directive = people
    socket = await connected(await open_page(alice, directive))
    await db(directive_start)(directive=directive, actor=Actor.for_user(alice))
    await db(directive_pause)(directive=directive, actor=Actor.for_user(alice))
    events = await received_events(socket, seconds=1.5)
    ids = [e["id"] for e in events]
    assert {"directive_active", "directive_paused"} <= {e["event_type"] for e in events}
    assert len(ids) == len(set(ids))
    assert ids == sorted(ids)


async def test_events_of_other_directives_are_not_sent(open_page, people):
    alice, _, _, directive = people
    other = await db(make_directive)(alice, title="Other")
    socket = await connected(await open_page(alice, directive))
    await db(event_record)(directive_id=other.pk, event_type="elsewhere")
    await insert_without_broadcast(other)
    assert await received_events(socket, seconds=1.5) == []


async def test_history_from_before_the_connection_is_not_replayed(open_page, people):
    alice, _, _, directive = people
    socket = await connected(await open_page(alice, directive))
    assert await received_events(socket, seconds=1.3) == []


async def test_a_late_commit_below_the_last_sent_id_is_still_delivered(open_page, people, monkeypatch):
    poll_every(monkeypatch, 0.2)
    alice, _, _, directive = people
    socket = await connected(await open_page(alice, directive))
    last = await db(lambda: DirectiveEvent.objects.aggregate(last=Max("id"))["last"])()

    @db
    def write(event_id: int, event_type: str) -> None:
        DirectiveEvent.objects.create(id=event_id, directive=directive, event_type=event_type, subject_type="directive")

    # Two transactions took ids last+1 and last+2; the second committed first.
    await write(last + 2, "committed_first")
    assert (await first_event(socket, "committed_first"))["id"] == last + 2
    await write(last + 1, "committed_late")
    assert (await first_event(socket, "committed_late"))["id"] == last + 1


async def test_group_messages_arrive_without_waiting_for_the_poll(open_page, people, monkeypatch):
    poll_every(monkeypatch, 60.0)
    alice, _, _, directive = people
    socket = await connected(await open_page(alice, directive))
    await db(directive_start)(directive=directive, actor=Actor.for_user(alice))
    assert (await first_event(socket, "directive_active", timeout=0.5))["data"]["to"] == "active"


async def test_resume_sends_what_the_page_missed_and_nothing_twice(open_page, people):
    alice, _, _, directive = people
    missed = await db(event_record)(directive_id=directive.pk, event_type="while_away")
    socket = await connected(await open_page(alice, directive))
    await socket.send_json_to({"type": "resume", "after": missed.pk - 1})
    (message,) = [await socket.receive_json_from(timeout=2)]
    assert [e["event_type"] for e in message["events"]] == ["while_away"]
    await socket.send_json_to({"type": "resume", "after": missed.pk - 1})
    assert await received_events(socket, seconds=1.2) == []


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[1, 2]",
        '{"no": "type"}',
        '{"type": "subscribe"}',
        '{"type": "resume"}',
        '{"type": "resume", "after": "x"}',
        '{"type": "resume", "after": -1}',
        '{"type": "resume", "after": true}',
        '{"type": "resume", "after": 1e400}',
        "x" * 10_000,
    ],
)
async def test_a_malformed_client_message_gets_an_error_and_the_feed_goes_on(open_page, people, frame):
    alice, _, _, directive = people
    socket = await connected(await open_page(alice, directive))
    await socket.send_to(text_data=frame)
    reply = await socket.receive_json_from(timeout=2)
    assert reply["type"] == "error" and reply["message"]
    await db(directive_start)(directive=directive, actor=Actor.for_user(alice))
    assert (await first_event(socket, "directive_active"))["directive"] == str(directive.pk)


async def test_a_binary_frame_is_refused_without_closing(open_page, people):
    alice, _, _, directive = people
    socket = await connected(await open_page(alice, directive))
    await socket.send_to(bytes_data=b"\x00\x01")
    assert (await socket.receive_json_from(timeout=2))["type"] == "error"
    await socket.send_json_to({"type": "ping"})
    assert await socket.receive_json_from(timeout=2) == {"type": "pong"}


async def test_a_page_that_floods_the_socket_is_throttled_not_served(open_page, people):
    alice, _, _, directive = people
    socket = await connected(await open_page(alice, directive))
    for _ in range(100):
        await socket.send_json_to({"type": "ping"})
    replies = []
    while not await socket.receive_nothing(timeout=0.3):
        replies.append(await socket.receive_json_from())
    assert 0 < len(replies) < 100


async def test_losing_access_closes_the_feed(open_page, people, monkeypatch):
    poll_every(monkeypatch, 0.1)
    monkeypatch.setattr(consumers, "RECHECK_S", 0.2)
    _, _, carol, directive = people
    socket = await connected(await open_page(carol, directive))
    await db(lambda: carol.groups.clear())()
    assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 4404}
