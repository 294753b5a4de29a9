"""Orders: create, read, edit, delete, and link them to a directive."""

from __future__ import annotations

from typing import Any

import pytest

from directives.models import DirectiveEvent, Order
from directives.services import directive_stop, order_cancel, order_link, order_transition
from makima.state import SYSTEM
from tests.factories import make_directive, make_order

URL = "/api/v1/orders/"


@pytest.fixture
def client(api_as, alice):
    return api_as(alice)


def detail(order: Order, suffix: str = "") -> str:
    return f"{URL}{order.pk}/{suffix}"


def snapshot(order: Order) -> tuple[Any, ...]:
    fresh = Order.objects.get(pk=order.pk)
    return (
        fresh.title,
        fresh.priority,
        fresh.order_type,
        fresh.status,
        fresh.directive_id,
        DirectiveEvent.objects.count(),
    )


def test_creating_an_order(client, alice):
    body = {"title": "Dark mode", "description": "Users keep asking.", "priority": "critical", "order_type": "feature"}
    response = client.post(URL, body, format="json")
    assert response.status_code == 201, response.content
    data = response.json()
    assert (data["owner"], data["status"], data["directive"], data["priority"]) == ("alice", "open", None, "critical")
    assert Order.objects.get(pk=data["id"]).owner == alice
    assert DirectiveEvent.objects.filter(event_type="order_created", subject_id=data["id"]).exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "title"),
        ({"title": ""}, "title"),
        ({"title": "T", "priority": "urgent"}, "priority"),
        ({"title": "T", "order_type": "epic"}, "order_type"),
        ({"title": "T", "status": "done"}, "status"),
        ({"title": "T", "directive": None}, "directive"),
        ({"title": "T", "estimate": 3}, "estimate"),
    ],
)
def test_a_bad_order_is_a_400_and_creates_nothing(client, body, field):
    response = client.post(URL, body, format="json")
    assert response.status_code == 400
    assert field in response.json()["errors"]
    assert not Order.objects.exists()


def test_orders_are_listed_and_filtered(client, alice, bob):
    directive = make_directive(alice)
    low = make_order(alice, title="Low", priority="low")
    linked = make_order(alice, title="Linked")
    order_link(order=linked, directive=directive, actor=SYSTEM)
    make_order(bob, title="Bob's")

    def titles(query: str = "") -> set[str]:
        return {row["title"] for row in client.get(URL + query).json()["results"]}

    assert titles() == {"Low", "Linked"}
    assert titles("?status=linked") == {"Linked"}
    assert titles("?priority=low") == {"Low"}
    assert titles(f"?directive={directive.pk}") == {"Linked"}
    assert client.get(URL + "?status=lost").status_code == 400
    assert low.pk


def test_editing_an_order(client, alice):
    order = make_order(alice)
    response = client.patch(detail(order), {"priority": "low", "description": "Later."}, format="json")
    assert response.status_code == 200
    assert (response.json()["priority"], response.json()["description"]) == ("low", "Later.")
    response = client.put(detail(order), {"title": "Replaced"}, format="json")
    assert response.status_code == 200
    assert response.json()["title"] == "Replaced"


@pytest.mark.parametrize(("body", "field"), [({"title": ""}, "title"), ({"status": "done"}, "status")])
def test_a_bad_edit_is_a_400_and_changes_nothing(client, alice, body, field):
    order = make_order(alice)
    before = snapshot(order)
    response = client.patch(detail(order), body, format="json")
    assert response.status_code == 400
    assert field in response.json()["errors"]
    assert snapshot(order) == before


def test_an_open_order_can_be_deleted(client, alice):
    order = make_order(alice)
    assert client.delete(detail(order)).status_code == 204
    assert not Order.objects.filter(pk=order.pk).exists()
    assert DirectiveEvent.objects.filter(event_type="order_deleted", subject_id=str(order.pk)).exists()


def test_a_cancelled_order_can_be_deleted(client, alice):
    order = make_order(alice)
    order_cancel(order=order, actor=SYSTEM)
    assert client.delete(detail(order)).status_code == 204
    assert not Order.objects.filter(pk=order.pk).exists()


@pytest.mark.parametrize("status", ["linked", "in_progress", "done"])
def test_an_order_taken_up_by_a_directive_cannot_be_deleted(client, alice, status):
    order = make_order(alice)
    order_link(order=order, directive=make_directive(alice), actor=SYSTEM)
    if status in ("in_progress", "done"):
        order_transition(order=order, to="in_progress")
    if status == "done":
        order_transition(order=order, to="done")
    before = snapshot(order)
    response = client.delete(detail(order))
    assert response.status_code == 409
    assert response.json()["detail"] == f"a {status} order cannot be deleted; only open or cancelled orders can"
    assert snapshot(order) == before


