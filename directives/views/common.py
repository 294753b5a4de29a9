"""What every dashboard view module shares: how a service's refusal reads,
where a form post goes back to, and how an evaluation's agent-written JSON is
turned into table rows."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponseRedirect
from django.utils.http import url_has_allowed_host_and_scheme


def refusal_text(exc: Exception) -> str:
    """The service's own words for why it refused (field errors keep their field's name)."""
    if isinstance(exc, ValidationError):
        if hasattr(exc, "error_dict"):
            return "; ".join(f"{field}: {m}" for field, errors in exc.message_dict.items() for m in errors)
        return " ".join(exc.messages)
    return str(exc)


def redirect_back(request: HttpRequest, fallback: str) -> HttpResponseRedirect:
    """Redirect to the form's ``next`` when it stays on this site (another page
    may embed the form), else to ``fallback``."""
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return HttpResponseRedirect(target)
    return HttpResponseRedirect(fallback)


# --------------------------------------------------------------------------- evaluations


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def verifier_rows(results: Any) -> list[dict[str, Any]]:
    """Rows for ``includes/verifiers.html`` from a task's or an evaluation's
    ``verifier_results``. Daemons and agents write that JSON and may write
    anything: items that are not objects are left out (they name no command),
    values are coerced, and only ``passed: true`` counts as passed."""
    if not isinstance(results, list):
        return []
    return [
        {
            "name": _text(item.get("name") or item.get("command")),
            "command": _text(item.get("command")),
            "passed": item.get("passed") is True,
            "exit_code": _text(item.get("exit_code")),
            "duration_s": _number(item.get("duration_s")),
            "output_tail": _text(item.get("output_tail")),
        }
        for item in results
        if isinstance(item, dict)
    ]


def criteria_rows(results: Any) -> list[dict[str, Any]]:
    """Rows for the criteria table from an evaluation's ``criteria_results``.
    An item that is not an object is shown as the criterion's text, not passed:
    the person judging the step sees everything the evaluator wrote."""
    if not isinstance(results, list):
        return []
    return [
        {
            "criterion": _text(item.get("criterion") or item.get("id")),
            "passed": item.get("passed") is True,
            "score": _number(item.get("score")),
            "evidence": _text(item.get("evidence")),
        }
        if isinstance(item, dict)
        else {"criterion": _text(item), "passed": False, "score": None, "evidence": ""}
        for item in results
    ]


def evaluation_rows(evaluation: Any) -> Any:
    """Give an evaluation ``criteria_rows`` and ``verifier_rows`` for
    ``includes/evaluation.html``, which the inbox and the step panel share."""
    evaluation.criteria_rows = criteria_rows(evaluation.criteria_results)
    evaluation.verifier_rows = verifier_rows(evaluation.verifier_results)
    return evaluation
