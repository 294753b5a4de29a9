"""The claude agent, against a fake ``claude`` that replays recorded streams."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from makima.worker.agents import ClaudeAgent, make_agents
from makima.worker.base import TaskSpec

FIXTURES = Path(__file__).parent / "fixtures" / "claude"
TASK = TaskSpec(id="3f2a9c1d-0000-4000-8000-000000000001", name="Greet", kind="execution", agent="claude", plan="…")


class Output:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []
        self.costs: list[float] = []

    def emit(self, stream: str, line: str) -> None:
        self.lines.append((stream, line))

    def progress(self, cost: float) -> None:
        self.costs.append(cost)

    def of(self, stream: str) -> list[str]:
        return [line for s, line in self.lines if s == stream]


def fake_claude(tmp_path: Path, fixture: str, *, stderr: str = "", exit_code: int = 0, sleep: float = 0) -> Path:
    """An executable that reads its stdin first (as claude does), notes its
    arguments and environment, replays ``fixture`` and exits with ``exit_code``."""
    program = tmp_path / "bin" / "claude"
    program.parent.mkdir(exist_ok=True)
    program.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys, time\n"
        "here = os.path.dirname(os.path.abspath(__file__))\n"
        "prompt = sys.stdin.read()\n"
        "with open(os.path.join(here, 'call.json'), 'w') as f:\n"
        "    json.dump({'argv': sys.argv[1:], 'stdin': prompt, 'cwd': os.getcwd(),\n"
        "               'task': os.environ.get('MAKIMA_TASK_ID'), 'path': 'PATH' in os.environ}, f)\n"
        f"sys.stdout.write(open({str(FIXTURES / fixture)!r}, encoding='utf-8').read())\n"
        "sys.stdout.flush()\n"
        f"time.sleep({sleep})\n"
        f"sys.stderr.write({stderr!r})\n"
        f"sys.exit({exit_code})\n"
    )
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    return program


def last_call(program: Path) -> dict:
    return json.loads((program.parent / "call.json").read_text())


async def run(agent: ClaudeAgent, tmp_path: Path, output: Output, prompt: str = "Add greet()."):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return await agent.run(
        task=TASK,
        prompt=prompt,
        cwd=work,
        env={"MAKIMA_TASK_ID": TASK.id},
        emit=output.emit,
        progress=output.progress,
    )


async def test_a_successful_run_streams_text_and_tool_calls_and_reports_its_cost(tmp_path):
    program = fake_claude(tmp_path, "success.jsonl")
    output = Output()

    result = await run(ClaudeAgent(str(program)), tmp_path, output, prompt="Add greet() to the package.")

    assert result.status == "done"
    assert result.exit_code == 0
    assert result.cost_usd == pytest.approx(0.0421387)
    assert result.summary == "Done: greet() is in greeter/greet.py and the tests pass."
    assert output.costs == [pytest.approx(0.0421387)]
    assert output.of("assistant") == [
        "I'll add greet() to the package.",
        "First, let me look at what is there.",
        "Done: greet() is in greeter/greet.py and the tests pass.",
    ]
    tools = output.of("tool")
    assert tools[0] == 'Bash {"command":"ls greeter tests","description":"List the package and its tests"}'
    assert tools[1] == "result: greeter: __init__.py names.py tests: __init__.py test_names.py"
    assert tools[2].startswith('Write {"file_path":"/srv/makima/worktrees/greet-3f2a9c1d/greeter/greet.py"')
    assert tools[-1] == "result: .. [100%] 2 passed in 0.04s"  # text blocks of a tool result
    system = output.of("system")
    assert system[0] == (
        "claude started: model claude-sonnet-4-5-20250929, session 7d1c2b9e-4a55-4a51-9d1e-2f7b0c8e6a10, "
        "permissions bypassPermissions"
    )
    assert system[-1] == "claude finished: success, 7 turns, $0.0421"
    assert output.of("stdout") == [] and output.of("stderr") == []
    assert not any("greet should use clean()" in line for _, line in output.lines)  # thinking stays private


async def test_it_runs_print_mode_with_stream_json_and_the_prompt_on_stdin(tmp_path):
    program = fake_claude(tmp_path, "success.jsonl")

    await run(ClaudeAgent(str(program)), tmp_path, Output(), prompt="Add greet().\nThen test it.")

    call = last_call(program)
    assert call["argv"] == ["-p", "--output-format", "stream-json", "--verbose", "--dangerously-skip-permissions"]
    assert call["stdin"] == "Add greet().\nThen test it."
    assert call["cwd"] == str((tmp_path / "work").resolve())
    assert call["task"] == TASK.id
    assert call["path"]  # the daemon's environment is kept under the task's variables


async def test_permissions_can_be_left_to_extra_arguments(tmp_path):
    program = fake_claude(tmp_path, "success.jsonl")
    agent = ClaudeAgent(str(program), skip_permissions=False, extra_args=["--permission-mode", "acceptEdits"])

    await run(agent, tmp_path, Output())

    assert last_call(program)["argv"][-2:] == ["--permission-mode", "acceptEdits"]
    assert "--dangerously-skip-permissions" not in last_call(program)["argv"]


async def test_an_error_result_fails_the_task_with_its_message(tmp_path):
    program = fake_claude(tmp_path, "error.jsonl", exit_code=1)
    output = Output()

    result = await run(ClaudeAgent(str(program)), tmp_path, output)

    assert result.status == "failed"
    assert result.exit_code == 1
    assert "Invalid API key · Please run /login" in result.error
    assert "claude exited with status 1" in result.error
    assert result.cost_usd == 0.0
    assert output.of("assistant") == ["Invalid API key · Please run /login"]


async def test_a_max_turns_result_of_an_older_claude_fails_and_still_reports_its_cost(tmp_path):
    program = fake_claude(tmp_path, "max_turns_old.jsonl")
    output = Output()

    result = await run(ClaudeAgent(str(program)), tmp_path, output)

    assert result.status == "failed"
    assert result.exit_code == 0
    assert result.error == "claude: error_max_turns"
    assert result.cost_usd == pytest.approx(0.0187)  # "cost_usd" before it became "total_cost_usd"
    assert output.costs == [pytest.approx(0.0187)]
    assert output.of("tool")[-1] == "error: E ModuleNotFoundError: No module named 'greeter.greet' 1 error in 0.05s"


async def test_malformed_and_unknown_lines_pass_through_as_stdout_and_the_run_goes_on(tmp_path):
    program = fake_claude(tmp_path, "malformed.jsonl")
    output = Output()

    result = await run(ClaudeAgent(str(program)), tmp_path, output)

    assert result.status == "done"
    assert result.summary == "Still here."
    assert result.cost_usd == pytest.approx(0.0031)
    stdout = output.of("stdout")
    assert stdout[0] == "(node:4242) Warning: a plain line in the middle of the stream"
    assert stdout[1].startswith('{"type":"assistant","message":{"id":"msg_03A"')
    assert stdout[2] == '{"type":"telemetry","event":"something new"}'
    assert stdout[3] == "[1, 2, 3]"
    assert output.of("assistant") == ["Still here."]
    assert any(line.startswith("compact_boundary ") for line in output.of("system"))


async def test_a_process_that_dies_without_a_result_fails_with_its_stderr(tmp_path):
    program = fake_claude(tmp_path, "no_result.jsonl", stderr="Error: socket hang up\n", exit_code=1)
    output = Output()

    result = await run(ClaudeAgent(str(program)), tmp_path, output)

    assert result.status == "failed"
    assert result.exit_code == 1
    assert result.error == "claude exited with status 1 without a result:\nError: socket hang up"
    assert result.cost_usd is None
    assert output.costs == []
    assert output.of("assistant") == ["Running the test suite."]
    assert output.of("tool") == ['Bash {"command":"python -m pytest -q"}']
    assert output.of("stderr") == ["Error: socket hang up"]


async def test_a_clean_exit_without_a_result_is_still_a_failure(tmp_path):
    program = fake_claude(tmp_path, "no_result.jsonl")

    result = await run(ClaudeAgent(str(program)), tmp_path, Output())

    assert result.status == "failed"
    assert result.error == "claude exited with status 0 without a result"


async def test_a_missing_claude_binary_fails_the_task(tmp_path):
    result = await run(ClaudeAgent(str(tmp_path / "nowhere" / "claude")), tmp_path, Output())

    assert result.status == "failed"
    assert result.error.startswith("cannot start ")


async def test_cancelling_a_run_interrupts_claude(tmp_path):
    program = fake_claude(tmp_path, "no_result.jsonl", sleep=30)
    output = Output()
    task = asyncio.create_task(run(ClaudeAgent(str(program), grace_s=1), tmp_path, output))
    for _ in range(500):
        if output.of("assistant"):
            break
        await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_claude_takes_no_follow_up_messages_in_print_mode():
    assert ClaudeAgent("claude").send(TASK.id, "and also…") is False


def test_make_agents_builds_claude_with_the_given_binary(tmp_path):
    agents = make_agents(["claude"], script=None, claude_bin=f"{tmp_path}/claude --model opus")

    assert set(agents) == {"claude"}
    assert agents["claude"].command()[:3] == [f"{tmp_path}/claude", "--model", "opus"]


def test_fixtures_are_what_claude_writes_one_event_per_line():
    for fixture in FIXTURES.glob("*.jsonl"):
        if fixture.name == "malformed.jsonl":
            continue
        for line in fixture.read_text().splitlines():
            assert isinstance(json.loads(line), dict), fixture.name
    assert os.path.getsize(FIXTURES / "success.jsonl") > 0