def test_linking_an_order_to_a_directive(client, alice):
    order, directive = make_order(alice), make_directive(alice)
    response = client.post(detail(order, "link/"), {"directive": str(directive.pk)}, format="json")
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["directive"]) == ("linked", str(directive.pk))
    event = DirectiveEvent.objects.get(event_type="order_linked")
    assert (event.directive_id, event.actor) == (directive.pk, "alice")


def test_an_order_can_be_linked_to_a_directive_shared_with_the_user(api_as, carol, alice, platform):
    order, directive = make_order(carol), make_directive(alice, team=platform)
    response = api_as(carol).post(detail(order, "link/"), {"directive": str(directive.pk)}, format="json")
    assert response.status_code == 200
    assert response.json()["directive"] == str(directive.pk)


@pytest.mark.parametrize("whose", ["bob", "nobody"])
def test_linking_to_a_directive_the_user_cannot_see_is_a_400_unknown_directive(client, alice, bob, whose):
    order = make_order(alice)
    target = str(make_directive(bob).pk) if whose == "bob" else "6f1c1a8e-2a51-4c4c-9d8e-0d0f6b1f0a11"
    before = snapshot(order)
    response = client.post(detail(order, "link/"), {"directive": target}, format="json")
    assert response.status_code == 400
    assert response.json()["errors"]["directive"] == [f"Unknown directive {target}."]
    assert snapshot(order) == before


@pytest.mark.parametrize(("body", "words"), [({}, "required"), ({"directive": "seven"}, "valid UUID")])
def test_a_bad_link_body_is_a_400(client, alice, body, words):
    order = make_order(alice)
    response = client.post(detail(order, "link/"), body, format="json")
    assert response.status_code == 400
    assert words in str(response.json()["errors"]["directive"])


def test_linking_to_a_finished_directive_is_a_409(client, alice):
    order, directive = make_order(alice), make_directive(alice)
    directive_stop(directive=directive, actor=SYSTEM)
    before = snapshot(order)
    response = client.post(detail(order, "link/"), {"directive": str(directive.pk)}, format="json")
    assert response.status_code == 409
    assert response.json()["detail"] == "an order cannot be linked to a failed directive"
    assert snapshot(order) == before


def test_linking_a_linked_order_elsewhere_is_a_409(client, alice):
    order = make_order(alice)
    order_link(order=order, directive=make_directive(alice, title="First"), actor=SYSTEM)
    second = make_directive(alice, title="Second")
    before = snapshot(order)
    response = client.post(detail(order, "link/"), {"directive": str(second.pk)}, format="json")
    assert response.status_code == 409
    assert "only an open order can be linked" in response.json()["detail"]
    assert snapshot(order) == before


def test_unlinking_and_cancelling_an_order(client, alice):
    order = make_order(alice)
    order_link(order=order, directive=make_directive(alice), actor=SYSTEM)
    response = client.post(detail(order, "unlink/"))
    assert (response.status_code, response.json()["status"], response.json()["directive"]) == (200, "open", None)
    response = client.post(detail(order, "cancel/"))
    assert (response.status_code, response.json()["status"]) == (200, "cancelled")


def test_a_done_order_cannot_be_cancelled(client, alice):
    order = make_order(alice)
    order_link(order=order, directive=make_directive(alice), actor=SYSTEM)
    order_transition(order=order, to="in_progress")
    order_transition(order=order, to="done")
    before = snapshot(order)
    response = client.post(detail(order, "cancel/"))
    assert response.status_code == 409
    assert response.json()["detail"] == "order cannot go from 'done' to 'cancelled'"
    assert snapshot(order) == before


def test_a_team_member_sees_orders_linked_to_a_shared_directive_only(api_as, carol, alice, platform):
    shared = make_order(alice, title="Shared")
    order_link(order=shared, directive=make_directive(alice, team=platform), actor=SYSTEM)
    make_order(alice, title="Private")
    rows = api_as(carol).get(URL).json()["results"]
    assert [row["title"] for row in rows] == ["Shared"]


def test_a_team_member_who_unlinks_an_order_gets_its_last_state_back(api_as, carol, alice, platform):
    order = make_order(alice)
    order_link(order=order, directive=make_directive(alice, team=platform), actor=SYSTEM)
    member = api_as(carol)
    response = member.post(detail(order, "unlink/"))
    assert response.status_code == 200
    assert response.json()["status"] == "open"
    assert member.get(detail(order)).status_code == 404
