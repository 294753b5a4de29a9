"""The approvals inbox: who sees what, answering through the services, and the evaluation shown."""

from __future__ import annotations

from typing import Any

from django.urls import reverse

from directives.models import ApprovalRequest, Directive, Step
from directives.services import directive_transition, step_transition
from tests.factories import make_approval, make_directive, make_evaluation, make_steps

XSS = "<script>alert(1)</script><img src=x onerror=alert(1)>"
INBOX = reverse("approval-inbox")


def waiting_step(owner: Any, name: str = "Implement", **directive_fields: Any) -> Step:
    """A step of an active directive, evaluated yellow and waiting for a person."""
    directive = make_directive(owner, **directive_fields)
    step = make_steps(directive, {"name": name})[0]
    directive_transition(directive=directive, to="active")
    for status in ("ready", "running", "evaluating"):
        step_transition(step=step, to=status)
    return step


def waiting_approval(owner: Any, **fields: Any) -> ApprovalRequest:
    step = waiting_step(owner, **fields.pop("directive_fields", {}))
    evaluation = make_evaluation(
        step,
        overall_score=0.62,
        passed=True,
        summary_feedback=fields.pop("feedback", "Mostly there; the error path is untested."),
        criteria_results=[
            {"criterion": "GET /healthz answers 200", "passed": True, "score": 0.9, "evidence": "curl shows 200"},
            {"criterion": "Errors are logged", "passed": False, "score": 0.3, "evidence": "no log call found"},
        ],
        verifier_results=[
            {
                "name": "pytest",
                "command": "pytest -q",
                "passed": False,
                "exit_code": 1,
                "duration_s": 3.2,
                "output_tail": "1 failed",
            },
        ],
    )
    step_transition(step=step, to="awaiting_approval")
    values = {"description": "Score 0.62 (yellow): please review.", "evaluation": evaluation}
    values.update(fields)
    return make_approval(step, **values)


def approve_url(approval: ApprovalRequest) -> str:
    return reverse("approval-approve", args=[approval.pk])


def deny_url(approval: ApprovalRequest) -> str:
    return reverse("approval-deny", args=[approval.pk])


# --------------------------------------------------------------------------- who sees what


def test_the_inbox_lists_the_owners_pending_approvals_with_links(client_as, alice):
    approval = waiting_approval(alice)
    response = client_as(alice).get(INBOX)
    assert response.status_code == 200
    assert response.context["nav"] == "approvals"
    html = response.content.decode()
    assert reverse("directive-detail", args=[approval.directive_id]) in html
    assert reverse("step-panel", args=[approval.directive_id, approval.step_id]) in html
    assert "Step review" in html
    assert "Score 0.62 (yellow): please review." in html
    assert approve_url(approval) in html and deny_url(approval) in html


def test_the_inbox_shows_the_evaluation_behind_the_request(client_as, alice):
    waiting_approval(alice)
    html = client_as(alice).get(INBOX).content.decode()
    assert "0.62" in html
    assert "yellow" in html
    assert "Mostly there; the error path is untested." in html
    assert "Errors are logged" in html and "no log call found" in html
    assert "pytest -q" in html and "1 failed" in html


def test_a_teammate_sees_approvals_of_a_shared_directive(client_as, alice, carol, platform):
    approval = waiting_approval(alice, directive_fields={"team": platform})
    assert approve_url(approval) in client_as(carol).get(INBOX).content.decode()


def test_a_stranger_sees_none_of_alices_approvals(client_as, alice, bob):
    approval = waiting_approval(alice)
    response = client_as(bob).get(INBOX)
    assert response.status_code == 200
    assert approve_url(approval) not in response.content.decode()
    assert "Nothing waits for your review" in response.content.decode()


def test_a_stranger_cannot_answer_alices_approval(client_as, alice, bob):
    approval = waiting_approval(alice)
    for url in (approve_url(approval), deny_url(approval)):
        assert client_as(bob).post(url, {"note": "mine now"}).status_code == 404
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.PENDING


def test_anonymous_visitors_are_sent_to_sign_in(client, alice):
    approval = waiting_approval(alice)
    for response in (client.get(INBOX), client.post(approve_url(approval)), client.post(deny_url(approval))):
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.PENDING


