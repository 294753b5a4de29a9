"""Reading what agents write: the ``chain-plan`` extractor and parser, and
``evaluation-result`` parsing (spec 4.1.3, 4.3)."""

from __future__ import annotations

import json

import pytest

from directives.plans import PlanError, extract_json_object, file_text, parse_evaluation, parse_plan

PLAN = {
    "steps": [
        {"name": "Design", "description": "d", "task_plan": "p", "depends_on": [], "order_index": 0},
        {"name": "Build", "description": "b", "task_plan": "q", "depends_on": ["Design"], "order_index": 1},
    ]
}


def names(specs):
    return [spec.name for spec in specs]


def test_a_raw_json_plan_is_parsed():
    specs = parse_plan(json.dumps(PLAN))

    assert names(specs) == ["Design", "Build"]
    assert specs[1].depends_on == ["Design"]
    assert specs[1].order_index == 1
    assert specs[1].task_plan == "q"


def test_a_plan_inside_a_fenced_json_block_is_parsed():
    text = f"Here is my plan.\n\n```json\n{json.dumps(PLAN, indent=2)}\n```\n\nThat is all."

    assert names(parse_plan(text)) == ["Design", "Build"]


def test_a_plan_in_an_unlabelled_fence_is_parsed():
    text = f"```\n{json.dumps(PLAN)}\n```"

    assert names(parse_plan(text)) == ["Design", "Build"]


def test_a_plan_embedded_in_prose_is_found():
    text = f"I looked at the repository {{it is small}}. The plan: {json.dumps(PLAN)} Let me know."

    assert names(parse_plan(text)) == ["Design", "Build"]


def test_the_extractor_skips_json_objects_without_the_expected_key():
    text = f'Config: {{"retries": 3}}. Plan: {json.dumps(PLAN)}'

    assert extract_json_object(text, required_key="steps") == PLAN


def test_a_bare_list_of_steps_is_accepted_as_a_plan():
    assert names(parse_plan(json.dumps(PLAN["steps"]))) == ["Design", "Build"]


def test_a_plan_in_a_contract_files_body_elements_is_parsed():
    body = [
        {"type": "markdown", "content": "# The plan\nTwo steps."},
        {"type": "code", "language": "json", "content": json.dumps(PLAN)},
    ]

    assert names(parse_plan(file_text("", body))) == ["Design", "Build"]


def test_file_text_joins_content_and_the_text_of_body_elements():
    body = [{"type": "paragraph", "text": "second"}, {"type": "code", "content": "third"}, "junk"]

    assert file_text("first", body) == "first\n\nsecond\n\nthird"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"steps": [{"name": "A", "depends_on": ["B"]}, {"name": "B", "depends_on": ["A"]}]},
            "dependency cycle: 'A' → 'B' → 'A'",
        ),
        (
            {"steps": [{"name": "A"}, {"name": "B", "depends_on": ["Nope"]}]},
            "unknown dependencies: 'B' depends on unknown step 'Nope'",
        ),
        ({"steps": [{"name": "A"}, {"name": "A"}]}, "duplicate step names: 'A'"),
        ({"steps": []}, "the plan has no steps"),
        ({"steps": "A then B"}, "'steps' must be a list"),
        ({"steps": [{"description": "no name"}]}, "steps[1]: needs a non-empty 'name'"),
        ({"steps": [{"name": "A", "step_type": "dance"}]}, "steps[1]: unknown step_type 'dance'"),
        ({"steps": [{"name": "A", "order_index": -1}]}, "'order_index' must be a whole number ≥ 0"),
        ({"plan": []}, "no JSON object with a 'steps' key was found"),
    ],
)
def test_a_bad_plan_is_refused_with_a_message_that_says_what_is_wrong(document, message):
    with pytest.raises(PlanError) as error:
        parse_plan(json.dumps(document))

    assert message in str(error.value)


def test_a_self_dependency_is_a_cycle():
    with pytest.raises(PlanError, match="dependency cycle: 'A' → 'A'"):
        parse_plan(json.dumps({"steps": [{"name": "A", "depends_on": ["A"]}]}))


@pytest.mark.parametrize(("text", "message"), [("", "the file is empty"), ("   \n", "the file is empty")])
def test_an_empty_plan_file_is_refused(text, message):
    with pytest.raises(PlanError, match=message):
        parse_plan(text)


def test_an_unparseable_plan_is_refused():
    with pytest.raises(PlanError, match="no JSON could be parsed from the file"):
        parse_plan('I will do {"steps": [ this is not json')


# --------------------------------------------------------------------------- evaluation results


def test_an_evaluation_result_in_camel_case_is_parsed():
    result = parse_evaluation(
        json.dumps(
            {
                "passed": True,
                "overallScore": 0.85,
                "confidenceLevel": "green",
                "criteriaResults": [{"criterion": "AC1", "passed": True, "score": 0.9, "evidence": "tests"}],
                "summaryFeedback": "Good.",
                "reworkInstructions": "",
            }
        )
    )

    assert (result.passed, result.overall_score, result.confidence_level) == (True, 0.85, "green")
    assert result.criteria_results == [{"criterion": "AC1", "passed": True, "score": 0.9, "evidence": "tests"}]
    assert result.summary_feedback == "Good."


def test_an_evaluation_result_in_snake_case_inside_prose_is_parsed():
    text = (
        "My verdict:\n```json\n"
        + json.dumps(
            {
                "passed": False,
                "overall_score": 0.3,
                "confidence_level": "red",
                "criteria_results": [{"id": "AC1", "passed": False}],
                "summary_feedback": "Broken.",
                "rework_instructions": "Fix the handler.",
            }
        )
        + "\n```"
    )

    result = parse_evaluation(text)

    assert (result.passed, result.overall_score, result.confidence_level) == (False, 0.3, "red")
    assert result.rework_instructions == "Fix the handler."
    assert result.criteria_results[0]["criterion"] == "AC1"


def test_a_confidence_level_in_capitals_is_understood():
    assert parse_evaluation('{"passed": true, "overallScore": 0.9, "confidenceLevel": "Green"}').confidence_level == (
        "green"
    )


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"passed": "yes", "overallScore": 0.9}, "'passed' must be true or false"),
        ({"passed": True, "overallScore": 90}, "'overallScore' must be a number between 0 and 1"),
        ({"passed": True}, "'overallScore' must be a number between 0 and 1"),
        ({"passed": True, "overallScore": 0.9, "confidenceLevel": "blue"}, "'confidenceLevel' must be green"),
        ({"passed": True, "overallScore": 0.9, "criteriaResults": "all good"}, "'criteriaResults' must be a list"),
    ],
)
def test_a_bad_evaluation_result_is_refused(document, message):
    with pytest.raises(PlanError, match=message):
        parse_evaluation(json.dumps(document))
