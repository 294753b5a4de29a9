"""Who may use which directives, steps, events, chains, evaluations, approvals
and orders endpoint.

alice owns a private directive and one shared with her team "platform"; carol
is in that team, bob is a stranger. Every endpoint is tried by everyone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from contracts.models import Task
from directives.models import Directive, DirectiveEvent, Step
from directives.services import (
    directive_pause,
    directive_start,
    directive_stop,
    order_cancel,
    order_link,
    step_transition,
)
from makima.state import SYSTEM
from tests.factories import make_approval, make_directive, make_evaluation, make_order, make_steps, make_task


@dataclass(frozen=True)
class Endpoint:
    method: str
    url: str
    body: Any = None
    ok: int = 200
    kind: str = "object"  # "object": one of alice's objects; "list": a top-level list; "create": top-level create
    lists: str = ""  # for lists: which object of the bundle must (not) appear
    prepare: Callable[[dict[str, Any]], None] | None = None


def _start(objects: dict[str, Any]) -> None:
    directive_start(directive=objects["directive_obj"], actor=SYSTEM)


def _start_and_pause(objects: dict[str, Any]) -> None:
    _start(objects)
    directive_pause(directive=objects["directive_obj"], actor=SYSTEM)


def _stop(objects: dict[str, Any]) -> None:
    directive_stop(directive=objects["directive_obj"], actor=SYSTEM)


def _fail_step_a(objects: dict[str, Any]) -> None:
    step = objects["step_a_obj"]
    for status in ("ready", "running", "failed"):
        step_transition(step=step, to=status)


def _execute_step_a(objects: dict[str, Any]) -> None:
    step = objects["step_a_obj"]
    task = make_task(step.directive, step=step, status=Task.Status.DONE)
    Step.objects.filter(pk=step.pk).update(execution_task=task)
    step.execution_task = task
    for status in ("ready", "running", "evaluating", "passed"):
        step_transition(step=step, to=status)


def _cancel_order(objects: dict[str, Any]) -> None:
    order_cancel(order=objects["order_obj"], actor=SYSTEM)


D = "/api/v1/directives/{directive}"
ENDPOINTS: dict[str, Endpoint] = {
    # directives
    "directives-list": Endpoint("get", "/api/v1/directives/", kind="list", lists="directive"),
    "directives-by-status": Endpoint("get", "/api/v1/directives/?status=draft", kind="list", lists="directive"),
    "directive-create": Endpoint("post", "/api/v1/directives/", {"title": "T", "goal": "G"}, 201, kind="create"),
    "directive-detail": Endpoint("get", D + "/"),
    "directive-patch": Endpoint("patch", D + "/", {"title": "Renamed"}),
    "directive-start": Endpoint("post", D + "/start/"),
    "directive-pause": Endpoint("post", D + "/pause/", prepare=_start),
    "directive-resume": Endpoint("post", D + "/resume/", prepare=_start_and_pause),
    "directive-stop": Endpoint("post", D + "/stop/"),
    "directive-replan": Endpoint("post", D + "/replan/", prepare=_start),
    "directive-regenerate": Endpoint("post", D + "/regenerate/", prepare=_start),
    "directive-archive": Endpoint("post", D + "/archive/", prepare=_stop),
    # steps
    "steps-list": Endpoint("get", D + "/steps/"),
    "step-create": Endpoint("post", D + "/steps/", {"name": "C", "depends_on": ["A"]}, 201),
    "steps-batch": Endpoint(
        "post", D + "/steps/batch/", {"steps": [{"name": "C"}, {"name": "D", "depends_on": ["C", "B"]}]}, 201
    ),
    "step-detail": Endpoint("get", D + "/steps/{step_b}/"),
    "step-put": Endpoint("put", D + "/steps/{step_b}/", {"name": "B2", "depends_on": ["{step_a}"]}),
    "step-patch": Endpoint("patch", D + "/steps/{step_b}/", {"task_plan": "Do it differently."}),
    "step-delete": Endpoint("delete", D + "/steps/{step_b}/", ok=204),
    "step-retry": Endpoint("post", D + "/steps/{step_a}/retry/", prepare=_fail_step_a),
    "step-skip": Endpoint("post", D + "/steps/{step_b}/skip/"),
    "step-evaluate": Endpoint("post", D + "/steps/{step_a}/evaluate/", prepare=_execute_step_a),
    # events
    "events-list": Endpoint("get", D + "/events/"),
    "events-after": Endpoint("get", D + "/events/?after=1&severity=info"),
    # chains and evaluations
    "chains-list": Endpoint("get", "/api/v1/chains/", kind="list", lists="chain"),
    "chains-of-directive": Endpoint("get", "/api/v1/chains/?directive={directive}", kind="list", lists="chain"),
    "chain-detail": Endpoint("get", "/api/v1/chains/{chain}/"),
    "evaluations-list": Endpoint("get", "/api/v1/evaluations/", kind="list", lists="evaluation"),
    "evaluations-of-directive": Endpoint(
        "get", "/api/v1/evaluations/?directive={directive}", kind="list", lists="evaluation"
    ),
    "evaluations-of-step": Endpoint("get", "/api/v1/evaluations/?step={step_a}", kind="list", lists="evaluation"),
    "evaluation-detail": Endpoint("get", "/api/v1/evaluations/{evaluation}/"),
    # approvals
    "approvals-list": Endpoint("get", "/api/v1/approvals/", kind="list", lists="approval"),
    "approvals-pending": Endpoint("get", "/api/v1/approvals/?status=pending", kind="list", lists="approval"),
    "approval-detail": Endpoint("get", "/api/v1/approvals/{approval}/"),
    "approval-approve": Endpoint("post", "/api/v1/approvals/{approval}/approve/", {"note": "fine"}),
    "approval-deny": Endpoint("post", "/api/v1/approvals/{approval}/deny/", {"note": "redo"}),
    # orders
    "orders-list": Endpoint("get", "/api/v1/orders/", kind="list", lists="order"),
    "orders-of-directive": Endpoint("get", "/api/v1/orders/?directive={directive}", kind="list", lists="order"),
    "order-create": Endpoint("post", "/api/v1/orders/", {"title": "Add dark mode"}, 201, kind="create"),
    "order-detail": Endpoint("get", "/api/v1/orders/{order}/"),
    "order-put": Endpoint("put", "/api/v1/orders/{order}/", {"title": "Renamed", "priority": "low"}),
    "order-patch": Endpoint("patch", "/api/v1/orders/{order}/", {"priority": "critical"}),
    "order-delete": Endpoint("delete", "/api/v1/orders/{order}/", ok=204, prepare=_cancel_order),
    "order-link": Endpoint("post", "/api/v1/orders/{order}/link/", {"directive": "{directive}"}),
    "order-unlink": Endpoint("post", "/api/v1/orders/{order}/unlink/"),
    "order-cancel": Endpoint("post", "/api/v1/orders/{order}/cancel/"),
}
OBJECT_ENDPOINTS = [name for name, e in ENDPOINTS.items() if e.kind == "object"]
LISTS = [name for name, e in ENDPOINTS.items() if e.kind == "list"]
CREATES = [name for name, e in ENDPOINTS.items() if e.kind == "create"]


def _bundle(directive: Directive) -> dict[str, Any]:
    a, b = make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]})
    evaluation = make_evaluation(a)
    approval = make_approval(b)
    order = make_order(directive.owner, title=f"Order for {directive.title}")
    order_link(order=order, directive=directive, actor=SYSTEM)
    directive.refresh_from_db()
    return {
        "directive": directive.pk,
        "step_a": a.pk,
        "step_b": b.pk,
        "chain": directive.current_chain_id,
        "evaluation": evaluation.pk,
        "approval": approval.pk,
        "order": order.pk,
        "directive_obj": directive,
        "step_a_obj": a,
        "order_obj": order,
    }


@pytest.fixture
def world(alice, platform):
    return {
        "private": _bundle(make_directive(alice, title="Private")),
        "shared": _bundle(make_directive(alice, title="Shared", team=platform)),
    }


def _fill(value: Any, objects: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return value.format(**objects)
    if isinstance(value, list):
        return [_fill(v, objects) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, objects) for k, v in value.items()}
    return value


def call(client: Any, name: str, objects: dict[str, Any], *, prepare: bool = True) -> Any:
    endpoint = ENDPOINTS[name]
    if prepare and endpoint.prepare is not None:
        endpoint.prepare(objects)
    return getattr(client, endpoint.method)(_fill(endpoint.url, objects), _fill(endpoint.body, objects), format="json")


def ids_in(response: Any) -> set[str]:
    return {row["id"] for row in response.json()["results"]}


def event_count() -> int:
    return DirectiveEvent.objects.count()


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_anonymous_requests_are_refused_with_401_and_change_nothing(api, world, endpoint):
    before = event_count()
    response = call(api, endpoint, world["private"], prepare=False)
    assert response.status_code == 401
    assert "detail" in response.json()
    assert event_count() == before


@pytest.mark.parametrize("scope", ["private", "shared"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_owner_can_use_every_endpoint(api_as, alice, world, endpoint, scope):
    response = call(api_as(alice), endpoint, world[scope])
    assert response.status_code == ENDPOINTS[endpoint].ok, response.content


@pytest.mark.parametrize("scope", ["private", "shared"])
@pytest.mark.parametrize("endpoint", OBJECT_ENDPOINTS)
def test_a_stranger_gets_404_for_every_one_of_alices_objects_and_changes_nothing(api_as, bob, world, endpoint, scope):
    objects = world[scope]
    if ENDPOINTS[endpoint].prepare is not None:
        ENDPOINTS[endpoint].prepare(objects)
    before = event_count()
    response = call(api_as(bob), endpoint, objects, prepare=False)
    assert response.status_code == 404, response.content
    assert "detail" in response.json()
    assert event_count() == before


@pytest.mark.parametrize("endpoint", LISTS)
def test_alices_objects_are_absent_from_every_one_of_a_strangers_lists(api_as, bob, world, endpoint):
    for objects in world.values():
        response = call(api_as(bob), endpoint, objects)
        assert response.status_code == 200, response.content
        assert response.json()["results"] == []


@pytest.mark.parametrize("endpoint", CREATES)
def test_what_a_stranger_creates_is_the_strangers_own(api_as, bob, world, endpoint):
    response = call(api_as(bob), endpoint, world["private"])
    assert response.status_code == 201
    assert response.json()["owner"] == "bob"


@pytest.mark.parametrize("endpoint", OBJECT_ENDPOINTS)
def test_a_team_member_can_see_and_steer_a_shared_directive(api_as, carol, world, endpoint):
    response = call(api_as(carol), endpoint, world["shared"])
    assert response.status_code == ENDPOINTS[endpoint].ok, response.content


@pytest.mark.parametrize("endpoint", OBJECT_ENDPOINTS)
def test_a_team_member_gets_404_for_alices_unshared_directive(api_as, carol, world, endpoint):
    objects = world["private"]
    if ENDPOINTS[endpoint].prepare is not None:
        ENDPOINTS[endpoint].prepare(objects)
    before = event_count()
    response = call(api_as(carol), endpoint, objects, prepare=False)
    assert response.status_code == 404, response.content
    assert event_count() == before


@pytest.mark.parametrize("endpoint", LISTS)
def test_a_team_members_lists_hold_the_shared_directive_only(api_as, carol, world, endpoint):
    key = ENDPOINTS[endpoint].lists
    response = call(api_as(carol), endpoint, world["shared"])
    assert response.status_code == 200
    assert str(world["shared"][key]) in ids_in(response)
    assert str(world["private"][key]) not in ids_in(response)


@pytest.mark.parametrize("endpoint", ["directives-list", "chains-list", "evaluations-list", "approvals-list"])
def test_the_owners_lists_hold_private_and_shared_objects(api_as, alice, world, endpoint):
    key = ENDPOINTS[endpoint].lists
    response = call(api_as(alice), endpoint, {})
    assert ids_in(response) == {str(world["private"][key]), str(world["shared"][key])}


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/directives/not-a-uuid/",
        "/api/v1/directives/not-a-uuid/steps/",
        "/api/v1/directives/not-a-uuid/events/",
        "/api/v1/chains/not-a-uuid/",
        "/api/v1/approvals/not-a-uuid/",
        "/api/v1/orders/not-a-uuid/",
    ],
)
def test_a_malformed_id_is_404(api_as, alice, url):
    assert api_as(alice).get(url).status_code == 404


def test_a_step_is_not_found_through_another_directive(api_as, alice, world):
    url = "/api/v1/directives/{directive}/steps/{step}/".format(
        directive=world["shared"]["directive"], step=world["private"]["step_a"]
    )
    assert api_as(alice).get(url).status_code == 404
