"""A TCP proxy between a daemon and daphne that a test can freeze, thaw or cut.

A frozen link is what a dead switch or a suspended VM looks like: both
sockets stay open (no FIN, no RST), nothing is read from either side, and
what the peers write piles up in the kernel buffers. The server hears
silence, not a close, so only its heartbeat deadline and the task lease can
tell that the daemon is gone. ``thaw()`` lets the piled-up bytes through in
order (late heartbeats and reports included); ``cut()`` resets both sides at
once, as a NAT table flush would.

The proxy runs its own asyncio loop in a thread, so that tests stay plain
blocking code around real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

CHUNK = 64 * 1024


@dataclass
class Link:
    """One proxied connection: the client's socket and the upstream one."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


class TcpProxy:
    """Listens on ``127.0.0.1:<port>`` and forwards every connection to ``target``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        #: Connections accepted so far (a reconnecting client adds one).
        self.accepted = 0
        self.links: list[Link] = []
        self._loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def freeze(self) -> None:
        """Stop forwarding in both directions; every socket stays open."""
        self._call(self._set_flowing(False))

    def thaw(self) -> None:
        """Forward again, the bytes that waited first."""
        self._call(self._set_flowing(True))

    def cut(self) -> None:
        """Reset every current connection (RST both ways) and forward new ones again."""
        self._call(self._cut())

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    # ------------------------------------------------------------------ the loop's side

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.accepted += 1
        # A connection made while the link is frozen gets through the kernel's
        # handshake but no further: like the first hop answering and the rest not.
        await self._flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        link = Link(client=writer, upstream=up_writer)
        link.pumps = [
            asyncio.create_task(self._pump(reader, up_writer, link)),
            asyncio.create_task(self._pump(up_reader, writer, link)),
        ]
        self.links.append(link)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: Link) -> None:
        assert self._flowing is not None
        try:
            while True:
                # Not even reading while frozen: the sender's bytes stay in the
                # kernel, and nothing (not a FIN either) reaches the other side.
                await self._flowing.wait()
                data = await source.read(CHUNK)
                await self._flowing.wait()
                if not data:
                    break
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # One side ended: end the other one the same way (a plain close).
            with contextlib.suppress(Exception):
                sink.close()

    async def _cut(self) -> None:
        assert self._flowing is not None
        links, self.links = self.links, []
        for link in links:
            for pump in link.pumps:
                pump.cancel()
            _reset(link.client)
            _reset(link.upstream)
        self._flowing.set()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the kernel sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
