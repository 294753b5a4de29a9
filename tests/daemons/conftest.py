"""Helpers for the daemon gateway tests: sockets on the real ASGI application."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections

from makima.asgi import application

Open = Callable[..., Awaitable[WebsocketCommunicator]]


@pytest.fixture(autouse=True)
async def close_consumer_connections(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Consumers reach the database from asgiref's worker thread, whose
    connection outlives the test (CONN_MAX_AGE); close it so that PostgreSQL
    can drop the test database at the end."""
    yield
    if request.node.get_closest_marker("django_db"):
        await database_sync_to_async(connections.close_all)()


@pytest.fixture
async def open_socket() -> AsyncIterator[Open]:
    """``await open_socket(token)``: a connected socket at ``/ws/daemon/`` with
    ``Authorization: Bearer <token>`` (or ``?token=`` with ``query=True``).
    Every socket opened is disconnected at the end of the test."""
    opened: list[WebsocketCommunicator] = []

    async def open_(token: str | None, *, query: bool = False, headers: list[tuple[bytes, bytes]] | None = None):
        path = "/ws/daemon/"
        if query and token:
            path += f"?token={token}"
        if headers is None:
            headers = [(b"authorization", b"Bearer " + token.encode())] if token and not query else []
        socket = WebsocketCommunicator(application, path, headers=headers)
        opened.append(socket)
        connected, _ = await socket.connect()
        assert connected
        return socket

    yield open_
    for socket in opened:
        await socket.disconnect()


def hello_message(name: str = "build-box-1", **fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": "hello",
        "protocol": 1,
        "name": name,
        "hostname": f"{name}.local",
        "version": "0.1.0",
        "max_concurrent_tasks": 2,
        "agents": ["scripted", "command"],
        "running_tasks": [],
    }
    message.update(fields)
    return message


async def say_hello(socket: WebsocketCommunicator, name: str = "build-box-1", **fields: Any) -> dict[str, Any]:
    """Send ``hello`` and return the ``welcome``."""
    await socket.send_json_to(hello_message(name, **fields))
    welcome = await socket.receive_json_from(timeout=2)
    assert welcome["type"] == "welcome", welcome
    return welcome


async def receive_all(socket: WebsocketCommunicator, timeout: float = 0.3) -> list[dict[str, Any]]:
    """Every message that arrives until the socket is quiet for ``timeout`` seconds."""
    messages = []
    while not await socket.receive_nothing(timeout=timeout):
        messages.append(await socket.receive_json_from())
    return messages


db = database_sync_to_async
