"""Verifier commands: real subprocesses in temporary directories (no database)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from makima.worker.verifiers import TAIL_CHARS, detect, run_verifiers, verifier_name

KEYS = {"name", "command", "passed", "exit_code", "duration_s", "output_tail"}


@pytest.fixture
def env() -> dict[str, str]:
    """``python`` on PATH is this test run's interpreter (it has pytest); its plugins stay out (speed)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {"PATH": path, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


@pytest.fixture
def package(tmp_path) -> Path:
    """A small python package with one passing test."""
    (tmp_path / "greeter").mkdir()
    (tmp_path / "greeter" / "__init__.py").write_text("def greet(name):\n    return f'hello {name}'\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_greet.py").write_text(
        "from greeter import greet\n\n\ndef test_greet():\n    assert greet('x') == 'hello x'\n"
    )
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\npythonpath = ['.']\n")
    return tmp_path


def test_a_passing_command_passes(package, env):
    (result,) = run_verifiers(["python -m pytest -q"], package, env=env)
    assert set(result) == KEYS
    assert result["name"] == "pytest"
    assert result["command"] == "python -m pytest -q"
    assert result["passed"] is True
    assert result["exit_code"] == 0
    assert "1 passed" in result["output_tail"]
    assert 0 < result["duration_s"] < 30


def test_a_failing_command_fails_with_its_exit_status(tmp_path):
    results = run_verifiers(["echo broken >&2; exit 3", "true"], tmp_path)
    assert [(r["name"], r["passed"], r["exit_code"]) for r in results] == [("echo", False, 3), ("true", True, 0)]
    assert results[0]["output_tail"] == "broken\n"


def test_a_failing_pytest_run_fails(package, env):
    (package / "tests" / "test_greet.py").write_text("def test_nope():\n    assert 1 == 2\n")
    (result,) = run_verifiers("auto", package, env=env)
    assert result["name"] == "pytest" and result["passed"] is False and result["exit_code"] == 1
    assert "1 failed" in result["output_tail"]


def test_a_command_over_its_time_limit_is_killed_with_everything_it_started(tmp_path):
    started = time.monotonic()
    (result,) = run_verifiers(["echo before; sleep 30 & sleep 30"], tmp_path, timeout_s=1)
    assert time.monotonic() - started < 5
    assert result["passed"] is False
    assert result["exit_code"] is None
    assert result["output_tail"].startswith("before\n")
    assert "time limit of 1 s" in result["output_tail"]


def test_a_cancelled_run_kills_the_running_command_and_skips_the_rest(tmp_path):
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    results = run_verifiers(["sleep 30", "true"], tmp_path, timeout_s=60, cancel=cancel)
    assert time.monotonic() - started < 5
    assert [(r["passed"], r["exit_code"]) for r in results] == [(False, None)]
    assert "interrupted" in results[0]["output_tail"]


def test_leftovers_of_a_finished_command_do_not_hold_it_up(tmp_path):
    started = time.monotonic()
    (result,) = run_verifiers(["(sleep 30 &); echo done"], tmp_path, timeout_s=20)
    assert time.monotonic() - started < 5
    assert result["passed"] is True and result["output_tail"] == "done\n"


def test_huge_and_binary_output_keeps_only_a_readable_tail(tmp_path):
    command = "head -c 3000000 /dev/urandom; printf '\\000\\377 end'"
    (result,) = run_verifiers([command], tmp_path)
    tail = result["output_tail"]
    assert result["passed"] is True
    assert len(tail) <= TAIL_CHARS
    assert tail.startswith("…") and tail.endswith("\ufffd\ufffd end")
    assert "\x00" not in tail
    json.dumps(result)  # fits in a report


def test_the_environment_is_laid_over_the_daemons(tmp_path):
    (result,) = run_verifiers(['test "$FOO" = bar && test -n "$PATH"'], tmp_path, env={"FOO": "bar"})
    assert result["passed"] is True


def test_a_verifier_that_cannot_start_is_a_failure_not_a_crash(tmp_path):
    (result,) = run_verifiers(["true"], tmp_path / "missing")
    assert result["passed"] is False and result["exit_code"] is None
    assert "could not start" in result["output_tail"]


def test_no_commands_means_no_results(tmp_path):
    assert run_verifiers([], tmp_path) == []
    assert run_verifiers(None, tmp_path) == []
    assert run_verifiers(["", "  "], tmp_path) == []
    assert run_verifiers("auto", tmp_path) == []


@pytest.mark.parametrize(
    ("command", "name"),
    [
        ("pytest -q", "pytest"),
        ("python -m pytest -q", "pytest"),
        (".venv/bin/python3 -m pytest", "pytest"),
        ("npm test", "npm"),
        ("go test ./...", "go"),
        ("./scripts/check.sh --all", "check.sh"),
        ("CI=1 make test", "make"),
        ("echo 'unbalanced", "echo"),
    ],
)
def test_verifiers_are_named_after_their_command(command, name):
    assert verifier_name(command) == name


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"pytest.ini": "[pytest]\n"}, ["python -m pytest -q"]),
        ({"pyproject.toml": "[tool.pytest.ini_options]\n"}, ["python -m pytest -q"]),
        ({"setup.cfg": "[tool:pytest]\n"}, ["python -m pytest -q"]),
        ({"tox.ini": "[testenv]\ncommands = pytest\n"}, ["python -m pytest -q"]),
        ({"tests/unit/test_x.py": ""}, ["python -m pytest -q"]),
        ({"pyproject.toml": "[project]\nname = 'x'\n"}, []),
        ({"package.json": json.dumps({"scripts": {"test": "jest"}})}, ["npm test"]),
        ({"package.json": json.dumps({"scripts": {"test": 'echo "Error: no test specified" && exit 1'}})}, []),
        ({"package.json": json.dumps({"scripts": {"build": "tsc"}})}, []),
        ({"package.json": "{not json"}, []),
        ({"Cargo.toml": "[package]\n"}, ["cargo test"]),
        ({"go.mod": "module x\n"}, ["go test ./..."]),
        ({"Makefile": "all: build\n\ntest: all\n\tpytest\n"}, ["make test"]),
        ({"Makefile": "test := 1\nall:\n\techo $(test)\n"}, []),
        ({"Makefile": ".PHONY: test\n"}, []),
        ({"go.mod": "module x\n", "Makefile": "lint test:\n\tgo vet\n"}, ["go test ./...", "make test"]),
        ({"README.md": "pytest"}, []),
    ],
)
def test_it_detects_test_commands_by_file_markers(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert detect(tmp_path) == expected


def test_auto_runs_the_detected_commands(package, env):
    (result,) = run_verifiers("auto", package, env=env)
    assert result["command"] == "python -m pytest -q" and result["passed"] is True
    assert run_verifiers(["auto", "true"], package, env=env)[1]["name"] == "true"
