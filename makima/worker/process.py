"""Agent subprocesses: streamed output, input, interrupt and timeout.

Every agent runs in its own process group (a new session), so that an
interrupt reaches whatever it started (shells, test runners, servers) and
nothing outlives the task: the group gets SIGTERM, then SIGKILL after a grace
period. Cancelling the coroutine that awaits :func:`run_process` is the one
way to stop it; the caller's timeout (``asyncio.timeout``/``wait_for``)
cancels it too, so a timeout kills the group the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: ``on_line(stream, line)`` with ``stream`` "stdout" or "stderr".
OnLine = Callable[[str, str], None]

#: Lines longer than this (in bytes) are truncated with a marker.
MAX_LINE = 16 * 1024
_CHUNK = 64 * 1024
#: After the agent exits, how long its leftovers may keep the pipes open.
_DRAIN_S = 1.0


def _utf8_cut(data: bytes, limit: int) -> bytes:
    """``data[:limit]`` without splitting a UTF-8 sequence."""
    if len(data) <= limit:
        return data
    end = limit
    # Back off over continuation bytes (0b10xxxxxx) to a character start.
    while end > 0 and limit - end < 4 and (data[end] & 0xC0) == 0x80:
        end -= 1
    return data[:end]


class _LineSplitter:
    """Bytes in, lines out; a line over ``max_line`` bytes keeps its head and
    says how much was dropped, so one runaway line cannot flood the output."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self.buffer = bytearray()
        self.dropped = 0

    def _line(self, data: bytes) -> str:
        text = data.decode("utf-8", errors="replace").rstrip("\r")
        if self.dropped:
            text += f" … [{self.dropped} more bytes]"
            self.dropped = 0
        return text

    def feed(self, data: bytes) -> list[str]:
        lines: list[str] = []
        start = 0
        while True:
            newline = data.find(b"\n", start)
            piece = data[start:] if newline < 0 else data[start:newline]
            room = self.max_line - len(self.buffer)
            if len(piece) > room:
                if room > 0:
                    head = _utf8_cut(bytes(self.buffer) + piece, self.max_line)
                    self.dropped += len(self.buffer) + len(piece) - len(head)
                    self.buffer = bytearray(head)
                else:
                    self.dropped += len(piece)
            else:
                self.buffer += piece
            if newline < 0:
                return lines
            lines.append(self._line(bytes(self.buffer)))
            self.buffer.clear()
            start = newline + 1

    def flush(self) -> list[str]:
        if not self.buffer and not self.dropped:
            return []
        line = self._line(bytes(self.buffer))
        self.buffer.clear()
        return [line]


