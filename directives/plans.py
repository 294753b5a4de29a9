"""Reading what agents write: plans (``chain-plan``) and evaluation results
(``evaluation-result``).

Agents are not careful JSON emitters: the JSON may stand alone, sit in a
fenced ```json block, be embedded in prose, or be spread over a contract
file's body elements. The extractor finds the first JSON object that has the
expected key; validation then says exactly what is wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ValidationError

from directives.services import StepSpec, find_cycle, step_spec_from_mapping

FENCE = re.compile(r"```(?:json|JSON)?\s*\n(.*?)```", re.DOTALL)


class PlanError(ValueError):
    """A plan or evaluation that cannot be used; the message says why."""


def _candidates(text: str) -> Iterator[str]:
    stripped = text.strip()
    if stripped:
        yield stripped
    for match in FENCE.finditer(text):
        yield match.group(1).strip()
    # Every balanced {...} region that starts at a '{', outermost first.
    decoder = json.JSONDecoder()
    index = text.find("{")
    while index != -1:
        try:
            _, end = decoder.raw_decode(text, index)
        except ValueError:
            index = text.find("{", index + 1)
            continue
        yield text[index:end]
        index = text.find("{", end)


def extract_json_object(text: str, *, required_key: str) -> dict[str, Any]:
    """The first JSON object in ``text`` that has ``required_key``."""
    if not isinstance(text, str) or not text.strip():
        raise PlanError("the file is empty")
    seen_json = False
    for candidate in _candidates(text):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        seen_json = True
        if isinstance(value, dict) and required_key in value:
            return value
        if required_key == "steps" and isinstance(value, list):
            return {"steps": value}
    if seen_json:
        raise PlanError(f"no JSON object with a '{required_key}' key was found")
    raise PlanError("no JSON could be parsed from the file")


def file_text(content: str, body: Sequence[Mapping[str, Any]] | None) -> str:
    """A contract file's text: its content, then the text of its body elements."""
    parts = [content or ""]
    for element in body or []:
        if isinstance(element, Mapping):
            text = element.get("content", element.get("text"))
            if isinstance(text, str):
                parts.append(text)
    return "\n\n".join(part for part in parts if part)


def parse_plan(text: str) -> list[StepSpec]:
    """Parse and validate a plan: ``{"steps": [{name, description, task_plan,
    depends_on: [names], order_index, step_type}]}``. Raises ``PlanError``
    naming unknown dependencies, cycles, duplicate names or an empty plan."""
    document = extract_json_object(text, required_key="steps")
    raw_steps = document["steps"]
    if not isinstance(raw_steps, list):
        raise PlanError("'steps' must be a list")
    if not raw_steps:
        raise PlanError("the plan has no steps")
    specs: list[StepSpec] = []
    for index, raw in enumerate(raw_steps, start=1):
        try:
            specs.append(step_spec_from_mapping(raw, index=index))
        except ValidationError as exc:
            raise PlanError("; ".join(f"{k}: {', '.join(v)}" for k, v in exc.message_dict.items())) from None
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise PlanError("duplicate step names: " + ", ".join(f"'{n}'" for n in duplicates))
    known = set(names)
    unknown = [
        f"'{spec.name}' depends on unknown step '{dep}'"
        for spec in specs
        for dep in spec.depends_on
        if dep not in known
    ]
    if unknown:
        raise PlanError("unknown dependencies: " + "; ".join(unknown))
    cycle = find_cycle({spec.name: spec.depends_on for spec in specs})
    if cycle:
        raise PlanError("dependency cycle: " + " → ".join(f"'{n}'" for n in cycle))
    return specs


@dataclass(frozen=True)
class EvaluationResult:
    passed: bool
    overall_score: float
    confidence_level: str
    criteria_results: list[dict[str, Any]]
    summary_feedback: str
    rework_instructions: str


def _pick(document: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if name in document:
            return document[name]
    return default


def parse_evaluation(text: str) -> EvaluationResult:
    """Parse an ``evaluation-result`` file; camelCase and snake_case keys are accepted."""
    try:
        document = extract_json_object(text, required_key="passed")
    except PlanError:
        document = extract_json_object(text, required_key="overallScore")
    passed = document.get("passed")
    if not isinstance(passed, bool):
        raise PlanError("'passed' must be true or false")
    score = _pick(document, "overallScore", "overall_score", "score")
    if isinstance(score, bool) or not isinstance(score, int | float) or not 0.0 <= float(score) <= 1.0:
        raise PlanError("'overallScore' must be a number between 0 and 1")
    level = _pick(document, "confidenceLevel", "confidence_level", default="") or ""
    if isinstance(level, str):
        level = level.strip().lower()
    if level and level not in ("green", "yellow", "red"):
        raise PlanError("'confidenceLevel' must be green, yellow or red")
    criteria = _pick(document, "criteriaResults", "criteria_results", default=[]) or []
    if not isinstance(criteria, list) or not all(isinstance(c, dict) for c in criteria):
        raise PlanError("'criteriaResults' must be a list of objects")
    feedback = _pick(document, "summaryFeedback", "summary_feedback", default="") or ""
    rework = _pick(document, "reworkInstructions", "rework_instructions", default="") or ""
    if not isinstance(feedback, str) or not isinstance(rework, str):
        raise PlanError("'summaryFeedback' and 'reworkInstructions' must be text")
    return EvaluationResult(
        passed=passed,
        overall_score=float(score),
        confidence_level=level,
        criteria_results=[
            {
                "criterion": str(c.get("criterion", c.get("id", ""))),
                "passed": bool(c.get("passed", False)),
                "score": c.get("score"),
                "evidence": str(c.get("evidence", "")),
            }
            for c in criteria
        ],
        summary_feedback=feedback,
        rework_instructions=rework,
    )
