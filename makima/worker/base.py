"""Shapes shared by the worker's parts. Plain dataclasses: no Django here."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

#: ``emit(stream, line)``: one line of agent output ("stdout", "stderr", "assistant", "tool", "system").
Emit = Callable[[str, str], None]
#: ``progress(cost_usd)``: the cumulative cost so far.
Progress = Callable[[float], None]


def slug(text: str, *, limit: int = 80) -> str:
    """A name safe as one path component: never ``..``, never a separator."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-")[:limit].strip(".-")
    return value or "task"


@dataclass(frozen=True)
class TaskSpec:
    """The ``task`` object of a ``spawn_task`` command (protocol.md)."""

    id: str
    name: str
    kind: str
    agent: str
    plan: str
    repository_url: str = ""
    local_path: str | None = None
    base_branch: str = "main"
    branch: str = ""
    continue_from: dict[str, str] | None = None  # {"task_id", "branch"}
    merge_branches: tuple[str, ...] = ()
    completion_action: str = "branch"  # "branch" | "pr" | "none"
    verifiers: tuple[str, ...] | Literal["auto"] = ()
    timeout_s: float | None = None
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_message(cls, task: dict[str, Any]) -> TaskSpec:
        verifiers = task.get("verifiers") or ()
        return cls(
            id=str(task["id"]),
            name=str(task.get("name") or ""),
            kind=str(task.get("kind") or "execution"),
            agent=str(task.get("agent") or ""),
            plan=str(task.get("plan") or ""),
            repository_url=str(task.get("repository_url") or ""),
            local_path=task.get("local_path") or None,
            base_branch=str(task.get("base_branch") or "main"),
            branch=str(task.get("branch") or ""),
            continue_from=task.get("continue_from") or None,
            merge_branches=tuple(task.get("merge_branches") or ()),
            completion_action=str(task.get("completion_action") or "branch"),
            verifiers="auto" if verifiers == "auto" else tuple(verifiers),
            timeout_s=task.get("timeout_s"),
            env={str(k): str(v) for k, v in (task.get("env") or {}).items()},
        )

    @property
    def remote(self) -> str:
        """Where the repository lives: its URL, else the local path."""
        return self.repository_url or self.local_path or ""


@dataclass
class Worktree:
    """A task's checkout: ``git.Workspace.prepare`` makes it, ``finish`` commits it."""

    path: Path
    branch: str
    base_commit: str
    #: ``merge_branches`` whose merge conflicted (aborted; the agent is told to merge them).
    conflicts: list[str] = field(default_factory=list)
    #: Whether the repository has a remote to push to (false for a repository-less task).
    has_remote: bool = True


@dataclass
class AgentResult:
    """How an agent run ended."""

    status: Literal["done", "failed", "interrupted"]
    exit_code: int | None = None
    summary: str = ""
    error: str = ""
    cost_usd: float | None = None


class Agent(Protocol):
    """One kind of coding agent. ``run`` starts the agent in ``cwd`` with
    ``env``, feeds it ``prompt``, streams its output through ``emit``, and
    returns when it ends. Cancelling the awaiting task interrupts the agent
    (SIGTERM to its process group, SIGKILL after ``grace_s``) and the call
    raises ``asyncio.CancelledError``. ``send`` gives a running agent input
    (``send_message``); agents that cannot take it return False."""

    name: str

    def run(
        self, *, task: TaskSpec, prompt: str, cwd: Path, env: dict[str, str], emit: Emit, progress: Progress
    ) -> Awaitable[AgentResult]: ...

    def send(self, task_id: str, message: str) -> bool: ...
