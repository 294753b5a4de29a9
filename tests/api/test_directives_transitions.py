"""The directive actions: start, pause, resume, stop, replan, regenerate, archive.

Each one changes the status and writes an event; a refused one answers 409
with the reason and leaves the directive and its event log as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from directives.models import Chain, Directive, DirectiveEvent, Step
from directives.services import (
    directive_pause,
    directive_start,
    directive_stop,
    directive_transition,
    directive_update,
)
from makima.state import SYSTEM
from tests.factories import make_directive, make_steps


@pytest.fixture
def client(api_as, alice):
    return api_as(alice)


def planned(owner: Any, **fields: Any) -> Directive:
    """A draft directive with two hand-authored steps."""
    directive = make_directive(owner, **fields)
    make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]})
    directive.refresh_from_db()
    return directive


def started(owner: Any, **fields: Any) -> Directive:
    directive = planned(owner, **fields)
    directive_start(directive=directive, actor=SYSTEM)
    return directive


def paused(owner: Any) -> Directive:
    directive = started(owner)
    directive_pause(directive=directive, actor=SYSTEM)
    return directive


def stopped(owner: Any) -> Directive:
    directive = planned(owner)
    directive_stop(directive=directive, actor=SYSTEM)
    return directive


def completed(owner: Any) -> Directive:
    directive = started(owner)
    directive_transition(directive=directive, to=Directive.Status.COMPLETING)
    directive_transition(directive=directive, to=Directive.Status.COMPLETED)
    return directive


def act(client: Any, directive: Directive, action: str, body: Any = None) -> Any:
    return client.post(f"/api/v1/directives/{directive.pk}/{action}/", body, format="json")


def state(directive: Directive) -> tuple[str, int, int]:
    fresh = Directive.objects.get(pk=directive.pk)
    return fresh.status, fresh.chain_generation_count, DirectiveEvent.objects.filter(directive=directive).count()


SUCCESSES: list[tuple[str, Callable[[Any], Directive], str]] = [
    ("start", planned, "active"),
    ("start", lambda owner: make_directive(owner), "planning"),
    ("pause", started, "paused"),
    ("resume", paused, "active"),
    ("stop", planned, "failed"),
    ("stop", started, "failed"),
    ("replan", started, "planning"),
    ("replan", completed, "planning"),
    ("regenerate", started, "planning"),
    ("archive", stopped, "archived"),
    ("archive", completed, "archived"),
]


@pytest.mark.parametrize(("action", "arrange", "target"), SUCCESSES)
def test_each_action_changes_the_status_and_writes_an_event(client, alice, action, arrange, target):
    directive = arrange(alice)
    response = act(client, directive, action)
    assert response.status_code == 200, response.content
    assert response.json()["status"] == target
    assert Directive.objects.get(pk=directive.pk).status == target
    event = DirectiveEvent.objects.filter(directive=directive).latest("id")
    assert event.event_type == f"directive_{target}"
    assert (event.actor_type, event.actor) == ("user", "alice")


REFUSALS: list[tuple[str, Callable[[Any], Directive], str]] = [
    ("start", started, "directive cannot go from 'active' to 'planning': only a draft can be started"),
    ("start", paused, "directive cannot go from 'paused' to 'active': it was already started; resume it"),
    ("start", stopped, "directive cannot go from 'failed' to 'planning': only a draft can be started"),
    ("pause", planned, "directive cannot go from 'draft' to 'paused'"),
    ("pause", stopped, "directive cannot go from 'failed' to 'paused'"),
    ("resume", started, "directive cannot go from 'active' to 'active': only a paused directive can resume"),
    ("resume", planned, "directive cannot go from 'draft' to 'active': only a paused directive can resume"),
    ("stop", completed, "directive cannot go from 'completed' to 'failed'"),
    ("replan", planned, "only an active, paused or completed directive re-plans"),
    ("regenerate", planned, "only an active, paused or completed directive regenerates"),
    ("archive", started, "directive cannot go from 'active' to 'archived'"),
]


@pytest.mark.parametrize(("action", "arrange", "message"), REFUSALS)
def test_an_invalid_transition_is_a_409_with_the_reason_and_changes_nothing(client, alice, action, arrange, message):
    directive = arrange(alice)
    before = state(directive)
    response = act(client, directive, action)
    assert response.status_code == 409, response.content
    assert message in response.json()["detail"]
    assert state(directive) == before


def test_a_repeated_stop_is_a_no_op(client, alice):
    directive = stopped(alice)
    before = state(directive)
    response = act(client, directive, "stop")
    assert response.status_code == 200
    assert state(directive) == before


def test_pause_and_stop_keep_the_reason_in_the_event_log(client, alice):
    directive = started(alice)
    assert act(client, directive, "pause", {"reason": "Waiting for the API keys"}).status_code == 200
    assert DirectiveEvent.objects.get(directive=directive, event_type="directive_paused").message == (
        "Waiting for the API keys"
    )
    assert act(client, directive, "stop", {"reason": "Not needed any more"}).status_code == 200
    assert DirectiveEvent.objects.get(directive=directive, event_type="directive_failed").message == (
        "Not needed any more"
    )


def test_a_reason_of_the_wrong_type_is_a_400(client, alice):
    directive = started(alice)
    before = state(directive)
    response = act(client, directive, "pause", {"reason": ["a", "list"]})
    assert response.status_code == 400
    assert "reason" in response.json()["errors"]
    assert state(directive) == before


def test_regenerating_supersedes_the_chain_and_skips_its_open_steps(client, alice):
    directive = started(alice)
    chain = directive.current_chain
    response = act(client, directive, "regenerate")
    assert response.status_code == 200
    assert response.json()["chain_generation_count"] == 1
    assert response.json()["current_chain"] is None
    assert Chain.objects.get(pk=chain.pk).status == Chain.Status.SUPERSEDED
    assert set(Step.objects.filter(directive=directive).values_list("status", flat=True)) == {"skipped"}


def test_regenerating_past_the_limit_is_a_409(client, alice):
    directive = started(alice, max_chain_regenerations=1)
    assert act(client, directive, "regenerate").status_code == 200
    directive_update(directive=directive, actor=SYSTEM, goal="A new goal")
    Directive.objects.filter(pk=directive.pk).update(status=Directive.Status.PAUSED)
    before = state(directive)
    response = act(client, directive, "regenerate")
    assert response.status_code == 409
    assert response.json()["detail"] == "max_chain_regenerations reached (1 of 1)"
    assert state(directive) == before


def test_a_team_member_can_steer_a_shared_directive(api_as, carol, alice, platform):
    directive = started(alice, team=platform)
    assert act(api_as(carol), directive, "pause").status_code == 200
    event = DirectiveEvent.objects.filter(directive=directive).latest("id")
    assert (event.event_type, event.actor) == ("directive_paused", "carol")