def test_answering_needs_a_post(client_as, alice):
    approval = waiting_approval(alice)
    assert client_as(alice).get(approve_url(approval)).status_code == 405


# --------------------------------------------------------------------------- answering


def test_approving_passes_the_step_and_keeps_the_note(client_as, alice):
    approval = waiting_approval(alice)
    response = client_as(alice).post(approve_url(approval), {"note": "Good enough."}, follow=True)
    assert response.redirect_chain[-1][0] == INBOX
    assert "Approved" in response.content.decode()
    approval.refresh_from_db()
    assert (approval.status, approval.response_note, approval.responded_by) == ("approved", "Good enough.", alice)
    assert Step.objects.get(pk=approval.step_id).status == Step.Status.PASSED


def test_a_teammate_can_approve_a_shared_directives_step(client_as, alice, carol, platform):
    approval = waiting_approval(alice, directive_fields={"team": platform})
    client_as(carol).post(approve_url(approval))
    approval.refresh_from_db()
    assert (approval.status, approval.responded_by) == ("approved", carol)


def test_denying_sends_the_step_back_with_the_note_as_rework_instructions(client_as, alice):
    approval = waiting_approval(alice)
    client_as(alice).post(deny_url(approval), {"note": "Log the errors too."})
    approval.refresh_from_db()
    assert (approval.status, approval.response_note) == ("denied", "Log the errors too.")
    step = Step.objects.get(pk=approval.step_id)
    assert step.status == Step.Status.PENDING
    assert (step.rework_count, step.rework_instructions) == (1, "Log the errors too.")


def test_denying_without_a_note_is_refused_next_to_the_field(client_as, alice):
    approval = waiting_approval(alice)
    response = client_as(alice).post(deny_url(approval), {"note": "   "})
    assert response.status_code == 400
    assert "the note becomes the instructions for the rework" in response.content.decode()
    approval.refresh_from_db()
    assert approval.status == ApprovalRequest.Status.PENDING
    assert Step.objects.get(pk=approval.step_id).status == Step.Status.AWAITING_APPROVAL


def test_answering_twice_shows_the_error_and_changes_nothing(client_as, alice):
    approval = waiting_approval(alice)
    client = client_as(alice)
    client.post(approve_url(approval), {"note": "first"})
    response = client.post(approve_url(approval), {"note": "second"}, follow=True)
    assert "already approved by alice" in response.content.decode()
    response = client.post(deny_url(approval), {"note": "changed my mind"}, follow=True)
    assert "already approved by alice; nothing changed" in response.content.decode()
    approval.refresh_from_db()
    assert (approval.status, approval.response_note) == ("approved", "first")
    assert Step.objects.get(pk=approval.step_id).status == Step.Status.PASSED


def test_a_refused_transition_shows_the_services_error_and_changes_nothing(client_as, alice, carol, platform):
    approval = waiting_approval(alice, directive_fields={"team": platform})
    client_as(carol).post(deny_url(approval), {"note": "Needs tests."})
    response = client_as(alice).post(approve_url(approval), {"note": "ship it"}, follow=True)
    html = response.content.decode()
    assert "approval cannot go from &#x27;denied&#x27; to &#x27;approved&#x27;" in html
    assert "already denied by carol; nothing changed" in html
    approval.refresh_from_db()
    assert (approval.status, approval.response_note, approval.responded_by) == ("denied", "Needs tests.", carol)
    assert Step.objects.get(pk=approval.step_id).status == Step.Status.PENDING


def test_an_answer_redirects_back_to_a_safe_next_page_only(client_as, alice):
    first, second = waiting_approval(alice), waiting_approval(alice, directive_fields={"title": "Second"})
    client = client_as(alice)
    here = reverse("directive-detail", args=[first.directive_id])
    assert client.post(approve_url(first), {"next": here})["Location"] == here
    assert client.post(approve_url(second), {"next": "https://evil.example/"})["Location"] == INBOX


