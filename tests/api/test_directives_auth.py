"""Bearer authentication on the directives API, and what a task token may touch.

A task token (an agent inside a task) acts for the task's owner but only on
the task's own directive: another directive of the same owner is 403, another
owner's is 404, and the token stops working when the task ends.
"""

from __future__ import annotations

from typing import Any

import pytest

from contracts.models import Task
from daemons.models import ApiToken
from daemons.services import token_revoke
from directives.models import Directive, DirectiveEvent, Order, Step
from directives.services import directive_start, directive_transition, step_transition
from makima.state import SYSTEM
from tests.factories import (
    make_approval,
    make_directive,
    make_evaluation,
    make_order,
    make_steps,
    make_task,
    make_token,
)


def bearer(api: Any, plain: str) -> Any:
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
    return api


# --------------------------------------------------------------------------- user API keys


def test_a_user_api_key_authenticates_as_its_owner(api, alice, bob):
    mine = make_directive(alice)
    make_directive(bob, title="Bob's")
    response = bearer(api, make_token(alice).plain).get("/api/v1/directives/")
    assert response.status_code == 200
    assert [row["id"] for row in response.json()["results"]] == [str(mine.pk)]


def test_a_user_api_key_can_create_and_steer_directives(api, alice):
    client = bearer(api, make_token(alice).plain)
    created = client.post("/api/v1/directives/", {"title": "T", "goal": "G"}, format="json")
    assert created.status_code == 201
    assert client.post(f"/api/v1/directives/{created.json()['id']}/start/").status_code == 200
    event = DirectiveEvent.objects.filter(event_type="directive_planning").get()
    assert (event.actor_type, event.actor) == ("user", "alice")


def test_a_revoked_api_key_is_401(api, alice):
    key = make_token(alice)
    token_revoke(token=key.token, actor=SYSTEM)
    response = bearer(api, key.plain).get("/api/v1/directives/")
    assert response.status_code == 401
    assert "detail" in response.json()


def test_a_daemon_token_is_401_on_the_rest_api(api, alice):
    response = bearer(api, make_token(alice, kind=ApiToken.Kind.DAEMON).plain).get("/api/v1/directives/")
    assert response.status_code == 401


def test_an_unknown_token_is_401_and_creates_nothing(api, alice):
    response = bearer(api, "mk_u_not-a-real-token").post(
        "/api/v1/directives/", {"title": "T", "goal": "G"}, format="json"
    )
    assert response.status_code == 401
    assert not Directive.objects.exists()


def test_a_malformed_authorization_header_is_401(api, alice):
    api.credentials(HTTP_AUTHORIZATION="Bearer")
    assert api.get("/api/v1/directives/").status_code == 401


# --------------------------------------------------------------------------- task tokens


@pytest.fixture
def own(alice):
    directive = make_directive(alice, title="Own")
    make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]})
    directive.refresh_from_db()
    return directive


@pytest.fixture
def other(alice):
    """Another directive of the same owner."""
    directive = make_directive(alice, title="Other")
    make_steps(directive, {"name": "A"})
    directive.refresh_from_db()
    return directive


@pytest.fixture
def strangers(bob):
    directive = make_directive(bob, title="Bob's")
    make_steps(directive, {"name": "A"})
    directive.refresh_from_db()
    return directive


@pytest.fixture
def task(own):
    return make_task(own, status=Task.Status.RUNNING)


@pytest.fixture
def agent(api, alice, task):
    """An API client holding the task token of a task of ``own``."""
    return bearer(api, make_token(alice, kind=ApiToken.Kind.TASK, task=task).plain)


def step_of(directive: Directive, name: str = "A") -> Step:
    return Step.objects.get(directive=directive, name=name)


def test_a_task_token_can_read_its_own_directive(agent, own):
    response = agent.get(f"/api/v1/directives/{own.pk}/")
    assert response.status_code == 200
    assert response.json()["id"] == str(own.pk)


def test_a_task_token_lists_only_its_own_directive(agent, own, other):
    response = agent.get("/api/v1/directives/")
    assert [row["id"] for row in response.json()["results"]] == [str(own.pk)]


@pytest.mark.parametrize("url", ["/api/v1/chains/", "/api/v1/evaluations/", "/api/v1/approvals/"])
def test_a_task_tokens_lists_are_narrowed_to_its_directive(agent, own, other, url):
    for directive in (own, other):
        step = step_of(directive)
        make_evaluation(step)
        make_approval(step)
    rows = agent.get(url).json()["results"]
    assert rows
    assert {row["directive"] for row in rows} == {str(own.pk)}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/", None),
        ("patch", "/", {"pr_url": "https://github.com/acme/app/pull/1"}),
        ("post", "/pause/", None),
        ("get", "/steps/", None),
        ("post", "/steps/", {"name": "C"}),
        ("post", "/steps/batch/", {"steps": [{"name": "C"}]}),
        ("get", "/events/", None),
    ],
)
def test_a_task_token_acting_on_another_directive_of_its_owner_is_403(agent, other, method, path, body):
    directive_start(directive=other, actor=SYSTEM)
    before = DirectiveEvent.objects.count()
    response = getattr(agent, method)(f"/api/v1/directives/{other.pk}{path}", body, format="json")
    assert response.status_code == 403, response.content
    assert "own directive" in response.json()["detail"]
    assert DirectiveEvent.objects.count() == before
    assert Step.objects.filter(directive=other).count() == 1


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/", None),
        ("patch", "/", {"pr_url": "https://github.com/acme/app/pull/1"}),
        ("post", "/steps/", {"name": "C"}),
        ("post", "/steps/batch/", {"steps": [{"name": "C"}]}),
        ("get", "/events/", None),
    ],
)
def test_a_task_token_acting_on_another_owners_directive_is_404(agent, strangers, method, path, body):
    response = getattr(agent, method)(f"/api/v1/directives/{strangers.pk}{path}", body, format="json")
    assert response.status_code == 404
    assert Step.objects.filter(directive=strangers).count() == 1


