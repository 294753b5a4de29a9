"""``POST /directives/{id}/steps/batch/``: all steps or none, with the DAG checked.

Every refusal is a 400 whose message names the offending steps (under
``errors.steps``) and creates nothing: no step, no dependency, no event.
"""

from __future__ import annotations

from typing import Any

import pytest

from directives.models import Directive, DirectiveEvent, Step, StepDependency
from directives.services import directive_stop
from makima.state import SYSTEM
from tests.factories import make_directive, make_steps


@pytest.fixture
def client(api_as, alice):
    return api_as(alice)


@pytest.fixture
def directive(alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "Existing"})
    directive.refresh_from_db()
    return directive


def batch(client: Any, directive: Directive, body: Any) -> Any:
    return client.post(f"/api/v1/directives/{directive.pk}/steps/batch/", body, format="json")


def footprint(directive: Directive) -> tuple[int, int, int]:
    return (
        Step.objects.filter(directive=directive).count(),
        StepDependency.objects.filter(step__directive=directive).count(),
        DirectiveEvent.objects.filter(directive=directive).count(),
    )


def test_a_diamond_batch_is_created_with_its_dependencies_in_the_order_given(client, directive):
    body = {
        "steps": [
            {"name": "A", "description": "Scaffold", "task_plan": "Create the module.", "step_type": "implement"},
            {"name": "B", "depends_on": ["A"], "order_index": 1},
            {"name": "C", "depends_on": ["A"], "order_index": 1, "agent": "scripted", "verifiers": ["pytest -q"]},
            {"name": "D", "depends_on": ["C", "B"], "order_index": 2},
        ]
    }
    response = batch(client, directive, body)
    assert response.status_code == 201, response.content
    steps = response.json()["steps"]
    assert [s["name"] for s in steps] == ["A", "B", "C", "D"]
    ids = {s["name"]: s["id"] for s in steps}
    by_name = {s["name"]: s for s in steps}
    assert by_name["A"]["depends_on"] == []
    assert by_name["B"]["depends_on"] == [ids["A"]]
    assert by_name["D"]["depends_on"] == [ids["C"], ids["B"]]
    assert by_name["C"]["verifiers"] == ["pytest -q"]
    assert by_name["A"]["step_type"] == "implement"
    d = Step.objects.get(pk=ids["D"])
    assert list(d.dependency_links.order_by("position").values_list("depends_on__name", flat=True)) == ["C", "B"]
    assert DirectiveEvent.objects.filter(directive=directive, event_type="step_added").count() == 5


def test_a_batch_may_depend_on_existing_steps_by_id_or_by_name(client, directive):
    existing = Step.objects.get(directive=directive, name="Existing")
    body = {"steps": [{"name": "X", "depends_on": [str(existing.pk)]}, {"name": "Y", "depends_on": ["Existing", "X"]}]}
    response = batch(client, directive, body)
    assert response.status_code == 201, response.content
    x, y = response.json()["steps"]
    assert x["depends_on"] == [str(existing.pk)]
    assert y["depends_on"] == [str(existing.pk), x["id"]]


def test_the_cli_generation_field_is_accepted(client, directive):
    response = batch(client, directive, {"steps": [{"name": "G", "generation": 1}]})
    assert response.status_code == 201


def _other_directives_step(owner: Any) -> str:
    other = make_directive(owner, title="Other")
    return str(make_steps(other, {"name": "Elsewhere"})[0].pk)


