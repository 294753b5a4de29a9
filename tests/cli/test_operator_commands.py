"""Operator-facing commands: ``directive create``, ``directive watch`` and ``daemon run``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import makima.worker
from directives.models import Directive, Step
from directives.services import directive_stop, directive_transition, step_transition
from makima import cli
from makima.state import SYSTEM
from tests.cli.conftest import run_makima
from tests.factories import make_directive, make_steps

# --------------------------------------------------------------------------- directive create

SPEC = {
    "title": "Greeter",
    "goal": "Greet people by name.",
    "acceptance_criteria": ["greet('Ada') returns 'Hello, Ada'"],
    "repository_url": "/srv/repos/greeter.git",
    "base_branch": "main",
    "agent": "scripted",
    "evaluation_mode": "verifiers",
}


def write_spec(tmp_path: Path, **extra) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**SPEC, **extra}))
    return str(path)


@pytest.mark.django_db(transaction=True)
def test_create_makes_a_draft_directive_and_prints_its_id(operator, alice, tmp_path):
    out = operator.ok("directive", "create", "--file", write_spec(tmp_path))
    directive = Directive.objects.get(owner=alice, title="Greeter")
    assert out.strip() == str(directive.pk)
    assert (directive.status, directive.agent, directive.evaluation_mode) == ("draft", "scripted", "verifiers")
    assert directive.base_branch == "main"


@pytest.mark.django_db(transaction=True)
def test_create_adds_hand_authored_steps_and_starts_the_directive(operator, alice, tmp_path):
    steps = [{"name": "Names"}, {"name": "Greet", "depends_on": ["Names"], "task_plan": "Write greet.py"}]
    out = operator.ok("--json", "directive", "create", "--file", write_spec(tmp_path, steps=steps), "--start")

    directive = Directive.objects.get(owner=alice, title="Greeter")
    shown = json.loads(out)
    assert shown["id"] == str(directive.pk)
    assert shown["status"] == directive.status == "active"
    assert shown["step_counts"]["total"] == 2
    greet = Step.objects.get(directive=directive, name="Greet")
    assert [link.depends_on.name for link in greet.dependency_links.all()] == ["Names"]


@pytest.mark.django_db(transaction=True)
def test_create_says_which_directive_was_left_behind_when_its_steps_are_refused(operator, alice, tmp_path):
    result = operator.run(
        "directive", "create", "--file", write_spec(tmp_path, steps=[{"name": "A", "depends_on": ["Z"]}])
    )
    directive = Directive.objects.get(owner=alice, title="Greeter")
    assert result.returncode == 1
    assert f"directive {directive.pk} was created (draft) but the next request failed" in result.stderr
    assert "  steps: step 'A': unknown dependency 'Z'" in result.stderr


# --------------------------------------------------------------------------- directive watch


PATH = ("pending", "ready", "running", "evaluating", "passed")


def walk(step: Step, to: str) -> None:
    """Take a step along the usual path up to ``to``."""
    for status in PATH[PATH.index(step.status) + 1 : PATH.index(to) + 1]:
        step_transition(step=step, to=status)


def finish(directive: Directive) -> None:
    """Every step passes and the directive completes, as the orchestrator would do it."""
    for step in Step.objects.filter(directive=directive):
        walk(step, "passed")
    directive_transition(directive=directive, to=Directive.Status.COMPLETING)
    directive_transition(directive=directive, to=Directive.Status.COMPLETED)


@pytest.fixture
def running(alice) -> Directive:
    """An active directive: Names passed, Greet running, Document pending."""
    directive = make_directive(alice)
    names, greet, _ = make_steps(
        directive, {"name": "Names"}, {"name": "Greet", "depends_on": ["Names"]}, {"name": "Document"}
    )
    directive_transition(directive=directive, to=Directive.Status.ACTIVE)
    walk(names, "passed")
    walk(greet, "running")
    return directive


@pytest.mark.django_db(transaction=True)
def test_watch_follows_a_directive_until_it_completes(operator, running):
    watch = subprocess.Popen(
        [sys.executable, "-m", "makima.cli", "directive", "watch", str(running.pk), "--interval", "0.1"],
        env=operator.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = []
        for line in watch.stdout:  # until the first round is printed
            seen.append(line)
            if line.startswith("progress:"):
                break
        finish(running)
        out, err = watch.communicate(timeout=20)
    finally:
        watch.kill()

    assert watch.returncode == 0, err
    lines = [line.rstrip("\n") for line in seen] + out.splitlines()
    assert "progress: active · 1/3 steps passed · 1 pending, 1 running, 1 passed" in lines
    assert any("step_running  Greet  (ready → running)" in line for line in lines)
    assert any("step_passed  Document  (evaluating → passed)" in line for line in lines)
    assert "progress: completed · 3/3 steps passed · 3 passed" in lines
    assert lines[-1] == f"directive {running.pk} is completed"


@pytest.mark.django_db(transaction=True)
def test_watch_exits_1_when_the_directive_fails(operator, running):
    directive_stop(directive=running, actor=SYSTEM, reason="Operator gave up.")
    result = operator.run("directive", "watch", str(running.pk), "--interval", "0.1")
    assert result.returncode == 1
    assert "WARN  directive_failed  (active → failed)  — Operator gave up." in result.stdout
    assert result.stdout.splitlines()[-1] == f"directive {running.pk} is failed"


@pytest.mark.django_db(transaction=True)
def test_watch_prints_one_json_object_per_line(operator, running):
    finish(running)
    out = operator.ok("directive", "watch", str(running.pk), "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert {line["type"] for line in lines} == {"event", "progress", "end"}
    events = [line["event"]["event_type"] for line in lines if line["type"] == "event"]
    assert events[0] == "directive_created"
    assert events[-1] == "directive_completed"
    assert lines[-2] == {"type": "progress", "status": "completed", "step_counts": lines[-2]["step_counts"]}
    assert lines[-2]["step_counts"]["passed"] == 3
    assert lines[-1] == {"type": "end", "status": "completed", "directive": str(running.pk)}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.django_db(transaction=True)
def test_watch_redraws_its_progress_bars_in_place_on_a_terminal(operator, running, monkeypatch):
    for name, value in operator.env.items():
        monkeypatch.setenv(name, value)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(cli.Watch, "wait", lambda self: finish(running))

    assert cli.main(["directive", "watch", str(running.pk)]) == 0

    first, redrawn = terminal.getvalue().split("\x1b[5F\x1b[J")  # up over the 5-line block, then clear
    assert first.endswith(
        "Add a health endpoint — active — 1/3 steps passed\n"
        "  pending           [##########....................] 1\n"
        "  running           [##########....................] 1\n"
        "  passed            [##########....................] 1\n"
        "  working on: Greet\n"
    )
    assert "step_passed  Greet  (evaluating → passed)" in redrawn
    assert redrawn.endswith(
        "Add a health endpoint — completed — 3/3 steps passed\n"
        "  passed            [##############################] 3\n"
        f"directive {running.pk} is completed\n"
    )


# --------------------------------------------------------------------------- daemon run


@pytest.fixture
def worker(monkeypatch):
    """A stand-in for ``makima.worker.daemon``; ``worker.options`` is what it was given."""
    module = types.ModuleType("makima.worker.daemon")

    def main(options):
        module.options = options
        return 0

    module.main = main
    monkeypatch.setitem(sys.modules, "makima.worker.daemon", module)
    monkeypatch.setattr(makima.worker, "daemon", module, raising=False)
    for name in ("MAKIMA_SERVER", "MAKIMA_DAEMON_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return module


def test_daemon_run_hands_its_options_to_the_worker(worker, tmp_path):
    argv = ["daemon", "run", "--server", "http://makima:8000", "--token", "mkd_secret", "--name", "box-1"]
    argv += ["--agent", "scripted", "--agent", "claude,command", "--max-tasks", "4", "--workdir", str(tmp_path)]
    argv += ["--script", "demo.yaml", "--claude-bin", "/opt/claude", "--heartbeat-s", "1.5", "--log-level", "debug"]
    argv += ["--command-line", "aider --yes"]

    assert cli.main(argv) == 0

    options = worker.options
    assert (options.server, options.token, options.name) == ("http://makima:8000", "mkd_secret", "box-1")
    assert options.agents == ["scripted", "claude", "command"]
    assert (options.max_tasks, options.workdir, options.script) == (4, tmp_path, Path("demo.yaml"))
    assert (options.claude_bin, options.heartbeat_s, options.log_level) == ("/opt/claude", 1.5, "DEBUG")
    assert options.command_line == "aider --yes"


def test_daemon_run_refuses_the_command_agent_without_a_program(worker, capsys, monkeypatch):
    monkeypatch.delenv("MAKIMA_AGENT_COMMAND", raising=False)
    argv = ["daemon", "run", "--server", "http://makima:8000", "--token", "mkd_secret", "--agent", "command"]

    assert cli.main(argv) == 2
    assert "--command-line CMD" in capsys.readouterr().err
    assert not hasattr(worker, "options")


def test_daemon_run_reads_the_server_and_token_from_the_environment(worker, monkeypatch):
    monkeypatch.setenv("MAKIMA_SERVER", "http://makima:8000")
    monkeypatch.setenv("MAKIMA_DAEMON_TOKEN", "mkd_from_env")

    assert cli.main(["daemon", "run"]) == 0

    options = worker.options
    assert (options.server, options.token, options.agents, options.max_tasks) == (
        "http://makima:8000",
        "mkd_from_env",
        ["claude"],
        2,
    )
    assert options.heartbeat_s is None


def test_daemon_run_says_which_setting_is_missing(worker, capsys):
    assert cli.main(["daemon", "run", "--server", "http://makima:8000"]) == 2
    assert capsys.readouterr().err == "makima: MAKIMA_DAEMON_TOKEN is not set: export it or pass --token TOKEN\n"
    assert not hasattr(worker, "options")


def test_daemon_run_refuses_a_bad_number_as_a_usage_error():
    result = run_makima("daemon", "run", "--max-tasks", "many", env={"PATH": ""})
    assert result.returncode == 2
    assert "--max-tasks: invalid int value: 'many'" in result.stderr
