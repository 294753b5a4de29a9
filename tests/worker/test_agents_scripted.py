"""The scripted agent: its script, its worktree actions and its CLI calls.

The ``makima`` CLI is replaced by a recorder (``MAKIMA_CLI``, the documented
test hook); the real CLI is exercised by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from makima.worker.agents import ScriptedAgent
from makima.worker.base import AgentResult, TaskSpec
from makima.worker.scripted_main import infer_kind

RECORDER = Path(__file__).parent / "fixtures" / "makima_recorder.py"
DIRECTIVE = {
    "id": "d-1",
    "title": "Greet",
    "status": "active",
    "steps": [
        {"id": "s-a", "name": "A", "status": "passed", "rework_count": 0},
        {"id": "s-b", "name": "B", "status": "running", "rework_count": 1},
    ],
}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.work = tmp_path / "work"
        self.work.mkdir()
        git("init", "-q", "-b", "main", cwd=self.work)
        (self.work / "README.md").write_text("# demo\n")
        git("add", "-A", cwd=self.work)
        git("commit", "-qm", "init", cwd=self.work)
        self.log = tmp_path / "calls.jsonl"
        self.show = tmp_path / "show.json"
        self.directive(DIRECTIVE)
        self.lines: list[tuple[str, str]] = []

    def directive(self, data: dict[str, Any]) -> None:
        self.show.write_text(json.dumps(data))

    def script(self, data: Any, name: str = ".makima/script.yaml") -> Path:
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
        return path

    def env(self, step_id: str | None, **extra: str) -> dict[str, str]:
        env = {
            "MAKIMA_CLI": f"{sys.executable} {RECORDER}",
            "RECORDER_LOG": str(self.log),
            "RECORDER_SHOW": str(self.show),
            "MAKIMA_URL": "http://makima.invalid",
            "MAKIMA_API_KEY": "task-token",
            "MAKIMA_DIRECTIVE_ID": "d-1",
            "MAKIMA_CONTRACT_ID": "c-1",
            **extra,
        }
        if step_id:
            env["MAKIMA_STEP_ID"] = step_id
        return env

    async def run(
        self,
        kind: str = "execution",
        *,
        step_id: str | None = "s-b",
        prompt: str = "Do the step.",
        agent: ScriptedAgent | None = None,
        **env: str,
    ) -> AgentResult:
        task = TaskSpec(id="t-1", name=f"{kind} task", kind=kind, agent="scripted", plan=prompt)
        return await (agent or ScriptedAgent()).run(
            task=task,
            prompt=prompt,
            cwd=self.work,
            env=self.env(step_id, **env),
            emit=lambda stream, line: self.lines.append((stream, line)),
            progress=lambda cost: None,
        )

    def calls(self) -> list[list[str]]:
        return [c["argv"] for c in self.records()]

    def records(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stdin_of(self, *argv: str) -> str:
        [record] = [c for c in self.records() if c["argv"] == list(argv)]
        return record["stdin"]

    def stdout(self) -> list[str]:
        return [line for stream, line in self.lines if stream == "stdout"]


SHOW = ["--json", "directive", "show"]
COMPLETE = ["supervisor", "complete"]


@pytest.fixture
def h(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


# --- execution ---------------------------------------------------------------------


async def test_an_execution_task_does_the_entry_of_its_steps_attempt_and_completes(h):
    h.script(
        {
            "steps": {
                "B": {
                    "attempts": [
                        {"write": {"pkg/b.py": "def b():\n    return 0\n"}},
                        {
                            "write": {"pkg/b.py": "def b():\n    return 1\n"},
                            "run": [
                                "echo $MAKIMA_STEP_NAME $MAKIMA_ATTEMPT > seen.txt",
                                "echo ran",
                                "cd pkg && python -c 'import b'",
                            ],
                        },
                    ]
                },
                "*": {"write": {"OTHER.md": "other\n"}},
            }
        }
    )

    result = await h.run()

    assert result.status == "done", result.error
    assert (h.work / "pkg/b.py").read_text() == "def b():\n    return 1\n"  # rework_count 1: attempt 2
    assert (h.work / "seen.txt").read_text() == "B 2\n"
    assert not (h.work / "OTHER.md").exists()
    assert h.calls() == [SHOW, COMPLETE]
    out = h.stdout()
    assert "step B, attempt 2" in out
    assert "write pkg/b.py (22 bytes)" in out
    assert "$ echo ran" in out and "ran" in out  # commands' output is streamed
    assert out[-1] == "scripted agent: step B done"
    assert git("log", "-1", "--format=%s", cwd=h.work) == "B: attempt 2 (scripted agent)"
    assert git("status", "--porcelain", cwd=h.work) == ""
    assert "__pycache__" not in git("ls-files", cwd=h.work)
    assert result.summary.endswith("scripted agent: step B done")


async def test_other_steps_use_the_star_entry_and_the_last_attempt_repeats(h):
    h.directive({**DIRECTIVE, "steps": [{"id": "s-c", "name": "C", "rework_count": 3}]})
    h.script({"steps": {"B": {"write": {"B.md": "b"}}, "*": [{"write": {"x.md": "1"}}, {"write": {"x.md": "2"}}]}})

    result = await h.run(step_id="s-c")

    assert result.status == "done", result.error
    assert (h.work / "x.md").read_text() == "2"


async def test_directive_show_may_wrap_the_directive_and_its_steps(h):
    h.directive({"directive": {"id": "d-1", "title": "Greet"}, "steps": DIRECTIVE["steps"]})
    h.script({"steps": {"B": {"write": {"b.md": "b"}}}})

    result = await h.run()

    assert result.status == "done", result.error
    assert (h.work / "b.md").exists()


async def test_succeed_false_fails_the_task_with_the_scripts_error_and_does_not_complete(h):
    h.script({"steps": {"B": {"write": {"half.py": "x = 1\n"}, "succeed": False, "error": "tests still fail"}}})

    result = await h.run()

    assert result.status == "failed"
    assert result.exit_code == 1
    assert result.error.endswith("scripted agent: tests still fail")
    assert (h.work / "half.py").exists()  # the work so far stays for the next attempt
    assert COMPLETE not in h.calls()
    assert ("stderr", "scripted agent: tests still fail") in h.lines


@pytest.mark.parametrize(
    "path",
    ["../evil.txt", "/tmp/makima-evil.txt", "pkg/../../evil.txt", ".git/hooks/pre-commit", "", "a\\..\\..\\evil"],
)
async def test_writes_outside_the_worktree_are_refused(h, path):
    h.script({"steps": {"*": {"write": {"fine.txt": "ok", path: "evil"}}}})

    result = await h.run()

    assert result.status == "failed"
    assert "path" in result.error and ("refusing" in result.error or "bad path" in result.error)
    assert not (h.tmp / "evil.txt").exists()
    assert not Path("/tmp/makima-evil.txt").exists()
    assert not (h.work / "fine.txt").exists()  # every path is checked before anything is written
    assert COMPLETE not in h.calls()


async def test_a_symlink_out_of_the_worktree_is_refused(h):
    outside = h.tmp / "outside"
    outside.mkdir()
    (h.work / "link").symlink_to(outside)
    h.script({"steps": {"*": {"write": {"link/x.txt": "evil"}}}})

    result = await h.run()

    assert result.status == "failed"
    assert "resolves outside the worktree" in result.error
    assert not (outside / "x.txt").exists()


async def test_a_failing_command_fails_the_task(h):
    h.script({"steps": {"*": {"run": ["echo before", "exit 3", "echo never"]}}})

    result = await h.run()

    assert result.status == "failed"
    assert "command failed with status 3: exit 3" in result.error
    assert "never" not in h.stdout()


async def test_delete_and_commit_change_the_worktree_for_real(h):
    h.script(
        {"steps": {"*": {"delete": ["README.md", "absent.md"], "write": {"NEW.md": "new\n"}, "commit": "B: swap"}}}
    )
    git("add", "-A", cwd=h.work)
    git("commit", "-qm", "the script", cwd=h.work)  # as in a repository that carries its script

    result = await h.run()

    assert result.status == "done", result.error
    assert git("log", "-1", "--format=%s", cwd=h.work) == "B: swap"
    assert git("show", "--name-status", "--format=", "HEAD", cwd=h.work).split("\n") == ["A\tNEW.md", "D\tREADME.md"]
    assert git("status", "--porcelain", cwd=h.work) == ""


async def test_commit_false_leaves_the_changes_to_the_daemon(h):
    h.script({"steps": {"*": {"write": {"NEW.md": "new\n"}, "commit": False}}})

    result = await h.run()

    assert result.status == "done", result.error
    assert git("log", "--format=%s", cwd=h.work) == "init"
    assert "?? NEW.md" in git("status", "--porcelain", cwd=h.work).splitlines()


async def test_cancelling_a_sleeping_scripted_agent_stops_it(h):
    h.script({"steps": {"*": {"sleep": 30}}})
    task = asyncio.create_task(h.run(agent=ScriptedAgent(grace_s=1)))
    for _ in range(1000):
        if "sleep 30 s" in h.stdout():
            break
        await asyncio.sleep(0.01)
    assert "sleep 30 s" in h.stdout()

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=10)
    assert COMPLETE not in h.calls()


async def test_without_a_script_an_execution_task_just_completes(h):
    result = await h.run()

    assert result.status == "done", result.error
    assert h.calls() == [COMPLETE]
    assert git("log", "--format=%s", cwd=h.work) == "init"
    assert "script: none (built-in defaults)" in h.stdout()


async def test_the_daemons_script_option_wins_over_the_worktrees_script(h, tmp_path):
    h.script({"steps": {"*": {"write": {"from-worktree.md": "w"}}}})
    option = tmp_path / "option.json"
    option.write_text(json.dumps({"steps": {"*": {"write": {"from-option.md": "o"}}}}))

    result = await h.run(agent=ScriptedAgent(option))

    assert result.status == "done", result.error
    assert (h.work / "from-option.md").exists() and not (h.work / "from-worktree.md").exists()


async def test_a_json_script_in_the_worktree_is_found(h):
    h.script({"steps": {"*": {"write": {"j.md": "j"}}}}, name=".makima/script.json")

    result = await h.run()

    assert result.status == "done", result.error
    assert (h.work / "j.md").exists()


async def test_a_mistyped_key_fails_with_a_clear_error(h):
    h.script({"steps": {"B": {"wirte": {"b.py": ""}}}})

    result = await h.run()

    assert result.status == "failed"
    assert "steps.B: unknown key(s) wirte" in result.error


async def test_an_unreadable_script_fails_with_a_clear_error(h):
    (h.work / ".makima").mkdir()
    (h.work / ".makima/script.yaml").write_text("steps: [unclosed\n")

    result = await h.run()

    assert result.status == "failed"
    assert "is not valid YAML" in result.error


async def test_a_step_that_is_not_in_the_directive_fails_the_task(h):
    h.script({"steps": {"*": {}}})

    result = await h.run(step_id="s-zzz")

    assert result.status == "failed"
    assert "step s-zzz is not among the directive's steps" in result.error


async def test_a_cli_failure_fails_the_task_with_the_clis_message(h):
    result = await h.run(RECORDER_FAIL="supervisor")

    assert result.status == "failed"
    assert "`makima supervisor complete` failed with status 2: makima: supervisor refused (recorder)" in result.error


async def test_an_execution_task_merges_the_branches_its_prompt_asks_for(h):
    git("checkout", "-qb", "makima/a-1", cwd=h.work)
    (h.work / "a.md").write_text("a\n")
    git("add", "a.md", cwd=h.work)
    git("commit", "-qm", "a", cwd=h.work)
    git("checkout", "-q", "main", cwd=h.work)
    prompt = (
        "## Before you start\nmerge these first:\n"
        "    git merge --no-edit makima/a-1\n    git merge --no-edit makima/gone-2\n\n# Directive: x\n"
    )

    result = await h.run(prompt=prompt)

    assert result.status == "done", result.error
    assert (h.work / "a.md").read_text() == "a\n"
    assert "merge makima/a-1: merged" in h.stdout()
    assert "merge makima/gone-2: no such branch here, skipped" in h.stdout()


# --- planning -----------------------------------------------------------------------

PLAN = {
    "steps": [
        {"name": "A", "description": "the base", "verifiers": ["python -m pytest -q"]},
        {"name": "B", "description": "on top", "task_plan": "build B", "depends_on": ["A"], "order_index": 1},
    ]
}


async def test_a_planning_task_submits_its_plan_as_a_batch_and_completes(h):
    h.directive({**DIRECTIVE, "steps": []})
    h.script({"planning": PLAN})

    result = await h.run("planning", step_id=None)

    assert result.status == "done", result.error
    calls = h.calls()
    assert calls[0] == SHOW and calls[-1] == COMPLETE
    assert calls[1][:3] == ["directive", "batch-add-steps", "--json"]
    assert json.loads(calls[1][3]) == [
        {
            "name": "A",
            "description": "the base",
            "verifiers": ["python -m pytest -q"],
            "task_plan": "the base",
            "depends_on": [],
        },
        {"name": "B", "description": "on top", "task_plan": "build B", "depends_on": ["A"], "order_index": 1},
    ]


async def test_a_plan_can_be_submitted_as_the_chain_plan_file(h):
    h.directive({**DIRECTIVE, "steps": []})
    h.script({"planning": {**PLAN, "via": "file"}})

    result = await h.run("planning", step_id=None)

    assert result.status == "done", result.error
    plan = json.loads(h.stdin_of("contract", "create-file", "chain-plan"))
    assert [s["name"] for s in plan["steps"]] == ["A", "B"]
    assert plan["steps"][1]["depends_on"] == ["A"]
    assert h.calls()[-1] == COMPLETE


async def test_a_raw_plan_is_written_as_given(h):
    h.directive({**DIRECTIVE, "steps": []})
    raw = 'Here is my plan:\n```json\n{"steps": [{"name": "A", "depends_on": ["A"]}]}\n```\n'
    h.script({"planning": {"via": "file", "raw": raw}})

    result = await h.run("planning", step_id=None)

    assert result.status == "done", result.error
    assert h.stdin_of("contract", "create-file", "chain-plan") == raw


async def test_replanning_removes_and_adds_steps_and_skips_the_ones_that_exist(h):
    h.script(
        {
            "planning": PLAN,
            "replanning": {"remove": ["B", "Nope"], "steps": [PLAN["steps"][0], {"name": "C", "depends_on": ["A"]}]},
        }
    )

    result = await h.run("planning", step_id=None)

    assert result.status == "done", result.error
    calls = h.calls()
    assert calls[1] == ["directive", "remove-step", "s-b"]
    assert [s["name"] for s in json.loads(calls[2][3])] == ["C"]
    assert "remove Nope: no such step" in h.stdout() and "step A exists already" in h.stdout()


async def test_a_planning_task_without_a_plan_fails_clearly(h):
    h.script({"steps": {"*": {}}})

    result = await h.run("planning", step_id=None)

    assert result.status == "failed"
    assert "the script has no `planning` section" in result.error
    assert h.calls() == []


async def test_the_kind_comes_from_the_prompt_when_nothing_else_says(h):
    assert infer_kind("You are the planner of a makima directive.") == "planning"
    assert infer_kind("You are the evaluator of one step") == "monitoring"
    assert infer_kind("You are finishing a makima directive") == "completion"
    assert infer_kind("A makima directive's completion task finished without recording a pull") == "verification"
    assert infer_kind("You are a coding agent working on one step") == "execution"


# --- monitoring ------------------------------------------------------------------


async def test_a_monitoring_task_writes_the_evaluation_of_its_steps_attempt(h):
    h.script(
        {
            "evaluations": {
                "B": [
                    {"passed": True, "overallScore": 0.9},
                    {"passed": False, "overallScore": 0.3, "reworkInstructions": "fix b()", "say": "judging"},
                ],
                "*": {"passed": True, "overallScore": 0.95, "confidenceLevel": "green"},
            }
        }
    )

    result = await h.run("monitoring")

    assert result.status == "done", result.error
    assert json.loads(h.stdin_of("contract", "create-file", "evaluation-result")) == {
        "passed": False,
        "overallScore": 0.3,
        "confidenceLevel": "red",
        "criteriaResults": [],
        "summaryFeedback": "",
        "reworkInstructions": "fix b()",
    }
    assert "judging" in h.stdout()
    assert h.calls()[-1] == COMPLETE


async def test_without_an_evaluation_the_step_passes(h):
    result = await h.run("monitoring")

    assert result.status == "done", result.error
    verdict = json.loads(h.stdin_of("contract", "create-file", "evaluation-result"))
    assert (verdict["passed"], verdict["overallScore"], verdict["confidenceLevel"]) == (True, 1.0, "green")
    assert h.calls()[0] != SHOW  # nothing to look up


async def test_an_evaluation_can_be_raw_text(h):
    h.script({"evaluations": {"*": {"raw": "looks fine to me"}}})

    result = await h.run("monitoring")

    assert result.status == "done", result.error
    assert h.stdin_of("contract", "create-file", "evaluation-result") == "looks fine to me"


# --- completion and verification ---------------------------------------------------


async def test_a_completion_task_merges_and_records_the_pull_request(h):
    git("checkout", "-qb", "makima/b-1", cwd=h.work)
    (h.work / "b.md").write_text("b\n")
    git("add", "b.md", cwd=h.work)
    git("commit", "-qm", "b", cwd=h.work)
    git("checkout", "-qb", "makima/directive-x", "main", cwd=h.work)
    h.script({"completion": {"pr_url": "https://github.com/o/r/pull/7"}})

    result = await h.run(
        "completion", step_id=None, prompt="## Branches to merge, in order\n    git merge --no-edit makima/b-1\n"
    )

    assert result.status == "done", result.error
    assert (h.work / "b.md").exists()
    assert h.calls() == [["directive", "update", "--pr-url", "https://github.com/o/r/pull/7"], COMPLETE]


async def test_a_completion_conflict_fails_the_task_and_leaves_no_merge_behind(h):
    git("checkout", "-qb", "makima/b-1", cwd=h.work)
    (h.work / "README.md").write_text("theirs\n")
    git("commit", "-qam", "b", cwd=h.work)
    git("checkout", "-q", "main", cwd=h.work)
    (h.work / "README.md").write_text("ours\n")
    git("commit", "-qam", "ours", cwd=h.work)

    result = await h.run("completion", step_id=None, prompt="    git merge --no-edit makima/b-1\n")

    assert result.status == "failed"
    assert "merging makima/b-1 failed" in result.error
    assert (h.work / "README.md").read_text() == "ours\n"
    assert COMPLETE not in h.calls()


async def test_a_verification_task_records_the_pr_and_marks_the_directive_completed(h):
    h.script({"verification": {"pr_url": "https://github.com/o/r/pull/8"}})

    result = await h.run("verification", step_id=None)

    assert result.status == "done", result.error
    assert h.calls() == [
        ["directive", "update", "--pr-url", "https://github.com/o/r/pull/8"],
        ["directive", "update", "--status", "completed"],
        COMPLETE,
    ]


async def test_without_a_script_a_verification_task_just_marks_the_directive_completed(h):
    result = await h.run("verification", step_id=None)

    assert result.status == "done", result.error
    assert h.calls() == [["directive", "update", "--status", "completed"], COMPLETE]


# --- the documentation ----------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "scripted-agent.md"


def doc_example() -> dict[str, Any]:
    text = DOC.read_text()
    block = text.split("## Example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)


async def test_the_documented_example_plans_and_runs_its_first_step(h):
    h.directive({**DIRECTIVE, "steps": []})
    h.script(doc_example())

    assert (await h.run("planning", step_id=None)).status == "done"
    batch = [c for c in h.calls() if c[:2] == ["directive", "batch-add-steps"]]
    assert [s["name"] for s in json.loads(batch[0][3])] == ["Names", "Greet"]

    h.directive({**DIRECTIVE, "steps": [{"id": "s-n", "name": "Names", "rework_count": 0}]})
    result = await h.run(step_id="s-n")
    assert result.status == "done", result.error
    assert "return name.strip()" in (h.work / "greeter/names.py").read_text()


def test_it_runs_by_hand_with_step_and_attempt_given(h, tmp_path):
    script = tmp_path / "script.yaml"
    script.write_text(yaml.safe_dump(doc_example()))

    program = [sys.executable, "-m", "makima.worker.scripted_main", "--script", str(script)]
    done = subprocess.run(
        [*program, "--kind", "execution", "--step", "Greet", "--attempt", "2"],
        cwd=h.work,
        env={"PATH": os.environ["PATH"], "MAKIMA_CLI": "true"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )

    assert done.returncode == 0, done.stderr
    assert "Hello, {name}!" in (h.work / "greeter/greet.py").read_text()
    assert git("log", "-1", "--format=%s", cwd=h.work) == "Greet: say hello properly"