BAD_BATCHES: list[tuple[str, Any, list[str]]] = [
    (
        "cycle",
        {
            "steps": [
                {"name": "A", "depends_on": ["C"]},
                {"name": "B", "depends_on": ["A"]},
                {"name": "C", "depends_on": ["B"]},
            ]
        },
        ["dependency cycle", "'A'", "'B'", "'C'"],
    ),
    ("self dependency", {"steps": [{"name": "A", "depends_on": ["A"]}]}, ["step 'A': depends on itself"]),
    (
        "unknown dependency",
        {"steps": [{"name": "A"}, {"name": "B", "depends_on": ["A", "Z"]}]},
        ["step 'B': unknown dependency 'Z'"],
    ),
    (
        "unknown dependency id",
        {"steps": [{"name": "B", "depends_on": ["6f1c1a8e-2a51-4c4c-9d8e-0d0f6b1f0a11"]}]},
        ["step 'B': unknown dependency '6f1c1a8e-2a51-4c4c-9d8e-0d0f6b1f0a11'"],
    ),
    (
        "duplicate names within the batch",
        {"steps": [{"name": "A"}, {"name": "A"}]},
        ["step 'A': the name appears more than once in the batch"],
    ),
    (
        "duplicate name with an existing step",
        {"steps": [{"name": "Existing"}]},
        ["step 'Existing': the directive already has a step with this name"],
    ),
    (
        "repeated dependency",
        {"steps": [{"name": "A"}, {"name": "B", "depends_on": ["A", "A"]}]},
        ["step 'B': depends on 'A' more than once"],
    ),
    ("empty list", {"steps": []}, ["At least one step is required"]),
    ("steps missing", {}, ["steps: This field is required"]),
    ("steps not a list", {"steps": {"name": "A"}}, ["Expected a list"]),
    ("a step that is not an object", {"steps": ["A"]}, ["steps[1]", "Expected a dictionary"]),
    ("unknown field", {"steps": [{"name": "A", "colour": "red"}]}, ["step 'A' (steps[1]): colour: Unknown field"]),
    (
        "read-only field",
        {"steps": [{"name": "A", "status": "passed"}]},
        ["step 'A' (steps[1]): status: This field is read-only"],
    ),
    ("missing name", {"steps": [{"name": "A"}, {"task_plan": "x"}]}, ["steps[2]: name: This field is required"]),
    ("blank name", {"steps": [{"name": "  "}]}, ["steps[1]: name: This field may not be blank"]),
    ("name too long", {"steps": [{"name": "n" * 201}]}, ["name: Ensure this field has no more than 200 characters"]),
    (
        "negative order index",
        {"steps": [{"name": "A"}, {"name": "B", "order_index": -1}]},
        ["step 'B' (steps[2]): order_index: Ensure this value is greater than or equal to 0"],
    ),
    (
        "depends_on not a list",
        {"steps": [{"name": "A"}, {"name": "B", "depends_on": "A"}]},
        ["step 'B' (steps[2]): depends_on: Expected a list"],
    ),
    ("unknown step type", {"steps": [{"name": "A", "step_type": "dance"}]}, ["step 'A' (steps[1]): step_type"]),
    ("unknown agent", {"steps": [{"name": "A", "agent": "gpt"}]}, ["step 'A' (steps[1]): agent"]),
    ("bad verifiers", {"steps": [{"name": "A", "verifiers": "pytest"}]}, ["step 'A' (steps[1]): verifiers"]),
    ("unknown top-level field", {"steps": [{"name": "A"}], "mode": "append"}, ["mode: Unknown field"]),
    ("not an object", [{"name": "A"}], ["Expected a dictionary"]),
]


@pytest.mark.parametrize(("case", "body", "words"), BAD_BATCHES, ids=[case for case, _, _ in BAD_BATCHES])
def test_a_bad_batch_is_a_400_naming_the_steps_and_creates_nothing(client, directive, case, body, words):
    before = footprint(directive)
    response = batch(client, directive, body)
    assert response.status_code == 400, response.content
    data = response.json()
    text = data["detail"] + " " + " ".join(str(m) for m in data["errors"].get("steps", data["errors"]))
    if isinstance(data["errors"].get("steps"), list):
        assert all(isinstance(m, str) for m in data["errors"]["steps"])
    for word in words:
        assert word in text or word in str(data["errors"]), (word, data)
    assert footprint(directive) == before


def test_a_dependency_on_another_directives_step_is_refused(client, alice, directive):
    foreign = _other_directives_step(alice)
    before = footprint(directive)
    response = batch(client, directive, {"steps": [{"name": "A"}, {"name": "B", "depends_on": ["A", foreign]}]})
    assert response.status_code == 400
    assert response.json()["errors"]["steps"] == [f"step 'B': dependency '{foreign}' belongs to another directive"]
    assert response.json()["detail"] == f"steps: step 'B': dependency '{foreign}' belongs to another directive"
    assert footprint(directive) == before


def test_one_existing_step_named_by_its_name_and_by_its_id_is_a_repeated_dependency(client, directive):
    existing = Step.objects.get(directive=directive, name="Existing")
    before = footprint(directive)
    response = batch(client, directive, {"steps": [{"name": "B", "depends_on": ["Existing", str(existing.pk)]}]})
    assert response.status_code == 400
    assert response.json()["errors"]["steps"] == [f"step 'B': depends on '{existing.pk}' more than once"]
    assert footprint(directive) == before


def test_every_problem_of_a_batch_is_reported_at_once(client, directive):
    body = {"steps": [{"name": "A", "depends_on": ["Nope"]}, {"name": "A"}, {"name": "B", "depends_on": ["Z"]}]}
    response = batch(client, directive, body)
    assert response.status_code == 400
    assert response.json()["errors"]["steps"] == [
        "step 'A': the name appears more than once in the batch",
        "step 'A': unknown dependency 'Nope'",
        "step 'B': unknown dependency 'Z'",
    ]


def test_a_batch_larger_than_the_limit_is_refused(client, directive, settings):
    settings.MAKIMA_MAX_STEPS_PER_BATCH = 2
    before = footprint(directive)
    response = batch(client, directive, {"steps": [{"name": "A"}, {"name": "B"}, {"name": "C"}]})
    assert response.status_code == 400
    assert "at most 2 steps" in response.json()["detail"]
    assert footprint(directive) == before


def test_steps_cannot_be_added_to_a_failed_directive(client, directive):
    directive_stop(directive=directive, actor=SYSTEM)
    before = footprint(directive)
    response = batch(client, directive, {"steps": [{"name": "A"}]})
    assert response.status_code == 409
    assert response.json()["detail"] == "steps cannot be added to a failed directive"
    assert footprint(directive) == before


def test_malformed_json_is_a_400_and_creates_nothing(client, directive):
    before = footprint(directive)
    response = client.post(
        f"/api/v1/directives/{directive.pk}/steps/batch/", '{"steps": [', content_type="application/json"
    )
    assert response.status_code == 400
    assert footprint(directive) == before
