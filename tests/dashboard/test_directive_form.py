"""The new / edit directive form."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from directives.models import Directive, GoalHistory
from directives.services import directive_start
from makima.state import SYSTEM
from tests.factories import make_directive, make_steps, make_team

pytestmark = pytest.mark.django_db

CREATE = reverse("directive-create")
SCRIPT = "<script>alert(1)</script>"


def edit_url(directive: Directive) -> str:
    return reverse("directive-edit", args=[directive.pk])


def form_data(**overrides: Any) -> dict[str, Any]:
    """What a browser posts for a directive with every field filled in sensibly."""
    data: dict[str, Any] = {
        "title": "Add a health endpoint",
        "goal": "Expose /healthz returning 200.",
        "requirements": "Answer 200 when up\nAnswer 503 when the database is down",
        "acceptance_criteria": "GET /healthz answers 200",
        "constraints": "No new dependencies",
        "repository_url": "https://github.com/acme/api.git",
        "base_branch": "main",
        "local_path": "",
        "team": "",
        "autonomy_level": "guided",
        "confidence_threshold_green": "0.8",
        "confidence_threshold_yellow": "0.5",
        "max_rework_cycles": "3",
        "evaluation_mode": "both",
        "verifiers": "pytest -q\nruff check .",
        "agent": "claude",
        "max_total_cost_usd": "5.00",
        "max_wall_time_minutes": "",
        "max_chain_regenerations": "2",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def data_of(directive: Directive, **overrides: Any) -> dict[str, Any]:
    """The edit form as the browser would post it back, unchanged but for ``overrides``."""
    from directives.forms import DirectiveForm

    initial = DirectiveForm.initial_from(directive)
    data = {k: ("" if v is None else v) for k, v in initial.items()}
    for flag in ("fail_closed", "require_plan_approval"):
        if data.pop(flag):
            data[flag] = "on"
    data.update(overrides)
    return data


def active_directive(owner, **fields: Any) -> Directive:
    directive = make_directive(owner, **fields)
    make_steps(directive, {"name": "A"})
    directive.refresh_from_db()
    directive_start(directive=directive, actor=SYSTEM)
    directive.refresh_from_db()
    assert directive.status == Directive.Status.ACTIVE
    return directive


def texts(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


# --------------------------------------------------------------------------- permissions


def test_an_anonymous_visitor_is_sent_to_sign_in_from_both_forms(client, alice):
    directive = make_directive(alice)
    for url in (CREATE, edit_url(directive)):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))
    response = client.post(CREATE, form_data())
    assert response.status_code == 302
    assert not Directive.objects.filter(title="Add a health endpoint").exclude(pk=directive.pk).exists()


def test_a_stranger_gets_404_on_the_edit_form_and_changes_nothing(client_as, alice, bob):
    directive = make_directive(alice, title="Alice's")
    client = client_as(bob)
    assert client.get(edit_url(directive)).status_code == 404
    assert client.post(edit_url(directive), form_data(title="Bob's now")).status_code == 404
    directive.refresh_from_db()
    assert directive.title == "Alice's"


def test_a_teammate_may_edit_a_shared_directive_but_not_its_team(client_as, alice, carol, platform):
    make_team("carols-friends", carol)
    directive = make_directive(alice, team=platform)
    client = client_as(carol)
    page = client.get(edit_url(directive))
    assert page.status_code == 200
    assert page.context["form"].fields["team"].disabled
    response = client.post(edit_url(directive), data_of(directive, title="Better title", team=""))
    assert response.status_code == 302
    directive.refresh_from_db()
    assert directive.title == "Better title"
    assert directive.team == platform


def test_a_teammate_gets_404_for_a_private_directive(client_as, alice, carol):
    directive = make_directive(alice)
    assert client_as(carol).get(edit_url(directive)).status_code == 404


# --------------------------------------------------------------------------- create


def test_the_create_form_offers_only_the_users_own_teams(client_as, alice, bob, platform):
    make_team("bobs-team", bob)
    response = client_as(alice).get(CREATE)
    assert response.status_code == 200
    assert response.context["nav"] == "directives"
    teams = [team.name for team in response.context["form"].fields["team"].queryset]
    assert teams == ["platform"]


def test_a_valid_form_creates_a_draft_and_opens_its_page(client_as, alice, platform):
    response = client_as(alice).post(CREATE, form_data(team=str(platform.pk)))
    directive = Directive.objects.get(title="Add a health endpoint")
    assert response.status_code == 302
    assert response["Location"] == reverse("directive-detail", args=[directive.pk])
    assert directive.owner == alice
    assert directive.team == platform
    assert directive.status == Directive.Status.DRAFT
    assert directive.requirements == [
        {"id": "R1", "description": "Answer 200 when up"},
        {"id": "R2", "description": "Answer 503 when the database is down"},
    ]
    assert directive.acceptance_criteria == [{"id": "AC1", "criterion": "GET /healthz answers 200"}]
    assert directive.constraints == ["No new dependencies"]
    assert directive.verifiers == ["pytest -q", "ruff check ."]
    assert directive.max_total_cost_usd == Decimal("5.00")
    assert directive.max_wall_time_minutes is None
    assert directive.max_chain_regenerations == 2
    assert directive.events.filter(event_type="directive_created").exists()


def test_creating_with_add_steps_by_hand_opens_the_chain_editor(client_as, alice):
    response = client_as(alice).post(CREATE, form_data(next="chain"))
    directive = Directive.objects.get(title="Add a health endpoint")
    assert response["Location"] == reverse("directive-chain", args=[directive.pk])


def test_auto_verifiers_are_stored_as_auto(client_as, alice):
    client_as(alice).post(CREATE, form_data(verifiers="auto"))
    assert Directive.objects.get().verifiers == "auto"


def test_an_empty_title_is_refused_next_to_the_field_and_nothing_is_created(client_as, alice):
    response = client_as(alice).post(CREATE, form_data(title="  "))
    assert response.status_code == 200
    assert "title" in response.context["form"].errors
    assert 'id="id_title_error"' in response.content.decode()
    assert not Directive.objects.exists()


def test_a_yellow_threshold_above_green_is_refused_by_the_service_next_to_the_field(client_as, alice):
    response = client_as(alice).post(
        CREATE, form_data(confidence_threshold_green="0.6", confidence_threshold_yellow="0.7")
    )
    assert response.status_code == 200
    errors = response.context["form"].errors
    assert errors["confidence_threshold_yellow"] == ["must not be above the green threshold (0.6)"]
    assert "must not be above the green threshold" in response.content.decode()
    assert not Directive.objects.exists()


def test_auto_mixed_with_commands_is_refused_next_to_the_verifiers(client_as, alice):
    response = client_as(alice).post(CREATE, form_data(verifiers="auto\npytest"))
    assert "verifiers" in response.context["form"].errors
    assert not Directive.objects.exists()


def test_a_team_the_user_is_not_in_is_refused(client_as, alice, bob):
    other = make_team("bobs-team", bob)
    response = client_as(alice).post(CREATE, form_data(team=str(other.pk)))
    assert "team" in response.context["form"].errors
    assert not Directive.objects.exists()


def test_negative_limits_and_thresholds_out_of_range_are_refused(client_as, alice):
    response = client_as(alice).post(
        CREATE, form_data(max_total_cost_usd="-1", confidence_threshold_green="1.5", max_rework_cycles="")
    )
    errors = response.context["form"].errors
    assert {"max_total_cost_usd", "confidence_threshold_green", "max_rework_cycles"} <= set(errors)
    assert not Directive.objects.exists()


@pytest.mark.parametrize(
    "branch", ["../../etc", "--upload-pack=touch x", "feature branch", "a..b", "main.lock", "HEAD"]
)
def test_a_base_branch_git_would_refuse_or_read_as_an_option_is_refused_as_the_api_does(client_as, alice, branch):
    response = client_as(alice).post(CREATE, form_data(base_branch=branch))
    assert response.status_code == 200
    assert response.context["form"].errors["base_branch"] == [
        "Not a git branch name: no spaces, '..', '~^:?*[\\', '@{', leading '-' or '.', trailing '/' or '.'."
    ]
    assert not Directive.objects.exists()


def test_a_nested_base_branch_is_accepted(client_as, alice):
    client_as(alice).post(CREATE, form_data(base_branch="release/2.1"))
    assert Directive.objects.get().base_branch == "release/2.1"


# --------------------------------------------------------------------------- edit


def test_the_edit_form_lists_requirements_and_criteria_one_per_line(client_as, alice):
    directive = make_directive(alice, requirements=["First", "Second"], verifiers=["pytest"])
    form = client_as(alice).get(edit_url(directive)).context["form"]
    assert form.initial["requirements"] == "First\nSecond"
    assert form.initial["acceptance_criteria"] == "GET /healthz answers 200"
    assert form.initial["verifiers"] == "pytest"


def test_editing_keeps_the_ids_of_unchanged_requirements(client_as, alice):
    directive = make_directive(
        alice, requirements=[{"id": "perf", "description": "Fast"}, {"id": "R1", "description": "Correct"}]
    )
    response = client_as(alice).post(edit_url(directive), data_of(directive, requirements="Correct\nNew one\nFast"))
    assert response.status_code == 302
    directive.refresh_from_db()
    assert directive.requirements == [
        {"id": "R1", "description": "Correct"},
        {"id": "R2", "description": "New one"},
        {"id": "perf", "description": "Fast"},
    ]


def test_a_valid_edit_saves_and_returns_to_the_directive(client_as, alice):
    directive = make_directive(alice)
    response = client_as(alice).post(edit_url(directive), data_of(directive, title="Renamed", fail_closed="on"))
    assert response["Location"] == reverse("directive-detail", args=[directive.pk])
    directive.refresh_from_db()
    assert directive.title == "Renamed"
    assert directive.fail_closed is True
    assert texts(response) == ["Saved."]
    assert not GoalHistory.objects.exists()


def test_an_invalid_base_branch_in_an_edit_changes_nothing(client_as, alice):
    directive = make_directive(alice, title="Original")
    response = client_as(alice).post(edit_url(directive), data_of(directive, title="Renamed", base_branch="-x"))
    assert "base_branch" in response.context["form"].errors
    directive.refresh_from_db()
    assert (directive.title, directive.base_branch) == ("Original", "main")


def test_an_invalid_edit_changes_nothing(client_as, alice):
    directive = make_directive(alice, title="Original")
    response = client_as(alice).post(
        edit_url(directive), data_of(directive, title="Renamed", confidence_threshold_yellow="0.95")
    )
    assert response.status_code == 200
    assert "confidence_threshold_yellow" in response.context["form"].errors
    directive.refresh_from_db()
    assert directive.title == "Original"


def test_the_goal_field_warns_that_a_new_goal_re_plans_an_active_directive(client_as, alice):
    directive = active_directive(alice)
    html = client_as(alice).get(edit_url(directive)).content.decode()
    assert 'id="goal-replan-note"' in html
    assert "Changing the goal re-plans" in html


def test_a_draft_has_no_re_planning_warning(client_as, alice):
    directive = make_directive(alice)
    assert 'id="goal-replan-note"' not in client_as(alice).get(edit_url(directive)).content.decode()


def test_a_new_goal_on_an_active_directive_starts_re_planning(client_as, alice):
    directive = active_directive(alice, goal="Old goal")
    response = client_as(alice).post(edit_url(directive), data_of(directive, goal="New goal"))
    assert response.status_code == 302
    directive.refresh_from_db()
    assert directive.goal == "New goal"
    assert directive.status == Directive.Status.PLANNING
    assert directive.planning_reason == Directive.PlanningReason.REPLAN
    assert list(GoalHistory.objects.filter(directive=directive).values_list("previous_goal", flat=True)) == ["Old goal"]
    assert texts(response) == ["Saved. The goal changed, so re-planning started."]


def test_other_edits_of_an_active_directive_do_not_re_plan(client_as, alice):
    directive = active_directive(alice)
    client_as(alice).post(edit_url(directive), data_of(directive, title="Renamed"))
    directive.refresh_from_db()
    assert directive.status == Directive.Status.ACTIVE
    assert not GoalHistory.objects.exists()


def test_a_failed_directive_cannot_be_edited(client_as, alice):
    directive = make_directive(alice, title="Original")
    Directive.objects.filter(pk=directive.pk).update(status=Directive.Status.FAILED)
    client = client_as(alice)
    response = client.post(edit_url(directive), data_of(directive, title="Renamed"))
    assert response.status_code == 302
    assert texts(response) == ["A failed directive cannot be edited."]
    directive.refresh_from_db()
    assert directive.title == "Original"


def test_a_hostile_title_is_escaped_in_the_edit_form(client_as, alice):
    directive = make_directive(alice, title=SCRIPT, goal="<img src=x onerror=alert(1)>")
    html = client_as(alice).get(edit_url(directive)).content.decode()
    assert SCRIPT not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
