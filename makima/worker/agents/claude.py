"""The ``claude`` agent: Claude Code in print mode with stream-JSON output.

``claude -p --output-format stream-json --verbose --dangerously-skip-permissions``
with the prompt on stdin. The agent runs unattended in a throwaway worktree,
so nobody could answer a permission prompt: in print mode a tool call that
needs permission would just be denied and the task would achieve nothing.
Hence ``--dangerously-skip-permissions`` by default; ``skip_permissions=False``
with ``extra_args`` (``--permission-mode``, ``--allowedTools`` …) restricts it.

Each stdout line is one JSON event: ``system`` (init), ``assistant`` (text and
tool calls), ``user`` (tool results) and the final ``result`` (cost, turns,
the closing message). Anything else is passed through as plain stdout.
"""

from __future__ import annotations

import json
import shlex
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from makima.worker.agents.command import TAIL_LINES, agent_environment, clip, describe_exit
from makima.worker.base import AgentResult, Emit, Progress, TaskSpec
from makima.worker.process import MAX_LINE, run_process

#: JSON events can be far longer than a line worth showing (a tool result with
#: a whole file): read them whole up to this size, shorten what is emitted.
MAX_EVENT = 8 * 1024 * 1024
#: How much of a tool call's input or a tool's result is shown.
TOOL_TEXT = 300


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _content_text(content: Any) -> str:
    """The text of a tool result's ``content`` (a string or text blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(item.get("text", "")) for item in content if isinstance(item, dict))
    return ""


class ClaudeStream:
    """Turns stream-JSON lines into output lines and remembers the result."""

    def __init__(self, emit: Emit, progress: Progress) -> None:
        self.emit = emit
        self.progress = progress
        self.result: dict[str, Any] | None = None
        self.stderr: deque[str] = deque(maxlen=TAIL_LINES)

    def on_line(self, stream: str, line: str) -> None:
        if stream == "stderr":
            self.emit("stderr", line[:MAX_LINE])
            if line.strip():
                self.stderr.append(line[:MAX_LINE])
            return
        if not line.strip():
            return
        try:
            event = json.loads(line)
            handled = isinstance(event, dict) and self.handle(event)
        except Exception:  # a malformed event must never stop the stream
            handled = False
        if not handled:
            self.emit("stdout", line[:MAX_LINE])

    def handle(self, event: dict[str, Any]) -> bool:
        kind = event.get("type")
        if kind == "system":
            self.on_system(event)
        elif kind == "assistant":
            self.on_message(event, self.on_assistant_item)
        elif kind == "user":
            self.on_message(event, self.on_user_item)
        elif kind == "result":
            self.on_result(event)
        elif kind == "stream_event":
            pass  # partial deltas (--include-partial-messages): the whole message follows
        else:
            return False
        return True

    def on_system(self, event: dict[str, Any]) -> None:
        subtype = event.get("subtype") or "system"
        if subtype == "init":
            details = [f"model {event.get('model') or '?'}"]
            if event.get("session_id"):
                details.append(f"session {event['session_id']}")
            if event.get("permissionMode"):
                details.append(f"permissions {event['permissionMode']}")
            self.emit("system", "claude started: " + ", ".join(details))
        else:
            rest = {k: v for k, v in event.items() if k not in ("type", "subtype", "session_id", "uuid")}
            self.emit("system", _short(f"{subtype} {json.dumps(rest, ensure_ascii=False)}", TOOL_TEXT))

    def on_message(self, event: dict[str, Any], handle_item: Callable[[dict[str, Any]], None]) -> None:
        message = event.get("message") or {}
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}] if event.get("type") == "assistant" else []
        for item in content or []:
            if isinstance(item, dict):
                handle_item(item)

    def on_assistant_item(self, item: dict[str, Any]) -> None:
        if item.get("type") == "text":
            for line in str(item.get("text") or "").splitlines():
                if line.strip():
                    self.emit("assistant", line[:MAX_LINE])
        elif item.get("type") == "tool_use":
            arguments = json.dumps(item.get("input") or {}, ensure_ascii=False, separators=(",", ":"))
            self.emit("tool", _short(f"{item.get('name') or 'tool'} {arguments}", TOOL_TEXT))
        # "thinking" and unknown blocks are not shown.

    def on_user_item(self, item: dict[str, Any]) -> None:
        if item.get("type") != "tool_result":
            return
        text = _short(_content_text(item.get("content")), TOOL_TEXT)
        self.emit("tool", f"{'error' if item.get('is_error') else 'result'}: {text}" if text else "result: (empty)")

    def on_result(self, event: dict[str, Any]) -> None:
        self.result = event
        cost = self.cost
        parts = [str(event.get("subtype") or "result")]
        if event.get("num_turns") is not None:
            parts.append(f"{event['num_turns']} turns")
        if cost is not None:
            parts.append(f"${cost:.4f}")
            self.progress(cost)
        self.emit("system", "claude finished: " + ", ".join(parts))

    @property
    def cost(self) -> float | None:
        if self.result is None:
            return None
        # ``cost_usd`` is what older Claude Code versions called it.
        for key in ("total_cost_usd", "cost_usd"):
            value = self.result.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        return None

    def outcome(self, code: int, program: str) -> AgentResult:
        stderr = "\n".join(self.stderr)
        if self.result is None:
            error = f"{program} {describe_exit(code)} without a result"
            return AgentResult(status="failed", exit_code=code, error=clip(f"{error}:\n{stderr}" if stderr else error))
        result = self.result
        text = result.get("result")
        text = text if isinstance(text, str) else ""
        subtype = str(result.get("subtype") or "")
        failed = bool(result.get("is_error")) or subtype not in ("", "success") or code != 0
        if not failed:
            return AgentResult(status="done", exit_code=code, summary=clip(text), cost_usd=self.cost)
        reasons = [f"claude: {subtype or 'error'}"]
        if text:
            reasons.append(text)
        errors = result.get("errors")
        if isinstance(errors, list):
            reasons.extend(str(e) for e in errors)
        if code != 0:
            reasons.append(f"{program} {describe_exit(code)}")
            if stderr:
                reasons.append(stderr)
        return AgentResult(
            status="failed", exit_code=code, summary=clip(text), error=clip("\n".join(reasons)), cost_usd=self.cost
        )


class ClaudeAgent:
    """Claude Code in print mode; see the module docstring."""

    name = "claude"

    def __init__(
        self,
        claude_bin: str = "claude",
        *,
        skip_permissions: bool = True,
        extra_args: Sequence[str] = (),
        grace_s: float = 10,
    ) -> None:
        # A string so that an operator can say "npx @anthropic-ai/claude-code".
        self.program = shlex.split(claude_bin) or ["claude"]
        self.skip_permissions = skip_permissions
        self.extra_args = list(extra_args)
        self.grace_s = grace_s

    def command(self) -> list[str]:
        argv = [*self.program, "-p", "--output-format", "stream-json", "--verbose"]
        if self.skip_permissions:
            argv.append("--dangerously-skip-permissions")
        return argv + self.extra_args

    async def run(
        self, *, task: TaskSpec, prompt: str, cwd: Path, env: dict[str, str], emit: Emit, progress: Progress
    ) -> AgentResult:
        stream = ClaudeStream(emit, progress)
        argv = self.command()
        try:
            code = await run_process(
                argv,
                cwd=cwd,
                env=agent_environment(env),
                stdin_text=prompt,
                on_line=stream.on_line,
                grace_s=self.grace_s,
                max_line=MAX_EVENT,
            )
        except OSError as exc:
            return AgentResult(status="failed", error=f"cannot start {argv[0]}: {exc}")
        return stream.outcome(code, Path(argv[0]).name)

    def send(self, task_id: str, message: str) -> bool:
        # Print mode reads one prompt and closes; follow-ups would need --resume.
        return False
