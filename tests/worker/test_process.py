"""Agent subprocesses: streamed output, stdin, exit codes, interrupt and timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from makima.worker.process import MAX_LINE, Process, run_process


class Lines:
    """Collects ``on_line`` calls; ``await wait_for(text)`` until one arrives."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def __call__(self, stream: str, line: str) -> None:
        self.items.append((stream, line))

    def of(self, stream: str) -> list[str]:
        return [line for s, line in self.items if s == stream]

    async def wait_for(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, line in self.items:
                if text in line:
                    return line
            await asyncio.sleep(0.02)
        raise AssertionError(f"no line with {text!r} in {self.items}")


def python(code: str) -> list[str]:
    return [sys.executable, "-u", "-c", textwrap.dedent(code)]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


async def wait_dead(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_it_streams_stdout_and_stderr_line_by_line_and_returns_the_exit_code(tmp_path):
    lines = Lines()
    code = await run_process(
        python("""
            import sys
            text = sys.stdin.read()
            print("got " + text.upper().strip())
            print("second line")
            print("a warning", file=sys.stderr)
            sys.stdout.write("no newline at the end")
            sys.exit(3)
        """),
        cwd=tmp_path,
        env=None,
        stdin_text="hello agent\n",
        on_line=lines,
    )

    assert code == 3
    assert lines.of("stdout") == ["got HELLO AGENT", "second line", "no newline at the end"]
    assert lines.of("stderr") == ["a warning"]


async def test_it_runs_in_cwd_with_exactly_the_given_environment(tmp_path):
    lines = Lines()
    env = {"PATH": os.environ["PATH"], "MAKIMA_TASK_ID": "t-1"}
    code = await run_process(
        python("import os; print(os.getcwd()); print(os.environ.get('MAKIMA_TASK_ID')); print('HOME' in os.environ)"),
        cwd=tmp_path,
        env=env,
        stdin_text=None,
        on_line=lines,
    )

    assert code == 0
    assert lines.of("stdout") == [str(tmp_path.resolve()), "t-1", "False"]


async def test_a_large_prompt_does_not_deadlock_against_an_agent_that_writes_before_reading(tmp_path):
    lines = Lines()
    prompt = "x" * 1_000_000 + "\n"
    code = await run_process(
        python("""
            import sys
            for i in range(2000):
                print("line", i)
            print(len(sys.stdin.read()))
        """),
        cwd=tmp_path,
        env=None,
        stdin_text=prompt,
        on_line=lines,
    )

    assert code == 0
    assert lines.of("stdout")[-1] == str(len(prompt))
    assert len(lines.of("stdout")) == 2001


async def test_a_very_long_line_is_truncated_with_a_marker_and_bad_utf8_is_replaced(tmp_path):
    lines = Lines()
    await run_process(
        python("""
            import sys
            sys.stdout.write("é" * 20000 + "\\n")
            sys.stdout.flush()
            sys.stdout.buffer.write(b"bad \\xff byte\\nafter\\n")
        """),
        cwd=tmp_path,
        env=None,
        stdin_text=None,
        on_line=lines,
    )

    long, bad, after = lines.of("stdout")
    head, marker = long.split(" … ")
    assert set(head) == {"é"} and len(head.encode()) <= MAX_LINE
    assert marker == f"[{40000 - len(head.encode())} more bytes]"
    assert bad == "bad \ufffd byte"
    assert after == "after"


async def test_it_does_not_wait_for_background_children_that_keep_the_pipes_open(tmp_path):
    lines = Lines()
    started = time.monotonic()
    code = await run_process(
        ["sh", "-c", "sleep 30 & echo $!; echo finished"],
        cwd=tmp_path,
        env=None,
        stdin_text=None,
        on_line=lines,
    )

    assert code == 0
    assert time.monotonic() - started < 5
    leftover = int(lines.of("stdout")[0])
    assert await wait_dead(leftover), "the leftover child of the agent is killed"


async def test_cancelling_sends_sigterm_to_the_whole_process_group(tmp_path):
    lines = Lines()
    marker = tmp_path / "terminated"
    child = textwrap.dedent(f"""
        import signal, sys, time
        def bye(*_):
            open({str(marker)!r}, "w").write("TERM")
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("child ready", flush=True)
        time.sleep(60)
    """)
    task = asyncio.create_task(
        run_process(
            python(f"""
                import subprocess, sys
                subprocess.run([sys.executable, "-c", {child!r}])
            """),
            cwd=tmp_path,
            env=None,
            stdin_text=None,
            on_line=lines,
            grace_s=5,
        )
    )
    await lines.wait_for("child ready")
    started = time.monotonic()
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert marker.read_text() == "TERM"  # the grandchild, not only the leader, got SIGTERM
    assert time.monotonic() - started < 4


async def test_a_child_that_ignores_sigterm_gets_sigkill_after_the_grace_period(tmp_path):
    lines = Lines()
    processes: list[Process] = []
    task = asyncio.create_task(
        run_process(
            python("""
                import signal, time
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                print("stubborn", flush=True)
                time.sleep(60)
            """),
            cwd=tmp_path,
            env=None,
            stdin_text=None,
            on_line=lines,
            grace_s=0.5,
            on_start=processes.append,
        )
    )
    await lines.wait_for("stubborn")
    started = time.monotonic()
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 4
    assert await wait_dead(processes[0].pid)


async def test_a_timeout_around_it_kills_the_group(tmp_path):
    lines = Lines()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1):
            await run_process(
                ["sh", "-c", "sleep 30 & echo $!; wait"],
                cwd=tmp_path,
                env=None,
                stdin_text=None,
                on_line=lines,
                grace_s=2,
            )

    assert await wait_dead(int(lines.of("stdout")[0]))


async def test_wait_for_timeout_kills_the_group_too(tmp_path):
    lines = Lines()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            run_process(
                ["sh", "-c", "sleep 30 & echo $!; wait"],
                cwd=tmp_path,
                env=None,
                stdin_text=None,
                on_line=lines,
                grace_s=2,
            ),
            timeout=1,
        )

    assert await wait_dead(int(lines.of("stdout")[0]))


