"""The ``command`` agent: any command line, the prompt on its stdin."""

from __future__ import annotations

import os
import shlex
import signal
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from makima.worker.base import AgentResult, Emit, Progress, TaskSpec
from makima.worker.process import run_process

#: How many of the last output lines make a summary or an error.
TAIL_LINES = 20
#: Longest summary or error an agent reports.
MAX_TEXT = 4000


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, keeping its end (where errors are)."""
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def agent_environment(env: dict[str, str]) -> dict[str, str]:
    """The daemon's environment (PATH, HOME, credentials of the agent's own
    tools) with the task's variables on top."""
    return {**os.environ, **env}


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class CommandAgent:
    """Runs ``argv`` in the worktree with the prompt on stdin. Exit status 0 is
    ``done`` (summary: the last stdout lines); anything else is ``failed``
    (error: the exit status and the last stderr lines)."""

    name = "command"

    def __init__(self, argv: Sequence[str] | str, *, grace_s: float = 10) -> None:
        self.argv = shlex.split(argv) if isinstance(argv, str) else [str(a) for a in argv]
        if not self.argv:
            raise ValueError("the command agent needs a command line")
        self.grace_s = grace_s

    def command(self, task: TaskSpec, cwd: Path) -> list[str]:
        return list(self.argv)

    def environment(self, task: TaskSpec, env: dict[str, str]) -> dict[str, str]:
        return agent_environment(env)

    async def run(
        self, *, task: TaskSpec, prompt: str, cwd: Path, env: dict[str, str], emit: Emit, progress: Progress
    ) -> AgentResult:
        tails: dict[str, deque[str]] = {"stdout": deque(maxlen=TAIL_LINES), "stderr": deque(maxlen=TAIL_LINES)}

        def on_line(stream: str, line: str) -> None:
            emit(stream, line)
            if line.strip():
                tails[stream].append(line)

        argv = self.command(task, cwd)
        try:
            code = await run_process(
                argv,
                cwd=cwd,
                env=self.environment(task, env),
                stdin_text=prompt,
                on_line=on_line,
                grace_s=self.grace_s,
            )
        except OSError as exc:  # not found, not executable, bad cwd
            return AgentResult(status="failed", error=f"cannot start {argv[0]}: {exc}")
        if code == 0:
            return AgentResult(status="done", exit_code=0, summary=clip("\n".join(tails["stdout"])))
        error = f"{argv[0]} {describe_exit(code)}"
        if tails["stderr"]:
            error += ":\n" + "\n".join(tails["stderr"])
        return AgentResult(status="failed", exit_code=code, error=clip(error), summary=clip("\n".join(tails["stdout"])))

    def send(self, task_id: str, message: str) -> bool:
        # The prompt is the whole of its stdin: there is no channel for more.
        return False