def test_approving_a_plan_review_activates_the_directive(client_as, alice):
    directive = make_directive(alice, require_plan_approval=True)
    make_steps(directive, {"name": "A"})
    directive_transition(directive=directive, to="planning")
    from directives.services import approval_request

    approval = approval_request(directive=directive, kind=ApprovalRequest.Kind.PLAN_REVIEW, description="New plan")
    html = client_as(alice).get(INBOX).content.decode()
    assert "Plan review" in html and reverse("directive-chain", args=[directive.pk]) in html
    client_as(alice).post(approve_url(approval))
    directive.refresh_from_db()
    assert directive.status == Directive.Status.ACTIVE


def test_the_answered_tab_lists_answers_with_who_answered(client_as, alice, carol, platform):
    approval = waiting_approval(alice, directive_fields={"team": platform})
    client_as(carol).post(deny_url(approval), {"note": "Needs tests."})
    pending = client_as(alice).get(INBOX).content.decode()
    assert approve_url(approval) not in pending
    answered = client_as(alice).get(INBOX, {"status": "answered"})
    html = answered.content.decode()
    assert answered.context["tab"] == "answered"
    assert "denied" in html and "carol" in html and "Needs tests." in html
    assert approve_url(approval) not in html


# --------------------------------------------------------------------------- escaping and queries


def test_agent_text_in_the_inbox_is_escaped(client_as, alice):
    approval = waiting_approval(alice, description=XSS, feedback=XSS, directive_fields={"title": XSS})
    approval.evaluation.criteria_results = [{"criterion": XSS, "passed": False, "evidence": XSS}]
    approval.evaluation.save(update_fields=["criteria_results"])
    html = client_as(alice).get(INBOX).content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_malformed_evaluation_json_does_not_break_the_page(client_as, alice):
    approval = waiting_approval(alice)
    approval.evaluation.criteria_results = ["just a string", {"score": "high", "passed": "yes"}, 7]
    approval.evaluation.verifier_results = [{"duration_s": "forever", "exit_code": None}, "nope"]
    approval.evaluation.save(update_fields=["criteria_results", "verifier_results"])
    response = client_as(alice).get(INBOX)
    assert response.status_code == 200
    assert "just a string" in response.content.decode()


def test_the_inbox_and_the_step_panel_show_an_evaluation_the_same_way(client_as, alice):
    approval = waiting_approval(alice)
    approval.evaluation.criteria_results.append("a bare sentence")
    approval.evaluation.rework_instructions = "Log the errors."
    approval.evaluation.save(update_fields=["criteria_results", "rework_instructions"])
    client = client_as(alice)
    step = approval.step
    panel = reverse("step-panel", args=[step.directive_id, step.pk])

    def section(html: str) -> str:
        start = html.index('<section class="evaluation"')
        return html[start : html.index("</section>", start)]

    in_inbox = section(client.get(INBOX).content.decode())
    in_panel = section(client.get(panel, headers={"HX-Request": "true"}).content.decode())
    assert in_inbox == in_panel
    for text in ("GET /healthz answers 200", "no log call found", "a bare sentence", "pytest -q", "1 failed"):
        assert text in in_inbox
    assert "Log the errors." in in_inbox


def test_the_inbox_runs_a_constant_number_of_queries(client_as, alice, django_assert_max_num_queries):
    for i in range(32):
        waiting_approval(alice, directive_fields={"title": f"Directive {i}"})
    client = client_as(alice)
    with django_assert_max_num_queries(6):
        response = client.get(INBOX)
    assert response.status_code == 200
    assert len(response.context["approvals"]) == 25
    with django_assert_max_num_queries(6):
        assert client.get(INBOX, {"page": 2}).status_code == 200


def test_the_badge_partial_counts_pending_approvals_the_user_may_see(client_as, alice, bob):
    directive = make_directive(alice)
    [step] = make_steps(directive, {"name": "A"})
    make_approval(step)
    badge = reverse("approval-badge")

    html = client_as(alice).get(badge).content.decode()
    assert 'id="nav-approvals-count"' in html and f'data-live-url="{badge}"' in html
    assert 'id="nav-approvals-badge"' in html and ">1</span>" in html
    assert 'id="nav-approvals-badge"' not in client_as(bob).get(badge).content.decode()
    assert client_as(alice).post(badge).status_code == 405
