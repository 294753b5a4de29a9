"""Chains and evaluations: read-only lists and details, filtered by directive or step."""

from __future__ import annotations

import pytest

from directives.models import Directive, Step
from directives.services import directive_regenerate, directive_start
from makima.state import SYSTEM
from tests.factories import make_directive, make_evaluation, make_steps


@pytest.fixture
def client(api_as, alice):
    return api_as(alice)


@pytest.fixture
def directive(alice) -> Directive:
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"}, {"name": "B"})
    directive.refresh_from_db()
    return directive


def test_chains_are_listed_by_generation_and_filtered_by_directive(client, alice, directive):
    directive_start(directive=directive, actor=SYSTEM)
    directive_regenerate(directive=directive, actor=SYSTEM)
    make_directive(alice, title="Other")
    make_steps(Directive.objects.get(title="Other"), {"name": "X"})
    rows = client.get(f"/api/v1/chains/?directive={directive.pk}").json()["results"]
    assert [(row["generation"], row["status"]) for row in rows] == [(1, "superseded")]
    assert len(client.get("/api/v1/chains/").json()["results"]) == 2
    assert client.get(f"/api/v1/chains/{rows[0]['id']}/").json()["directive"] == str(directive.pk)
    assert len(client.get("/api/v1/chains/?status=superseded").json()["results"]) == 1


def test_evaluations_are_filtered_by_directive_and_step(client, directive):
    a, b = Step.objects.get(directive=directive, name="A"), Step.objects.get(directive=directive, name="B")
    first = make_evaluation(a, overall_score=0.6)
    make_evaluation(b, overall_score=0.3, passed=False, summary_feedback="Tests fail")
    rows = client.get(f"/api/v1/evaluations/?step={a.pk}").json()["results"]
    assert [(row["id"], row["overall_score"], row["confidence_level"]) for row in rows] == [
        (str(first.pk), 0.6, "yellow")
    ]
    assert len(client.get(f"/api/v1/evaluations/?directive={directive.pk}").json()["results"]) == 2
    detail = client.get(f"/api/v1/evaluations/{first.pk}/").json()
    assert (detail["step"], detail["kind"], detail["passed"]) == (str(a.pk), "agent", True)


@pytest.mark.parametrize(
    "url", ["/api/v1/chains/?directive=nope", "/api/v1/evaluations/?step=nope", "/api/v1/chains/?status=gone"]
)
def test_a_bad_filter_is_a_400(client, directive, url):
    response = client.get(url)
    assert response.status_code == 400
    assert response.json()["errors"]


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_chains_and_evaluations_are_read_only(client, directive, method):
    evaluation = make_evaluation(Step.objects.get(directive=directive, name="A"))
    for url in (f"/api/v1/chains/{directive.current_chain_id}/", f"/api/v1/evaluations/{evaluation.pk}/"):
        assert getattr(client, method)(url, {}, format="json").status_code == 405
