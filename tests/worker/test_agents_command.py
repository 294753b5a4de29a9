"""The command agent and ``make_agents``."""

from __future__ import annotations

import sys

import pytest

from makima.worker.agents import ClaudeAgent, CommandAgent, ScriptedAgent, make_agents
from makima.worker.base import TaskSpec

TASK = TaskSpec(id="t-1", name="Greet", kind="execution", agent="command", plan="…")


class Output:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def emit(self, stream: str, line: str) -> None:
        self.lines.append((stream, line))

    def progress(self, cost: float) -> None:
        raise AssertionError("a command reports no cost")


async def run(agent: CommandAgent, tmp_path, prompt: str = "do it", env: dict[str, str] | None = None):
    output = Output()
    result = await agent.run(
        task=TASK, prompt=prompt, cwd=tmp_path, env=env or {}, emit=output.emit, progress=output.progress
    )
    return result, output


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_a_command_that_exits_zero_is_done_and_gets_the_prompt_on_stdin(tmp_path):
    agent = CommandAgent(py("import os, sys; print('prompt:', sys.stdin.read()); print(os.environ['MAKIMA_TASK_ID'])"))

    result, output = await run(agent, tmp_path, prompt="add greet()", env={"MAKIMA_TASK_ID": "t-1"})

    assert (result.status, result.exit_code, result.cost_usd) == ("done", 0, None)
    assert output.lines == [("stdout", "prompt: add greet()"), ("stdout", "t-1")]
    assert result.summary == "prompt: add greet()\nt-1"


async def test_a_command_that_exits_non_zero_fails_with_its_last_stderr_lines(tmp_path):
    code = "import sys\nfor i in range(30): print('noise', i, file=sys.stderr)\nprint('fatal: no luck', file=sys.stderr)\nsys.exit(4)"
    result, output = await run(CommandAgent(py(code)), tmp_path)

    assert (result.status, result.exit_code) == ("failed", 4)
    assert result.error.startswith(f"{sys.executable} exited with status 4:\n")
    assert result.error.endswith("noise 29\nfatal: no luck")
    assert "noise 10" not in result.error  # only the tail
    assert len([1 for stream, _ in output.lines if stream == "stderr"]) == 31


async def test_a_command_line_string_is_split_like_a_shell_would(tmp_path):
    agent = CommandAgent(f"{sys.executable} -c 'import sys; print(sys.argv[1:])' 'two words'")

    result, output = await run(agent, tmp_path)

    assert result.status == "done"
    assert output.lines == [("stdout", "['two words']")]


async def test_a_command_that_cannot_start_fails_the_task(tmp_path):
    result, _ = await run(CommandAgent([str(tmp_path / "missing")]), tmp_path)

    assert result.status == "failed"
    assert result.exit_code is None
    assert "cannot start" in result.error


async def test_a_command_killed_by_a_signal_says_so(tmp_path):
    result, _ = await run(CommandAgent(py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")), tmp_path)

    assert result.status == "failed"
    assert result.error == f"{sys.executable} killed by SIGKILL"


def test_a_command_agent_needs_a_command_line():
    with pytest.raises(ValueError, match="command line"):
        CommandAgent("")
    with pytest.raises(ValueError, match="--command-line"):
        make_agents(["command"], script=None, claude_bin="claude")


def test_the_command_agent_takes_no_follow_up_messages():
    assert CommandAgent(["true"]).send("t-1", "more") is False


def test_make_agents_builds_the_named_agents_once_each(tmp_path):
    agents = make_agents(
        ["scripted", "claude", "command", "scripted"],
        script=tmp_path / "script.yaml",
        claude_bin="claude",
        command_line="aider --yes",
    )

    assert list(agents) == ["scripted", "claude", "command"]
    assert isinstance(agents["claude"], ClaudeAgent)
    assert isinstance(agents["command"], CommandAgent) and agents["command"].argv == ["aider", "--yes"]
    assert isinstance(agents["scripted"], ScriptedAgent)
    assert agents["scripted"].argv[-2:] == ["--script", str((tmp_path / "script.yaml").resolve())]
    assert all(agent.name == name for name, agent in agents.items())


def test_make_agents_refuses_an_unknown_agent():
    with pytest.raises(ValueError, match="unknown agent 'gpt'"):
        make_agents(["gpt"], script=None, claude_bin="claude")
