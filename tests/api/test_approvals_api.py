"""Approval requests: listing them and answering with approve or deny."""

from __future__ import annotations

from typing import Any

import pytest

from directives.models import ApprovalRequest, Directive, DirectiveEvent, Step
from directives.services import approval_approve, approval_request, directive_transition, step_transition
from makima.state import SYSTEM, Actor
from tests.factories import make_approval, make_directive, make_evaluation, make_steps


@pytest.fixture
def client(api_as, alice):
    return api_as(alice)


@pytest.fixture
def step(alice):
    """A step of alice's active directive, evaluated yellow and waiting for a person."""
    directive = make_directive(alice)
    step = make_steps(directive, {"name": "Implement"})[0]
    directive_transition(directive=directive, to="active")
    for status in ("ready", "running", "evaluating"):
        step_transition(step=step, to=status)
    make_evaluation(step, overall_score=0.6, passed=True)
    step_transition(step=step, to="awaiting_approval")
    return step


@pytest.fixture
def approval(step):
    return make_approval(step, description="Score 0.6 (yellow): please review.")


def answer(client: Any, approval: ApprovalRequest, verb: str, body: Any = None) -> Any:
    return client.post(f"/api/v1/approvals/{approval.pk}/{verb}/", body, format="json")


def test_approving_passes_the_step(client, alice, approval, step):
    response = answer(client, approval, "approve", {"note": "Looks right."})
    assert response.status_code == 200, response.content
    data = response.json()
    assert (data["status"], data["response_note"], data["responded_by"]) == ("approved", "Looks right.", "alice")
    assert data["responded_at"]
    step.refresh_from_db()
    assert step.status == Step.Status.PASSED
    assert DirectiveEvent.objects.filter(step=step, event_type="step_passed", actor="alice").exists()
    assert DirectiveEvent.objects.filter(event_type="approval_approved", subject_id=str(approval.pk)).exists()


def test_approving_without_a_body_is_fine(client, approval, step):
    assert answer(client, approval, "approve").status_code == 200
    step.refresh_from_db()
    assert step.status == Step.Status.PASSED


def test_denying_sends_the_step_back_for_rework_with_the_note(client, approval, step):
    response = answer(client, approval, "deny", {"note": "Handle the empty list too."})
    assert response.status_code == 200
    assert response.json()["status"] == "denied"
    step.refresh_from_db()
    assert step.status == Step.Status.PENDING
    assert step.rework_instructions == "Handle the empty list too."
    assert step.rework_count == 1


def test_denying_a_step_without_rework_cycles_left_fails_it(client, approval, step):
    Directive.objects.filter(pk=step.directive_id).update(max_rework_cycles=0)
    assert answer(client, approval, "deny").status_code == 200
    step.refresh_from_db()
    assert step.status == Step.Status.FAILED


def test_approving_a_plan_review_activates_the_directive(client, alice):
    directive = make_directive(alice, require_plan_approval=True)
    directive_transition(directive=directive, to="planning")
    review = approval_request(directive=directive, kind=ApprovalRequest.Kind.PLAN_REVIEW, description="Review the plan")
    assert answer(client, review, "approve").status_code == 200
    directive.refresh_from_db()
    assert directive.status == Directive.Status.ACTIVE


def test_an_answered_approval_cannot_be_answered_the_other_way(client, approval, step):
    approval_approve(approval=approval, actor=SYSTEM, note="ok")
    before = DirectiveEvent.objects.count()
    response = answer(client, approval, "deny", {"note": "changed my mind"})
    assert response.status_code == 409
    assert response.json()["detail"] == "approval cannot go from 'approved' to 'denied'"
    approval.refresh_from_db()
    step.refresh_from_db()
    assert (approval.status, approval.response_note, step.status) == ("approved", "ok", "passed")
    assert DirectiveEvent.objects.count() == before


@pytest.mark.parametrize(("body", "field"), [({"note": ["a"]}, "note"), ({"reason": "x"}, "reason")])
def test_a_bad_answer_is_a_400_and_changes_nothing(client, approval, body, field):
    response = answer(client, approval, "approve", body)
    assert response.status_code == 400
    assert field in response.json()["errors"]
    approval.refresh_from_db()
    assert approval.status == "pending"


def test_answered_approvals_stay_listed_with_their_status(client, alice, step, approval):
    other = make_approval(step, description="Second look")
    approval_approve(approval=approval, actor=Actor.for_user(alice))
    rows = client.get("/api/v1/approvals/").json()["results"]
    assert {row["id"]: row["status"] for row in rows} == {str(approval.pk): "approved", str(other.pk): "pending"}
    pending = client.get("/api/v1/approvals/?status=pending").json()["results"]
    assert [row["id"] for row in pending] == [str(other.pk)]
    approved = client.get("/api/v1/approvals/?status=approved").json()["results"]
    assert [row["id"] for row in approved] == [str(approval.pk)]


def test_approvals_can_be_filtered_by_directive_and_step(client, alice, approval, step):
    other_directive = make_directive(alice, title="Other")
    other = make_approval(make_steps(other_directive, {"name": "X"})[0])
    by_directive = client.get(f"/api/v1/approvals/?directive={step.directive_id}").json()["results"]
    assert [row["id"] for row in by_directive] == [str(approval.pk)]
    by_step = client.get(f"/api/v1/approvals/?step={other.step_id}").json()["results"]
    assert [row["id"] for row in by_step] == [str(other.pk)]


@pytest.mark.parametrize("query", ["?status=maybe", "?directive=not-a-uuid"])
def test_a_bad_approval_filter_is_a_400(client, approval, query):
    assert client.get(f"/api/v1/approvals/{query}").status_code == 400


def test_a_team_member_can_answer_for_a_shared_directive(api_as, carol, platform, step, approval):
    Directive.objects.filter(pk=step.directive_id).update(team=platform)
    response = answer(api_as(carol), approval, "approve")
    assert response.status_code == 200
    assert response.json()["responded_by"] == "carol"
