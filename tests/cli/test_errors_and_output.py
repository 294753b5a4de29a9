"""What every command shares: JSON output, and errors that say what to fix."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from directives.models import Step
from tests.cli.conftest import run_makima, worker_env
from tests.factories import make_directive, make_steps

pytestmark = pytest.mark.django_db(transaction=True)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- output


@pytest.mark.parametrize(
    "argv",
    [
        ("--json", "directive", "show"),
        ("directive", "show", "--json"),
    ],
)
def test_json_is_accepted_before_or_after_the_command(agent, argv):
    make_steps(agent.objects["directive"], {"name": "A"}, {"name": "B", "depends_on": ["A"]})
    shown = json.loads(agent.ok(*argv))
    assert shown["directive"]["id"] == str(agent.objects["directive"].pk)
    assert [(s["name"], s["status"], s["rework_count"]) for s in shown["steps"]] == [
        ("A", "pending", 0),
        ("B", "pending", 0),
    ]
    assert shown["steps"][1]["depends_on"] == [shown["steps"][0]["id"]]


def test_every_agent_command_can_answer_in_json(agent):
    directive = agent.objects["directive"]
    (step,) = make_steps(directive, {"name": "Old"})
    outputs = [
        agent.ok("--json", "directive", "add-step", "New", "--description", "d", "--task-plan", "p"),
        agent.ok("--json", "directive", "batch-add-steps", "--json", '[{"name": "Batch"}]'),
        agent.ok("directive", "remove-step", str(step.pk), "--json"),
        agent.ok("directive", "update", "--pr-url", "https://git.example.com/pr/1", "--json"),
        agent.ok("contract", "create-file", "notes.md", "--content", "hi", "--json"),
        agent.ok("contract", "files", "--json"),
        agent.ok("supervisor", "complete", "--json"),
    ]
    added, batch, removed, updated, created, files, task = (json.loads(out) for out in outputs)
    assert added["name"] == "New"
    assert [s["name"] for s in batch] == ["Batch"]
    assert removed == {"id": str(step.pk), "removed": True}
    assert updated["pr_url"] == "https://git.example.com/pr/1"
    assert [f["id"] for f in files] == [created["id"]]
    assert json.loads(agent.ok("contract", "file", created["id"], "--json"))["content"] == "hi"
    assert task["supervisor_completed_at"]


def test_the_command_line_options_override_the_environment(agent, alice):
    other = make_directive(alice, title="Chosen with --directive")
    out = agent.run("directive", "show", "--directive", str(other.pk))
    # The task token may read only its own directive: the option was used.
    assert out.returncode == 1
    assert "not allowed (403)" in out.stderr


# --------------------------------------------------------------------------- errors


def test_bad_input_lists_the_server_field_errors(operator, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"title": "", "goal": "", "agent": "gpt-9"}))
    result = operator.run("directive", "create", "--file", str(spec))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "makima: the server refused the input (400): title: This field may not be blank."
    assert "  title: This field may not be blank." in lines
    assert "  goal: This field may not be blank." in lines
    assert '  agent: "gpt-9" is not a valid choice.' in lines


def test_bad_steps_are_named_in_the_errors(agent):
    (names,) = make_steps(agent.objects["directive"], {"name": "Names"})
    steps = [{"name": "A", "depends_on": ["Z"]}, {"name": "B", "depends_on": [str(names.pk), "Names"]}]
    result = agent.run("directive", "batch-add-steps", "--json", json.dumps(steps))
    assert result.returncode == 1
    assert "  steps: step 'A': unknown dependency 'Z'" in result.stderr.splitlines()
    assert "  steps: step 'B': depends on 'Names' more than once" in result.stderr.splitlines()


def test_a_refused_api_key_is_named(agent):
    result = run_makima("directive", "show", env={**agent.env, "MAKIMA_API_KEY": "mk_t_not-a-real-token"})
    assert result.returncode == 1
    assert result.stderr.startswith("makima: the API key was refused (401): check MAKIMA_API_KEY / --api-key")
    assert result.stdout == ""


def test_a_task_token_acting_outside_its_scope_is_told_so(agent, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"title": "T", "goal": "G"}))
    result = agent.run("directive", "create", "--file", str(spec))
    assert result.returncode == 1
    assert result.stderr == "makima: not allowed (403): A task token cannot create directives.\n"


def test_an_unknown_object_is_not_found(agent):
    result = agent.run("contract", "file", "00000000-0000-0000-0000-000000000000")
    assert result.returncode == 1
    assert result.stderr.startswith("makima: not found (404): ")
    assert "check the id" in result.stderr


def test_a_refused_transition_shows_the_server_detail(agent):
    (step,) = make_steps(agent.objects["directive"], {"name": "Started"})
    Step.objects.filter(pk=step.pk).update(status=Step.Status.RUNNING)
    result = agent.run("directive", "remove-step", str(step.pk))
    assert result.returncode == 1
    assert result.stderr.startswith("makima: refused in the current state (409): ")
    assert "running" in result.stderr


def test_an_unreachable_server_is_exit_status_3():
    url = f"http://127.0.0.1:{closed_port()}"
    env = worker_env(MAKIMA_URL=url, MAKIMA_API_KEY="k", MAKIMA_DIRECTIVE_ID="d", MAKIMA_RETRY_FOR="0")
    result = run_makima("directive", "show", env=env)
    assert result.returncode == 3
    assert result.stderr.startswith(f"makima: cannot reach makima at {url}: ")
    assert result.stderr.rstrip().endswith("— check MAKIMA_URL / --url")


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (("directive", "show"), "MAKIMA_URL is not set: export it or pass --url"),
        (("--url", "http://x", "directive", "show"), "MAKIMA_API_KEY is not set: export it or pass --api-key"),
        (("--url", "http://x", "--api-key", "k", "directive", "show"), "MAKIMA_DIRECTIVE_ID is not set"),
        (("--url", "http://x", "--api-key", "k", "contract", "files"), "MAKIMA_CONTRACT_ID is not set"),
        (("--url", "http://x", "--api-key", "k", "supervisor", "complete"), "MAKIMA_TASK_ID is not set"),
    ],
)
def test_a_missing_setting_is_named(argv, missing):
    result = run_makima(*argv, env=worker_env())
    assert result.returncode == 2
    assert result.stderr.startswith(f"makima: {missing}")


def test_usage_errors_are_exit_status_2():
    result = run_makima("directive", "add-step", "A", env=worker_env())
    assert result.returncode == 2
    assert "the following arguments are required: --description, --task-plan" in result.stderr


# --------------------------------------------------------------------------- worker machines


def test_the_cli_never_imports_django_or_the_server():
    probe = (
        "import sys\n"
        "from makima.cli import main\n"
        "main(['--url', 'http://127.0.0.1:9', '--api-key', 'k', '--retry-for', '0', 'directive', 'show', 'x'])\n"
        "server = ('django', 'rest_framework', 'directives', 'contracts', 'daemons', 'makima.settings')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in server or m in server))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], env=worker_env(), capture_output=True, text=True, timeout=30)
    assert result.stdout == "[]\n", result.stderr
