"""The directive list: the dashboard's home page."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from directives.models import Directive, Step
from directives.services import event_record
from tests.factories import make_directive, make_steps, make_team

pytestmark = pytest.mark.django_db

LIST = reverse("directive-list")
SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"


def set_statuses(directive: Directive, **by_name: str) -> None:
    for name, status in by_name.items():
        Step.objects.filter(directive=directive, name=name).update(status=status)


def test_an_anonymous_visitor_is_sent_to_sign_in(client):
    response = client.get(LIST)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_the_owner_sees_her_directives_with_a_link_to_each(client_as, alice):
    directive = make_directive(alice, title="Add a health endpoint")
    response = client_as(alice).get(LIST)
    assert response.status_code == 200
    assert response.context["nav"] == "directives"
    html = response.content.decode()
    assert "Add a health endpoint" in html
    assert reverse("directive-detail", args=[directive.pk]) in html
    assert 'class="status status-draft"' in html


def test_a_stranger_sees_none_of_alices_directives(client_as, alice, bob):
    make_directive(alice, title="Alice's private work")
    html = client_as(bob).get(LIST).content.decode()
    assert "Alice&#x27;s private work" not in html
    assert "No directives yet" in html


def test_a_teammate_sees_shared_directives_but_not_private_ones(client_as, alice, carol, platform):
    make_directive(alice, title="Shared with the team", team=platform)
    make_directive(alice, title="Kept private")
    html = client_as(carol).get(LIST).content.decode()
    assert "Shared with the team" in html
    assert "Kept private" not in html


def test_the_progress_bar_counts_the_steps_by_status(client_as, alice):
    directive = make_directive(alice)
    make_steps(directive, *({"name": n} for n in "ABCDEF"))
    set_statuses(directive, A="passed", B="passed", C="passed", D="running")
    html = client_as(alice).get(LIST).content.decode()
    assert "3 passed, 1 running, 2 pending of 6" in html
    assert 'class="seg-passed" style="width: 50.00%" title="3 passed"' in html
    assert 'class="seg-running"' in html
    assert 'class="visually-hidden">3 passed, 1 running, 2 pending of 6<' in html


def test_steps_of_a_superseded_chain_are_not_counted(client_as, alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "Old"})
    directive.refresh_from_db()
    directive.current_chain.status = "superseded"
    directive.current_chain.save()
    html = client_as(alice).get(LIST).content.decode()
    assert "No steps yet" in html


def test_cost_is_shown_against_its_limit_or_as_unlimited(client_as, alice):
    make_directive(alice, title="Limited", max_total_cost_usd=Decimal("5"))
    Directive.objects.filter(title="Limited").update(total_cost_usd=Decimal("1.2"))
    make_directive(alice, title="Unlimited")
    html = client_as(alice).get(LIST).content.decode()
    assert "$1.20 / $5.00" in html
    assert '$0.00 / <span class="muted">no limit</span>' in html


def test_the_newest_event_of_each_directive_is_shown(client_as, alice):
    directive = make_directive(alice)
    event_record(directive_id=directive.pk, event_type="directive_paused", message="Paused: cost limit reached")
    html = client_as(alice).get(LIST).content.decode()
    assert "Paused: cost limit reached" in html


def test_an_event_without_a_message_shows_its_type(client_as, alice):
    make_directive(alice)  # its newest event is "directive_created"
    assert "directive created" in client_as(alice).get(LIST).content.decode()


def test_titles_and_event_messages_are_escaped(client_as, alice):
    directive = make_directive(alice, title=SCRIPT)
    event_record(directive_id=directive.pk, event_type="note", message=IMG)
    html = client_as(alice).get(LIST).content.decode()
    assert SCRIPT not in html
    assert IMG not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


def test_the_list_filters_by_status(client_as, alice):
    make_directive(alice, title="Still a draft")
    active = make_directive(alice, title="Under way")
    Directive.objects.filter(pk=active.pk).update(status="active")
    html = client_as(alice).get(LIST, {"status": "active"}).content.decode()
    assert "Under way" in html
    assert "Still a draft" not in html


def test_the_list_filters_by_team(client_as, alice, platform):
    make_directive(alice, title="Team work", team=platform)
    make_directive(alice, title="Solo work")
    html = client_as(alice).get(LIST, {"team": platform.pk}).content.decode()
    assert "Team work" in html
    assert "Solo work" not in html


def test_the_team_filter_offers_only_the_users_teams(client_as, alice, bob, platform):
    make_team("bobs-team", bob)
    html = client_as(alice).get(LIST).content.decode()
    assert ">platform</option>" in html
    assert "bobs-team" not in html


def test_a_bad_filter_value_is_ignored_rather_than_failing(client_as, alice):
    make_directive(alice, title="Still listed")
    response = client_as(alice).get(LIST, {"status": "nonsense", "team": "abc", "page": "x"})
    assert response.status_code == 200
    assert "Still listed" in response.content.decode()


def test_no_match_for_the_filters_says_so_with_a_way_back(client_as, alice):
    make_directive(alice)
    html = client_as(alice).get(LIST, {"status": "completed"}).content.decode()
    assert "No directives match these filters" in html


def test_an_empty_list_invites_to_create_a_directive(client_as, alice):
    html = client_as(alice).get(LIST).content.decode()
    assert "No directives yet" in html
    assert f'href="{reverse("directive-create")}"' in html


def test_the_list_has_a_new_directive_button(client_as, alice):
    make_directive(alice)
    assert "New directive</a>" in client_as(alice).get(LIST).content.decode()


def test_the_list_is_paginated_and_page_links_keep_the_filters(client_as, alice):
    for i in range(30):
        make_directive(alice, title=f"Directive {i:02d}")
    client = client_as(alice)
    first = client.get(LIST, {"status": "draft"})
    assert len(first.context["rows"]) == 25
    html = first.content.decode()
    assert "Page 1 of 2" in html
    assert 'href="?status=draft&amp;page=2"' in html
    second = client.get(LIST, {"status": "draft", "page": 2})
    assert len(second.context["rows"]) == 5


def test_the_list_takes_a_constant_number_of_queries(client_as, alice, carol, platform, django_assert_max_num_queries):
    for i in range(32):
        directive = make_directive(alice, title=f"Directive {i}", team=platform if i % 2 else None)
        make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]})
        event_record(directive_id=directive.pk, event_type="note", message=f"note {i}")
    client = client_as(alice)
    with django_assert_max_num_queries(7):
        response = client.get(LIST, {"page": 1})
    assert len(response.context["rows"]) == 25
    assert "note 31" in response.content.decode()