async def test_a_process_started_with_stdin_open_takes_input_later(tmp_path):
    lines = Lines()
    processes: list[Process] = []
    task = asyncio.create_task(
        run_process(
            python("""
                import sys
                print("question?", flush=True)
                print("answer: " + sys.stdin.readline().strip())
            """),
            cwd=tmp_path,
            env=None,
            stdin_text=None,
            on_line=lines,
            keep_stdin_open=True,
            on_start=processes.append,
        )
    )
    await lines.wait_for("question?")

    assert processes[0].send("forty-two\n")
    assert await task == 0
    assert lines.of("stdout") == ["question?", "answer: forty-two"]
    assert not processes[0].send("too late\n")


async def test_a_process_without_open_stdin_takes_no_input(tmp_path):
    processes: list[Process] = []
    lines = Lines()
    task = asyncio.create_task(
        run_process(
            python("import time; print('up', flush=True); time.sleep(0.5)"),
            cwd=tmp_path,
            env=None,
            stdin_text="prompt",
            on_line=lines,
            on_start=processes.append,
        )
    )
    await lines.wait_for("up")

    assert not processes[0].send("more\n")
    assert await task == 0


async def test_a_missing_program_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        await run_process([str(tmp_path / "no-such-agent")], cwd=tmp_path, env=None, stdin_text=None, on_line=Lines())


async def test_a_process_killed_by_a_signal_reports_a_negative_exit_code(tmp_path):
    code = await run_process(
        python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"),
        cwd=tmp_path,
        env=None,
        stdin_text=None,
        on_line=Lines(),
    )

    assert code == -signal.SIGKILL