def _signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to the group; False when nobody is left in it."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a reused pgid owned by someone else
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: where
    PID 1 reaps orphans slowly, they would hold up every interrupt."""
    if not os.path.exists("/proc/self/stat"):  # not Linux: zombies count, then
        return _signal_group(pgid, 0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp.
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


class Process:
    """One subprocess in its own process group.

    ``await start()``, then ``await wait()`` for its exit code; ``send`` writes
    to its stdin while it runs (when started with ``keep_stdin_open``);
    ``await stop(grace_s)`` terminates the group. :func:`run_process` is the
    usual way to use it.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: str | Path,
        env: Mapping[str, str] | None,
        on_line: OnLine,
        max_line: int = MAX_LINE,
    ) -> None:
        if not argv:
            raise ValueError("empty command line")
        self.argv = [str(a) for a in argv]
        self.cwd = str(cwd)
        self.env = dict(env) if env is not None else None
        self.on_line = on_line
        self.max_line = max_line
        self.proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._stdin_open = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, stdin_text: str | None = None, *, keep_stdin_open: bool = False) -> None:
        """Start the process; raises ``OSError`` (e.g. ``FileNotFoundError``)
        when it cannot be started."""
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self._stdin_open = keep_stdin_open
        self._readers = [
            asyncio.create_task(self._read("stdout", self.proc.stdout)),
            asyncio.create_task(self._read("stderr", self.proc.stderr)),
        ]
        try:
            # Buffered by the transport now (so it precedes anything sent later),
            # drained by a task: a large prompt cannot deadlock against an agent
            # that writes a lot before it reads its input.
            if stdin_text:
                self.proc.stdin.write(stdin_text.encode("utf-8"))
        except (BrokenPipeError, ConnectionResetError):
            self._stdin_open = False
        self._readers.append(asyncio.create_task(self._feed(close=not keep_stdin_open)))

    async def _feed(self, *, close: bool) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            close = True  # it stopped reading: nothing more can be sent
        finally:
            if close:
                self._close_stdin()

    def _close_stdin(self) -> None:
        self._stdin_open = False
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def send(self, text: str) -> bool:
        """Write ``text`` to the running process's stdin; False when it
        no longer takes input."""
        if not self._stdin_open or self.proc is None or self.proc.returncode is not None:
            return False
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode("utf-8"))
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            self._stdin_open = False
            return False
        return True

    async def _read(self, stream: str, reader: asyncio.StreamReader) -> None:
        splitter = _LineSplitter(self.max_line)
        while True:
            data = await reader.read(_CHUNK)
            if not data:
                break
            for line in splitter.feed(data):
                self.on_line(stream, line)
        for line in splitter.flush():
            self.on_line(stream, line)

    async def _exited(self, timeout: float | None = None) -> int | None:
        """The exit code once the process exited; None if ``timeout`` passed
        first. Not plain ``proc.wait()``: before Python 3.12 it also waits for
        the pipes to close, which a background child can keep open forever."""
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        waiter = asyncio.ensure_future(self.proc.wait())
        try:
            while self.proc.returncode is None and not waiter.done():
                if deadline is not None and loop.time() >= deadline:
                    return None
                await asyncio.wait([waiter], timeout=0.05)
        finally:
            waiter.cancel()
        return self.proc.returncode

    async def wait(self) -> int:
        """Wait for the exit and for the output to be read; returns the exit
        code (negative: killed by that signal). Leftovers of the process
        group (background children) are killed once the agent itself exits."""
        assert self.proc is not None
        code = await self._exited()
        assert code is not None
        self._stdin_open = False
        readers = asyncio.gather(*self._readers)
        # Retrieved even when stop() cancels the readers first: no "never retrieved" noise.
        readers.add_done_callback(lambda f: f.cancelled() or f.exception())
        done, _ = await asyncio.wait([readers], timeout=_DRAIN_S)
        # Whatever is left in the group outlived its agent: it goes.
        _signal_group(self.proc.pid, signal.SIGKILL)
        if not done:
            done, _ = await asyncio.wait([readers], timeout=_DRAIN_S)
        if not done:  # someone outside the group holds the pipes
            readers.cancel()
            await asyncio.wait([readers])
        else:
            readers.result()  # an error of on_line surfaces here
        return code

    async def stop(self, grace_s: float) -> None:
        """SIGTERM to the group, SIGKILL after ``grace_s`` if anything is
        left. Safe to call when the process already ended."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        self._close_stdin()
        try:
            if _signal_group(pgid, signal.SIGTERM):
                loop = asyncio.get_running_loop()
                deadline = loop.time() + grace_s
                await self._exited(timeout=grace_s)
                # The leader is gone; give the rest of its group the remaining grace.
                while loop.time() < deadline and _group_alive(pgid):
                    await asyncio.sleep(0.05)
        finally:
            # Also reached when stop() itself is cancelled: never leave the group behind.
            _signal_group(pgid, signal.SIGKILL)
        # The group is gone; what it wrote last is still in the pipes.
        done, pending = await asyncio.wait(self._readers, timeout=_DRAIN_S) if self._readers else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*done, *pending, return_exceptions=True)


async def run_process(
    argv: Sequence[str],
    *,
    cwd: str | Path,
    env: Mapping[str, str] | None,
    stdin_text: str | None,
    on_line: OnLine,
    grace_s: float = 10,
    max_line: int = MAX_LINE,
    keep_stdin_open: bool = False,
    on_start: Callable[[Process], None] | None = None,
) -> int:
    """Run ``argv`` in ``cwd`` with exactly ``env`` (None: inherit), feed it
    ``stdin_text`` (then close stdin unless ``keep_stdin_open``), and pass
    every output line to ``on_line(stream, line)``; returns the exit code.

    Cancelling the awaiting task sends SIGTERM to the process group, SIGKILL
    after ``grace_s``, then re-raises ``CancelledError``. ``on_start`` gets the
    :class:`Process` once it runs (e.g. to ``send`` it input later).
    """
    process = Process(argv, cwd=cwd, env=env, on_line=on_line, max_line=max_line)
    await process.start(stdin_text, keep_stdin_open=keep_stdin_open)
    if on_start is not None:
        on_start(process)
    try:
        return await process.wait()
    except BaseException:
        await process.stop(grace_s)
        raise
