"""What every websocket consumer of makima shares."""

from __future__ import annotations

from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer

try:  # daphne's websocket transport; absent when another server runs the application
    from autobahn.exception import Disconnected
except ImportError:  # pragma: no cover
    Disconnected = ConnectionError  # type: ignore[assignment,misc]


class JsonSocketConsumer(AsyncJsonWebsocketConsumer):
    """A JSON websocket consumer for which a frame sent after the peer went away
    is dropped, not an error.

    A client may close while the server still answers frames it sent before
    (a flood's replies, an outbox being delivered). daphne then raises
    ``Disconnected`` from ``send``, which ended the consumer with a traceback
    in the log. What was not sent is not lost: commands stay ``sent`` and go
    out again after the next ``hello``; a live page re-reads the events table.
    ``peer_gone`` tells the consumer to stop sending; the disconnect event
    follows and runs its clean-up as usual."""

    peer_gone = False

    async def send_json(self, content: Any, close: bool = False) -> None:
        # Channels' own send_json calls the parent class's send, past the guard below.
        await self.send(text_data=await self.encode_json(content), close=close)

    async def send(self, text_data: str | None = None, bytes_data: bytes | None = None, close: Any = False) -> None:
        if self.peer_gone:
            return
        try:
            await super().send(text_data=text_data, bytes_data=bytes_data, close=close)
        except Disconnected:
            self.peer_gone = True
