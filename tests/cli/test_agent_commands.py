"""Agent-facing commands, run with a task token and the daemon's ``MAKIMA_*`` variables."""

from __future__ import annotations

import json

import pytest

from contracts.models import Contract, ContractFile, Task
from contracts.services import contract_file_create
from directives.models import Directive, Step
from directives.services import directive_transition
from tests.factories import make_directive, make_steps

pytestmark = pytest.mark.django_db(transaction=True)


def steps_of(directive: Directive) -> dict[str, Step]:
    return {step.name: step for step in Step.objects.filter(directive=directive)}


def test_add_step_adds_a_step_with_its_dependencies(agent):
    directive = agent.objects["directive"]
    names, style = make_steps(directive, {"name": "Names"}, {"name": "Style"})
    out = agent.ok(
        "directive",
        "add-step",
        "Greet",
        "--description",
        "Say hello",
        "--task-plan",
        "Write greet.py",
        "--depends-on",
        f"{names.pk}, Style",
        "--order-index",
        "1",
        "--generation",
        "1",
        "--step-type",
        "implement",
        "--agent",
        "scripted",
    )
    greet = steps_of(directive)["Greet"]
    assert out.strip() == f"added step Greet [{greet.pk}] (pending)"
    assert (greet.description, greet.task_plan, greet.order_index) == ("Say hello", "Write greet.py", 1)
    assert (greet.step_type, greet.agent) == ("implement", "scripted")
    assert [link.depends_on_id for link in greet.dependency_links.order_by("position")] == [names.pk, style.pk]


def test_batch_add_steps_takes_the_steps_as_json(agent):
    steps = [
        {"name": "A", "task_plan": "first"},
        {"name": "B", "task_plan": "second", "depends_on": ["A"]},
    ]
    out = agent.ok("directive", "batch-add-steps", "--json", json.dumps(steps))
    added = steps_of(agent.objects["directive"])
    assert set(added) == {"A", "B"}
    assert out.splitlines()[0] == "added 2 steps:"
    assert f"B  [{added['B'].pk}]" in out
    assert "after: A" in out


def test_batch_add_steps_reads_stdin_or_a_file(agent, tmp_path):
    agent.ok("directive", "batch-add-steps", "--json", "-", stdin=json.dumps([{"name": "From stdin"}]))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"steps": [{"name": "From a file", "depends_on": ["From stdin"]}]}))
    agent.ok("directive", "batch-add-steps", "--file", str(plan))
    assert set(steps_of(agent.objects["directive"])) == {"From stdin", "From a file"}


def test_batch_add_steps_refuses_what_is_not_a_list_of_steps(agent):
    result = agent.run("directive", "batch-add-steps", "--json", '{"name": "A"}')
    assert result.returncode == 2
    assert "--json must be a JSON list of step objects" in result.stderr

    result = agent.run("directive", "batch-add-steps", "--json", "[{")
    assert result.returncode == 2
    assert "--json is not valid JSON" in result.stderr


def test_remove_step_removes_a_step(agent):
    directive = agent.objects["directive"]
    (step,) = make_steps(directive, {"name": "Doomed"})
    assert agent.ok("directive", "remove-step", str(step.pk)).strip() == f"removed step {step.pk}"
    assert not Step.objects.filter(pk=step.pk).exists()


def test_update_records_the_pull_request_and_completes_the_directive(agent):
    directive = agent.objects["directive"]
    make_steps(directive, {"name": "Only"})
    directive_transition(directive=directive, to=Directive.Status.ACTIVE)
    directive_transition(directive=directive, to=Directive.Status.COMPLETING)

    out = agent.ok("directive", "update", "--pr-url", "https://git.example.com/pr/7", "--status", "completed")

    directive.refresh_from_db()
    assert (directive.pr_url, directive.status) == ("https://git.example.com/pr/7", "completed")
    assert out.strip() == f"directive {directive.pk}: status completed, pull request https://git.example.com/pr/7"


def test_update_needs_something_to_update(agent):
    result = agent.run("directive", "update")
    assert result.returncode == 2
    assert "nothing to update: pass --pr-url URL and/or --status completed" in result.stderr


def test_show_summarises_the_directive_and_its_steps(agent):
    directive = agent.objects["directive"]
    first, second = make_steps(directive, {"name": "Names"}, {"name": "Greet", "depends_on": ["Names"]})
    Step.objects.filter(pk=second.pk).update(rework_count=2)

    out = agent.ok("directive", "show")

    assert out.splitlines()[0] == "Add a health endpoint"
    assert f"id: {directive.pk}   status: draft" in out
    assert "goal: Expose /healthz returning 200 when the service is up." in out
    assert "steps: 2 (2 pending)" in out
    assert f"pending           Names  [{first.pk}]  order 0 · after: - · reworks: 0" in out
    assert f"pending           Greet  [{second.pk}]  order 0 · after: Names · reworks: 2" in out


def test_contract_files_lists_the_files_without_their_content(agent):
    file = contract_file_create(contract=agent.objects["contract"], name="chain-plan", content="{}")
    out = agent.ok("contract", "files")
    assert out.startswith(f"{file.pk}  chain-plan  2 bytes  ")


def test_contract_file_prints_the_content_as_it_is(agent):
    content = "line one\nline two — ünïcode\n"
    file = contract_file_create(contract=agent.objects["contract"], name="notes.md", content=content)
    assert agent.ok("contract", "file", str(file.pk)) == content


def test_create_file_takes_the_content_from_stdin_or_an_option(agent):
    agent.ok("contract", "create-file", "evaluation-result", stdin='{"passed": true}\n')
    out = agent.ok("contract", "create-file", "notes.md", "--content", "short")
    files = {f.name: f for f in ContractFile.objects.filter(contract=agent.objects["contract"])}
    assert files["evaluation-result"].content == '{"passed": true}\n'
    assert files["notes.md"].content == "short"
    assert out.strip() == f"created notes.md [{files['notes.md'].pk}] (5 bytes)"


def test_supervisor_complete_marks_the_task_delivered(agent):
    task = agent.objects["task"]
    assert agent.ok("supervisor", "complete").strip() == f"task {task.pk} marked as delivered"
    task.refresh_from_db()
    assert task.supervisor_completed_at is not None
    assert Contract.objects.get(pk=agent.objects["contract"].pk).status == Contract.Status.COMPLETED
    assert Task.objects.get(pk=task.pk).status == task.status


def test_show_takes_the_directive_id_as_an_argument_too(operator, alice):
    directive = make_directive(alice, title="Chosen by id")
    assert operator.ok("directive", "show", str(directive.pk)).startswith("Chosen by id\n")
