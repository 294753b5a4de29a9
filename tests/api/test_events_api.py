"""``GET /directives/{id}/events/?after=<id>``: the directive's event log, oldest first.

The answer is a plain (unpaginated) list of at most ``limit`` events; a client
follows the feed by passing the last id it has seen as ``after``.
"""

from __future__ import annotations

from typing import Any

import pytest

from directives.models import Directive, DirectiveEvent
from directives.services import directive_start, event_record
from makima.state import SYSTEM
from tests.factories import make_directive, make_steps


@pytest.fixture
def client(api_as, alice):
    return api_as(alice)


@pytest.fixture
def directive(alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"})
    directive_start(directive=directive, actor=SYSTEM)
    return directive


def events(client: Any, directive: Directive, query: str = "") -> Any:
    return client.get(f"/api/v1/directives/{directive.pk}/events/{query}")


def test_events_are_listed_oldest_first(client, directive):
    response = events(client, directive)
    assert response.status_code == 200
    rows = response.json()
    ids = [row["id"] for row in rows]
    assert ids == sorted(ids)
    assert ids == list(DirectiveEvent.objects.filter(directive=directive).order_by("id").values_list("id", flat=True))
    assert [row["event_type"] for row in rows][:2] == ["directive_created", "chain_created"]
    assert rows[-1]["event_type"] == "directive_active"
    assert {"id", "directive", "step", "event_type", "severity", "data", "actor_type", "actor", "created_at"} <= set(
        rows[0]
    )


def test_after_returns_only_newer_events_oldest_first(client, directive):
    last = events(client, directive).json()[-1]["id"]
    assert events(client, directive, f"?after={last}").json() == []
    first = event_record(directive_id=directive.pk, event_type="note", message="one")
    second = event_record(directive_id=directive.pk, event_type="note", message="two", severity="warn")
    rows = events(client, directive, f"?after={last}").json()
    assert [row["id"] for row in rows] == [first.pk, second.pk]
    assert [row["message"] for row in rows] == ["one", "two"]
    assert [row["id"] for row in events(client, directive, f"?after={first.pk}").json()] == [second.pk]


def test_events_of_other_directives_are_left_out(client, alice, directive):
    other = make_directive(alice, title="Other")
    rows = events(client, directive, "?after=0").json()
    assert rows
    assert {row["directive"] for row in rows} == {str(directive.pk)}
    assert not any(row["id"] == other.events.get().pk for row in rows)


def test_events_can_be_filtered_by_severity(client, directive):
    warning = event_record(directive_id=directive.pk, event_type="breaker", severity="warn")
    event_record(directive_id=directive.pk, event_type="boom", severity="error")
    assert [row["id"] for row in events(client, directive, "?severity=warn").json()] == [warning.pk]


def test_limit_caps_the_number_of_events_and_the_feed_pages_with_after(client, directive):
    for n in range(5):
        event_record(directive_id=directive.pk, event_type="note", message=str(n))
    all_ids = [row["id"] for row in events(client, directive).json()]
    first_page = events(client, directive, "?limit=3").json()
    assert [row["id"] for row in first_page] == all_ids[:3]
    second_page = events(client, directive, f"?limit=3&after={first_page[-1]['id']}").json()
    assert [row["id"] for row in second_page] == all_ids[3:6]


@pytest.mark.parametrize(
    ("query", "field"),
    [("?after=yesterday", "after"), ("?after=-1", "after"), ("?severity=loud", "severity"), ("?limit=0", "limit")],
)
def test_bad_event_parameters_are_a_400(client, directive, query, field):
    response = events(client, directive, query)
    assert response.status_code == 400
    assert field in response.json()["errors"]


def test_a_team_member_follows_the_events_of_a_shared_directive(api_as, carol, alice, platform):
    directive = make_directive(alice, team=platform)
    rows = events(api_as(carol), directive).json()
    assert [row["event_type"] for row in rows] == ["directive_created"]
