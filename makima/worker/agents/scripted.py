"""The ``scripted`` agent: a deterministic stand-in for a model.

It is a ``command`` agent whose program is ``makima.worker.scripted_main``
(see ``docs/scripted-agent.md``): it reads a script, writes files, runs
commands, and calls the real ``makima`` CLI like a model-driven agent would.
"""

from __future__ import annotations

import sys
from pathlib import Path

from makima.worker.agents.command import CommandAgent, agent_environment
from makima.worker.base import TaskSpec


class ScriptedAgent(CommandAgent):
    """``script``: the script for every task (the daemon's ``--script``);
    without it each worktree's ``.makima/script.yaml`` (or ``.json``) is used,
    and without that the built-in defaults."""

    name = "scripted"

    def __init__(self, script: Path | None = None, *, python: str = sys.executable, grace_s: float = 10) -> None:
        # Resolved now: the agent runs in the worktree, not where the daemon started.
        self.script = Path(script).resolve() if script else None
        argv = [python, "-u", "-m", "makima.worker.scripted_main"]
        if self.script:
            argv += ["--script", str(self.script)]
        super().__init__(argv, grace_s=grace_s)

    def environment(self, task: TaskSpec, env: dict[str, str]) -> dict[str, str]:
        environment = agent_environment(env)
        # The runner sets these too; the agent does not depend on it.
        environment.setdefault("MAKIMA_TASK_KIND", task.kind)
        environment.setdefault("MAKIMA_TASK_NAME", task.name)
        environment.setdefault("MAKIMA_TASK_ID", task.id)
        return environment
