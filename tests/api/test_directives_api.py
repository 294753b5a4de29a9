"""Creating, reading, filtering and editing directives through the REST API."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from directives.models import Directive, DirectiveEvent, GoalHistory
from directives.services import directive_start, directive_stop, directive_transition, step_transition
from makima.state import SYSTEM
from tests.factories import make_directive, make_steps, make_team

URL = "/api/v1/directives/"

SPEC_FIELDS = {
    "id",
    "owner",
    "team",
    "title",
    "goal",
    "requirements",
    "acceptance_criteria",
    "constraints",
    "repository_url",
    "base_branch",
    "local_path",
    "status",
    "autonomy_level",
    "confidence_threshold_green",
    "confidence_threshold_yellow",
    "max_rework_cycles",
    "evaluation_mode",
    "verifiers",
    "agent",
    "fail_closed",
    "require_plan_approval",
    "max_total_cost_usd",
    "max_wall_time_minutes",
    "max_chain_regenerations",
    "total_cost_usd",
    "started_at",
    "chain_generation_count",
    "current_chain",
    "orchestrator_task",
    "completion_task",
    "pr_branch",
    "pr_url",
    "goal_updated_at",
    "created_at",
    "updated_at",
}


@pytest.fixture
def client(api_as, alice):
    return api_as(alice)


def detail(directive: Directive) -> str:
    return f"{URL}{directive.pk}/"


def patch(client: Any, directive: Directive, body: Any) -> Any:
    return client.patch(detail(directive), body, format="json")


def snapshot(directive: Directive) -> dict[str, Any]:
    """Everything a refused request must leave alone."""
    fresh = Directive.objects.get(pk=directive.pk)
    return {
        "row": {f.attname: getattr(fresh, f.attname) for f in Directive._meta.concrete_fields},
        "events": DirectiveEvent.objects.filter(directive=directive).count(),
        "goals": GoalHistory.objects.filter(directive=directive).count(),
    }


# --------------------------------------------------------------------------- create


def test_creating_a_directive_makes_a_draft_owned_by_the_requester(client, alice):
    body = {
        "title": "Add a health endpoint",
        "goal": "Expose /healthz.",
        "requirements": ["Answer 200", {"id": "R9", "description": "Be fast"}],
        "acceptance_criteria": ["GET /healthz is 200"],
        "constraints": ["No new dependencies"],
        "repository_url": "https://github.com/acme/app.git",
        "autonomy_level": "full_auto",
        "confidence_threshold_green": 0.9,
        "confidence_threshold_yellow": 0.6,
        "evaluation_mode": "verifiers",
        "verifiers": ["pytest -q"],
        "agent": "scripted",
        "max_total_cost_usd": "12.5",
    }
    response = client.post(URL, body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert data["owner"] == "alice"
    assert data["status"] == "draft"
    assert data["base_branch"] == "main"
    assert data["requirements"] == [{"id": "R1", "description": "Answer 200"}, {"id": "R9", "description": "Be fast"}]
    assert data["acceptance_criteria"] == [{"id": "AC1", "criterion": "GET /healthz is 200"}]
    assert data["max_total_cost_usd"] == "12.5000"
    directive = Directive.objects.get(pk=data["id"])
    assert directive.owner == alice
    assert DirectiveEvent.objects.filter(directive=directive, event_type="directive_created").count() == 1


def test_a_directive_lists_every_field_of_the_spec_and_its_step_counts(client, alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"}, {"name": "B"}, {"name": "C"})
    step_transition(step=directive.steps.get(name="A"), to="skipped")
    data = client.get(detail(directive)).json()
    assert set(data) >= SPEC_FIELDS
    assert data["step_counts"]["total"] == 3
    assert data["step_counts"]["pending"] == 2
    assert data["step_counts"]["skipped"] == 1
    assert data["step_counts"]["running"] == 0


def test_step_counts_leave_out_superseded_chains(client, alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"}, {"name": "B"})
    directive_start(directive=directive, actor=SYSTEM)
    step_transition(step=directive.steps.get(name="A"), to="ready")
    client.post(f"{detail(directive)}regenerate/")
    assert client.get(detail(directive)).json()["step_counts"]["total"] == 0


def test_a_directive_can_be_shared_with_a_team_of_the_owner(client, platform):
    response = client.post(URL, {"title": "T", "goal": "G", "team": platform.pk}, format="json")
    assert response.status_code == 201
    assert (response.json()["team"], response.json()["team_name"]) == (platform.pk, "platform")


def test_a_directive_cannot_be_shared_with_a_team_the_owner_is_not_in(client, bob):
    bobs_team = make_team("bob-only", bob)
    response = client.post(URL, {"title": "T", "goal": "G", "team": bobs_team.pk}, format="json")
    assert response.status_code == 400
    assert "not a member" in response.json()["errors"]["team"][0]
    assert not Directive.objects.exists()


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"goal": "G"}, "title", "required"),
        ({"title": "   ", "goal": "G"}, "title", "blank"),
        ({"title": "T", "goal": "G", "confidence_threshold_green": 1.5}, "confidence_threshold_green", "1"),
        ({"title": "T", "goal": "G", "confidence_threshold_yellow": -0.1}, "confidence_threshold_yellow", "0"),
        (
            {"title": "T", "goal": "G", "confidence_threshold_green": 0.4, "confidence_threshold_yellow": 0.6},
            "confidence_threshold_yellow",
            "green threshold",
        ),
        ({"title": "T", "goal": "G", "confidence_threshold_yellow": 0.9}, "confidence_threshold_yellow", "green"),
        ({"title": "T", "goal": "G", "max_rework_cycles": -1}, "max_rework_cycles", "greater than or equal to 0"),
        ({"title": "T", "goal": "G", "max_total_cost_usd": "-5"}, "max_total_cost_usd", "greater than or equal"),
        ({"title": "T", "goal": "G", "max_wall_time_minutes": -10}, "max_wall_time_minutes", "greater than"),
        ({"title": "T", "goal": "G", "max_chain_regenerations": "many"}, "max_chain_regenerations", "integer"),
        ({"title": "T", "goal": "G", "requirements": "do it"}, "requirements", "list"),
        ({"title": "T", "goal": "G", "requirements": [{"text": "x"}]}, "requirements", "description"),
        ({"title": "T", "goal": "G", "constraints": [{"no": 1}]}, "constraints", "string"),
        ({"title": "T", "goal": "G", "verifiers": "run the tests"}, "verifiers", "list of commands"),
        ({"title": "T", "goal": "G", "autonomy_level": "yolo"}, "autonomy_level", "valid choice"),
        ({"title": "T", "goal": "G", "fail_closed": "perhaps"}, "fail_closed", "boolean"),
        ({"title": "T", "goal": "G", "colour": "blue"}, "colour", "Unknown field"),
        ({"title": "T", "goal": "G", "status": "active"}, "status", "read-only"),
        ({"title": "T", "goal": "G", "total_cost_usd": "0"}, "total_cost_usd", "read-only"),
        (["title", "goal"], "non_field_errors", "dictionary"),
    ],
)
def test_bad_directive_input_is_a_400_naming_the_field_and_creates_nothing(client, body, field, words):
    response = client.post(URL, body, format="json")
    assert response.status_code == 400, response.content
    data = response.json()
    assert field in data["errors"]
    assert words in str(data["errors"][field])
    assert data["detail"]
    assert not Directive.objects.exists()


def test_malformed_json_is_a_400_and_creates_nothing(client):
    response = client.post(URL, '{"title": "T", "goal": ', content_type="application/json")
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]
    assert not Directive.objects.exists()


# --------------------------------------------------------------------------- list and filters


def test_listing_directives_filters_by_status_and_team(client, alice, platform):
    draft = make_directive(alice, title="Draft")
    shared = make_directive(alice, title="Shared", team=platform)
    directive_stop(directive=shared, actor=SYSTEM)

    def titles(query: str) -> list[str]:
        return sorted(row["title"] for row in client.get(URL + query).json()["results"])

    assert titles("") == ["Draft", "Shared"]
    assert titles("?status=draft") == ["Draft"]
    assert titles("?status=draft&status=failed") == ["Draft", "Shared"]
    assert titles(f"?team={platform.pk}") == ["Shared"]
    assert draft.pk


@pytest.mark.parametrize("query", ["?status=sleeping", "?team=platform"])
def test_an_invalid_filter_is_a_400(client, alice, query):
    make_directive(alice)
    response = client.get(URL + query)
    assert response.status_code == 400
    assert response.json()["errors"]


def test_listing_directives_is_paginated_newest_first(client, alice):
    for n in range(3):
        make_directive(alice, title=f"D{n}")
    data = client.get(URL + "?page_size=2").json()
    assert data["count"] == 3
    assert [row["title"] for row in data["results"]] == ["D2", "D1"]
    assert data["next"]


def test_listing_directives_takes_the_same_number_of_queries_for_5_or_30(client, alice, platform):
    def count_queries() -> int:
        with CaptureQueriesContext(connection) as queries:
            assert client.get(URL).status_code == 200
        return len(queries)

    def add(n: int) -> None:
        for i in range(n):
            directive = make_directive(alice, title=f"D{Directive.objects.count()}", team=platform if i % 2 else None)
            make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]})

    add(5)
    few = count_queries()
    add(25)
    assert Directive.objects.count() == 30
    assert count_queries() == few


# --------------------------------------------------------------------------- PATCH


def test_patching_the_goal_records_the_previous_goal(client, alice):
    directive = make_directive(alice, goal="Old goal")
    response = patch(client, directive, {"goal": "New goal"})
    assert response.status_code == 200
    assert response.json()["goal"] == "New goal"
    assert response.json()["goal_updated_at"]
    assert list(GoalHistory.objects.filter(directive=directive).values_list("previous_goal", flat=True)) == ["Old goal"]
    assert DirectiveEvent.objects.filter(directive=directive, event_type="goal_updated").exists()


def test_a_new_goal_sends_a_completed_directive_back_to_planning(client, alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"})
    directive_start(directive=directive, actor=SYSTEM)
    directive_transition(directive=directive, to="completing")
    directive_transition(directive=directive, to="completed")
    response = patch(client, directive, {"goal": "Also add /readyz"})
    assert response.status_code == 200
    assert response.json()["status"] == "planning"


def test_patching_pr_url_records_the_pull_request(client, alice):
    directive = make_directive(alice)
    url = "https://github.com/acme/app/pull/12"
    response = patch(client, directive, {"pr_url": url, "pr_branch": "makima/directive-x"})
    assert response.status_code == 200
    assert (response.json()["pr_url"], response.json()["pr_branch"]) == (url, "makima/directive-x")
    event = DirectiveEvent.objects.get(directive=directive, event_type="pr_recorded")
    assert event.data == {"pr_url": url, "pr_branch": "makima/directive-x"}


def test_a_pr_url_that_is_not_a_url_is_a_400(client, alice):
    directive = make_directive(alice)
    before = snapshot(directive)
    response = patch(client, directive, {"pr_url": "see the branch"})
    assert response.status_code == 400
    assert "pr_url" in response.json()["errors"]
    assert snapshot(directive) == before


def test_status_completed_is_accepted_from_completing(client, alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"})
    directive_start(directive=directive, actor=SYSTEM)
    directive_transition(directive=directive, to="completing")
    response = patch(client, directive, {"status": "completed"})
    assert response.status_code == 200
    assert response.json()["status"] == "completed"
    assert DirectiveEvent.objects.filter(directive=directive, event_type="directive_completed").exists()


def test_status_completed_is_refused_with_409_from_any_other_state(client, alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"})
    directive_start(directive=directive, actor=SYSTEM)
    before = snapshot(directive)
    response = patch(client, directive, {"status": "completed", "title": "Should not stick"})
    assert response.status_code == 409
    assert response.json()["detail"] == "directive cannot go from 'active' to 'completed'"
    assert snapshot(directive) == before


@pytest.mark.parametrize("value", ["active", "paused", "failed", "archived", "nonsense"])
def test_any_other_status_in_a_patch_is_a_400_pointing_to_the_actions(client, alice, value):
    directive = make_directive(alice)
    before = snapshot(directive)
    response = patch(client, directive, {"status": value})
    assert response.status_code == 400
    message = response.json()["errors"]["status"][0]
    assert 'only accepts "completed"' in message
    assert "actions" in message
    assert snapshot(directive) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"confidence_threshold_yellow": 0.95}, "confidence_threshold_yellow"),
        ({"confidence_threshold_green": 2}, "confidence_threshold_green"),
        ({"max_rework_cycles": -3}, "max_rework_cycles"),
        ({"title": ""}, "title"),
        ({"goal": 42, "requirements": {"a": 1}}, "requirements"),
        ({"owner": "bob"}, "owner"),
        ({"current_chain": None}, "current_chain"),
    ],
)
def test_bad_patches_are_a_400_and_change_nothing(client, alice, body, field):
    directive = make_directive(alice)
    before = snapshot(directive)
    response = patch(client, directive, body)
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"]
    assert snapshot(directive) == before


def test_a_failed_directive_cannot_be_edited(client, alice):
    directive = make_directive(alice)
    directive_stop(directive=directive, actor=SYSTEM)
    before = snapshot(directive)
    response = patch(client, directive, {"title": "Too late"})
    assert response.status_code == 409
    assert "cannot be edited" in response.json()["detail"]
    assert snapshot(directive) == before


def test_the_owner_can_share_and_unshare_a_directive(client, alice, platform):
    directive = make_directive(alice)
    assert patch(client, directive, {"team": platform.pk}).json()["team"] == platform.pk
    assert patch(client, directive, {"team": None}).json()["team"] is None


def test_a_team_member_may_steer_but_not_reshare_a_shared_directive(api_as, carol, alice, platform):
    make_team("carols-friends", carol)
    directive = make_directive(alice, team=platform)
    member = api_as(carol)
    assert patch(member, directive, {"title": "Better title"}).status_code == 200
    response = patch(member, directive, {"team": None})
    assert response.status_code == 403
    assert "owner" in response.json()["detail"]
    directive.refresh_from_db()
    assert directive.team == platform


def test_put_and_delete_are_not_offered_on_directives(client, alice):
    directive = make_directive(alice)
    assert client.put(detail(directive), {"title": "T", "goal": "G"}, format="json").status_code == 405
    assert client.delete(detail(directive)).status_code == 405
    assert Directive.objects.filter(pk=directive.pk).exists()