def test_a_task_token_cannot_touch_a_step_of_another_directive(agent, other):
    step = step_of(other)
    url = f"/api/v1/directives/{other.pk}/steps/{step.pk}/"
    assert agent.get(url).status_code == 403
    assert agent.delete(url).status_code == 403
    assert Step.objects.filter(pk=step.pk).exists()


@pytest.mark.parametrize(
    "url", ["/api/v1/chains/{chain}/", "/api/v1/evaluations/{evaluation}/", "/api/v1/approvals/{approval}/"]
)
def test_a_task_token_cannot_read_children_of_another_directive(agent, other, url):
    step = step_of(other)
    ids = {"chain": other.current_chain_id, "evaluation": make_evaluation(step).pk, "approval": make_approval(step).pk}
    assert agent.get(url.format(**ids)).status_code == 403


def test_a_task_token_can_add_a_step_to_its_own_directive(agent, own):
    response = agent.post(f"/api/v1/directives/{own.pk}/steps/", {"name": "C", "depends_on": ["B"]}, format="json")
    assert response.status_code == 201, response.content
    event = DirectiveEvent.objects.get(event_type="step_added", step_id=response.json()["id"])
    assert event.actor_type == "agent"


def test_a_task_token_can_batch_add_steps_to_its_own_directive(agent, own):
    body = {"steps": [{"name": "C", "depends_on": ["B"]}, {"name": "D", "depends_on": ["C"]}]}
    response = agent.post(f"/api/v1/directives/{own.pk}/steps/batch/", body, format="json")
    assert response.status_code == 201, response.content
    assert [s["name"] for s in response.json()["steps"]] == ["C", "D"]


def test_a_task_token_can_remove_a_step_of_its_own_directive(agent, own):
    step = step_of(own, "B")
    assert agent.delete(f"/api/v1/directives/{own.pk}/steps/{step.pk}/").status_code == 204
    assert not Step.objects.filter(pk=step.pk).exists()


def test_a_task_token_can_record_the_pull_request_of_its_own_directive(agent, own, task):
    url = "https://github.com/acme/app/pull/7"
    response = agent.patch(f"/api/v1/directives/{own.pk}/", {"pr_url": url}, format="json")
    assert response.status_code == 200
    assert response.json()["pr_url"] == url
    event = DirectiveEvent.objects.get(event_type="pr_recorded")
    assert (event.actor_type, event.actor) == ("agent", f"task:{task.pk}")


def test_a_task_token_can_complete_its_completing_directive(agent, own):
    directive_start(directive=own, actor=SYSTEM)
    directive_transition(directive=own, to=Directive.Status.COMPLETING)
    response = agent.patch(f"/api/v1/directives/{own.pk}/", {"status": "completed"}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "completed"


def test_a_task_token_cannot_create_directives(agent):
    response = agent.post("/api/v1/directives/", {"title": "T", "goal": "G"}, format="json")
    assert response.status_code == 403
    assert Directive.objects.count() == 1


def test_a_task_token_cannot_change_who_the_directive_is_shared_with(agent, own, alice, platform):
    response = agent.patch(f"/api/v1/directives/{own.pk}/", {"team": platform.pk}, format="json")
    assert response.status_code == 403
    own.refresh_from_db()
    assert own.team_id is None


def test_a_task_token_may_read_but_not_answer_approvals(agent, own):
    step = step_of(own)
    for status in ("ready", "running", "evaluating", "awaiting_approval"):
        step_transition(step=step, to=status)
    approval = make_approval(step)
    assert agent.get(f"/api/v1/approvals/{approval.pk}/").status_code == 200
    response = agent.post(f"/api/v1/approvals/{approval.pk}/approve/", {}, format="json")
    assert response.status_code == 403
    approval.refresh_from_db()
    assert approval.status == "pending"


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("get", "/api/v1/orders/", None),
        ("post", "/api/v1/orders/", {"title": "From an agent"}),
        ("get", "/api/v1/orders/{order}/", None),
        ("patch", "/api/v1/orders/{order}/", {"title": "Changed"}),
        ("delete", "/api/v1/orders/{order}/", None),
        ("post", "/api/v1/orders/{order}/link/", {"directive": "{directive}"}),
        ("get", "/api/v1/orders/{bobs_order}/", None),
    ],
)
def test_orders_are_closed_to_task_tokens(agent, alice, bob, own, method, url, body):
    ids = {"order": make_order(alice).pk, "bobs_order": make_order(bob).pk, "directive": own.pk}
    if body:
        body = {k: v.format(**ids) for k, v in body.items()}
    response = getattr(agent, method)(url.format(**ids), body, format="json")
    assert response.status_code == 403
    assert "task token" in response.json()["detail"]
    assert Order.objects.count() == 2
    assert not Order.objects.exclude(status="open").exists()


def test_the_token_of_a_finished_task_is_401(agent, own, task):
    Task.objects.filter(pk=task.pk).update(status=Task.Status.DONE)
    assert agent.get(f"/api/v1/directives/{own.pk}/").status_code == 401
    response = agent.post(f"/api/v1/directives/{own.pk}/steps/", {"name": "C"}, format="json")
    assert response.status_code == 401
    assert not Step.objects.filter(name="C").exists()
