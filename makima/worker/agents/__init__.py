"""The agents a daemon can run: ``claude``, ``command`` and ``scripted``.

Each implements :class:`makima.worker.base.Agent`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from makima.worker.agents.claude import ClaudeAgent
from makima.worker.agents.command import CommandAgent
from makima.worker.agents.scripted import ScriptedAgent
from makima.worker.base import Agent

AGENT_NAMES = ("claude", "command", "scripted")

__all__ = ["AGENT_NAMES", "ClaudeAgent", "CommandAgent", "ScriptedAgent", "make_agents"]


def make_agents(
    names: Sequence[str],
    *,
    script: Path | None = None,
    claude_bin: str = "claude",
    command_line: Sequence[str] | str | None = None,
    grace_s: float = 10,
) -> dict[str, Agent]:
    """The agents named in ``names`` (the daemon's ``--agent`` options), by name.

    ``script`` is the scripted agent's script (``--script``), ``claude_bin``
    the Claude Code executable, ``command_line`` the ``command`` agent's
    command (``--command-line "aider --yes"``: a string is split like a shell
    would). Raises ``ValueError`` for an unknown name or a ``command`` agent
    without a command line.
    """
    agents: dict[str, Agent] = {}
    for name in dict.fromkeys(names):
        if name == "claude":
            agents[name] = ClaudeAgent(claude_bin, grace_s=grace_s)
        elif name == "command":
            if not command_line:
                raise ValueError("the command agent needs a command line (--command-line)")
            agents[name] = CommandAgent(command_line, grace_s=grace_s)
        elif name == "scripted":
            agents[name] = ScriptedAgent(script, grace_s=grace_s)
        else:
            raise ValueError(f"unknown agent {name!r}: choose from {', '.join(AGENT_NAMES)}")
    return agents
