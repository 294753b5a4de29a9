"""The orders board: columns by status, creating, editing, linking, unlinking, cancelling."""

from __future__ import annotations

import pytest
from django.urls import reverse

from directives.models import Directive, DirectiveEvent, Order
from directives.services import directive_transition, order_link
from makima.state import SYSTEM
from tests.factories import make_directive, make_order

XSS = "<script>alert(1)</script><img src=x onerror=alert(1)>"
BOARD = reverse("order-board")
CREATE = reverse("order-create")


def url(name: str, order: Order) -> str:
    return reverse(name, args=[order.pk])


# --------------------------------------------------------------------------- the board


def test_the_board_puts_orders_in_columns_by_status(client_as, alice):
    directive = make_directive(alice, title="Health endpoint")
    open_order = make_order(alice, title="Open one")
    linked = make_order(alice, title="Linked one")
    order_link(order=linked, directive=directive, actor=SYSTEM)
    cancelled = make_order(alice, title="Cancelled one")
    Order.objects.filter(pk=cancelled.pk).update(status=Order.Status.CANCELLED)
    response = client_as(alice).get(BOARD)
    assert response.status_code == 200
    assert response.context["nav"] == "orders"
    columns = {column["status"]: [o.title for o in column["orders"]] for column in response.context["board"]}
    assert columns == {
        "open": ["Open one"],
        "linked": ["Linked one"],
        "in_progress": [],
        "done": [],
        "cancelled": ["Cancelled one"],
    }
    html = response.content.decode()
    assert reverse("directive-detail", args=[directive.pk]) in html
    assert url("order-link", open_order) in html and url("order-unlink", linked) in html


def test_open_orders_are_sorted_by_priority(client_as, alice):
    make_order(alice, title="Low", priority="low")
    make_order(alice, title="Critical", priority="critical")
    make_order(alice, title="Medium", priority="medium")
    board = client_as(alice).get(BOARD).context["board"]
    assert [o.title for o in board[0]["orders"]] == ["Critical", "Medium", "Low"]


def test_an_empty_board_invites_to_create_an_order(client_as, alice):
    html = client_as(alice).get(BOARD).content.decode()
    assert "No orders yet" in html and CREATE in html


def test_a_stranger_sees_none_of_alices_orders(client_as, alice, bob):
    order = make_order(alice, title="Alice's order")
    assert "Alice&#x27;s order" not in client_as(bob).get(BOARD).content.decode()
    client = client_as(bob)
    assert client.get(url("order-edit", order)).status_code == 404
    for name in ("order-edit", "order-link", "order-unlink", "order-cancel", "order-delete"):
        assert client.post(url(name, order), {"title": "mine"}).status_code == 404
    order.refresh_from_db()
    assert (order.title, order.status) == ("Alice's order", "open")


def test_a_teammate_sees_and_edits_an_order_linked_to_a_shared_directive(client_as, alice, carol, platform):
    directive = make_directive(alice, team=platform)
    order = make_order(alice, title="Shared work")
    order_link(order=order, directive=directive, actor=SYSTEM)
    client = client_as(carol)
    assert "Shared work" in client.get(BOARD).content.decode()
    response = client.post(
        url("order-edit", order), {"title": "Shared work, v2", "priority": "low", "order_type": "bug"}
    )
    assert response.status_code == 302
    order.refresh_from_db()
    assert (order.title, order.priority, order.order_type) == ("Shared work, v2", "low", "bug")


def test_a_teammate_does_not_see_alices_unlinked_orders(client_as, alice, carol):
    order = make_order(alice, title="Private idea")
    assert client_as(carol).get(url("order-edit", order)).status_code == 404


def test_anonymous_visitors_are_sent_to_sign_in(client, alice):
    order = make_order(alice)
    responses = [client.get(BOARD), client.get(CREATE), client.post(CREATE, {"title": "x"})]
    responses += [client.post(url(name, order)) for name in ("order-edit", "order-link", "order-cancel")]
    for response in responses:
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))
    assert Order.objects.count() == 1


# --------------------------------------------------------------------------- create and edit


def test_creating_an_order_goes_through_the_service(client_as, alice):
    assert client_as(alice).get(CREATE).status_code == 200
    response = client_as(alice).post(
        CREATE,
        {
            "title": "  Rate-limit the API ",
            "description": "429 past 100 rps",
            "priority": "critical",
            "order_type": "feature",
        },
        follow=True,
    )
    assert response.redirect_chain[-1][0] == BOARD
    order = Order.objects.get()
    assert (order.owner, order.title, order.priority, order.status) == (alice, "Rate-limit the API", "critical", "open")
    assert DirectiveEvent.objects.filter(event_type="order_created", subject_id=str(order.pk)).exists()
    assert "Rate-limit the API" in response.content.decode()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"title": "", "priority": "high", "order_type": "bug"}, "title"),
        ({"title": "   ", "priority": "high", "order_type": "bug"}, "title"),
        ({"title": "x", "priority": "urgent!!", "order_type": "bug"}, "priority"),
        ({"title": "x", "priority": "high", "order_type": "epic"}, "order_type"),
        ({"title": "x" * 201, "priority": "high", "order_type": "bug"}, "title"),
    ],
)
def test_an_invalid_order_is_refused_with_errors_next_to_the_field(client_as, alice, data, field):
    response = client_as(alice).post(CREATE, data)
    assert response.status_code == 400
    assert field in response.context["form"].errors
    assert f'id="id_{field}-errors"' in response.content.decode()
    assert not Order.objects.exists()


def test_editing_an_order_changes_its_fields(client_as, alice):
    order = make_order(alice, title="Old title")
    response = client_as(alice).get(url("order-edit", order))
    assert response.status_code == 200
    assert 'value="Old title"' in response.content.decode()
    response = client_as(alice).post(
        url("order-edit", order),
        {"title": "New title", "description": "more", "priority": "low", "order_type": "chore"},
    )
    assert response["Location"] == BOARD
    order.refresh_from_db()
    assert (order.title, order.description, order.priority, order.order_type) == ("New title", "more", "low", "chore")


def test_an_invalid_edit_changes_nothing(client_as, alice):
    order = make_order(alice, title="Keep me")
    response = client_as(alice).post(url("order-edit", order), {"title": "", "priority": "high", "order_type": "bug"})
    assert response.status_code == 400
    assert "title" in response.context["form"].errors
    order.refresh_from_db()
    assert order.title == "Keep me"


# --------------------------------------------------------------------------- link, unlink, cancel, delete


def test_linking_an_order_to_an_own_directive(client_as, alice):
    directive = make_directive(alice, title="Target")
    order = make_order(alice)
    response = client_as(alice).post(url("order-link", order), {"directive": directive.pk}, follow=True)
    assert "linked to “Target”" in response.content.decode()
    order.refresh_from_db()
    assert (order.status, order.directive) == ("linked", directive)


def test_linking_to_a_strangers_directive_is_refused(client_as, alice, bob):
    theirs = make_directive(bob, title="Bob's")
    order = make_order(alice)
    response = client_as(alice).post(url("order-link", order), {"directive": theirs.pk}, follow=True)
    assert "Choose one of your directives that is not finished." in response.content.decode()
    order.refresh_from_db()
    assert (order.status, order.directive) == ("open", None)


def test_the_link_choices_hold_only_visible_unfinished_directives(client_as, alice, bob):
    mine = make_directive(alice, title="Mine")
    done = make_directive(alice, title="Finished")
    Directive.objects.filter(pk=done.pk).update(status=Directive.Status.COMPLETED)
    make_directive(bob, title="Bob's")
    make_order(alice)
    linkable = client_as(alice).get(BOARD).context["linkable"]
    assert [d.pk for d in linkable] == [mine.pk]


def test_linking_a_cancelled_order_shows_the_services_error(client_as, alice):
    directive = make_directive(alice)
    order = make_order(alice)
    client_as(alice).post(url("order-cancel", order))
    response = client_as(alice).post(url("order-link", order), {"directive": directive.pk}, follow=True)
    assert "only an open order can be linked" in response.content.decode()
    order.refresh_from_db()
    assert (order.status, order.directive) == ("cancelled", None)


def test_unlinking_returns_the_order_to_open(client_as, alice):
    directive = make_directive(alice)
    order = make_order(alice)
    order_link(order=order, directive=directive, actor=SYSTEM)
    response = client_as(alice).post(url("order-unlink", order), {"next": "edit"})
    assert response["Location"] == url("order-edit", order)
    order.refresh_from_db()
    assert (order.status, order.directive) == ("open", None)


def test_unlinking_an_order_in_progress_is_refused(client_as, alice):
    directive = make_directive(alice)
    directive_transition(directive=directive, to="active")
    order = make_order(alice)
    order_link(order=order, directive=directive, actor=SYSTEM)
    Order.objects.filter(pk=order.pk).update(status=Order.Status.IN_PROGRESS)
    response = client_as(alice).post(url("order-unlink", order), follow=True)
    assert "order cannot go from &#x27;in_progress&#x27; to &#x27;open&#x27;" in response.content.decode()
    order.refresh_from_db()
    assert (order.status, order.directive) == ("in_progress", directive)


def test_cancelling_an_order(client_as, alice):
    order = make_order(alice)
    client_as(alice).post(url("order-cancel", order))
    order.refresh_from_db()
    assert order.status == "cancelled"


def test_cancelling_a_done_order_is_refused(client_as, alice):
    order = make_order(alice)
    Order.objects.filter(pk=order.pk).update(status=Order.Status.DONE)
    response = client_as(alice).post(url("order-cancel", order), follow=True)
    assert "order cannot go from &#x27;done&#x27; to &#x27;cancelled&#x27;" in response.content.decode()
    order.refresh_from_db()
    assert order.status == "done"


def test_deleting_an_open_order_and_refusing_a_linked_one(client_as, alice):
    directive = make_directive(alice)
    gone, kept = make_order(alice, title="Gone"), make_order(alice, title="Kept")
    order_link(order=kept, directive=directive, actor=SYSTEM)
    client_as(alice).post(url("order-delete", gone))
    response = client_as(alice).post(url("order-delete", kept), follow=True)
    assert "a linked order cannot be deleted" in response.content.decode()
    assert list(Order.objects.values_list("title", flat=True)) == ["Kept"]


def test_order_changes_need_a_post(client_as, alice):
    order = make_order(alice)
    for name in ("order-link", "order-unlink", "order-cancel", "order-delete"):
        assert client_as(alice).get(url(name, order)).status_code == 405


# --------------------------------------------------------------------------- escaping and queries


def test_order_titles_are_escaped(client_as, alice):
    directive = make_directive(alice, title=XSS)
    order = make_order(alice, title=XSS, description=XSS)
    order_link(order=order, directive=directive, actor=SYSTEM)
    make_order(alice, title=XSS)
    for page in (BOARD, url("order-edit", order)):
        html = client_as(alice).get(page).content.decode()
        assert "<script>alert(1)</script>" not in html
        assert "<img src=x" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_board_runs_a_constant_number_of_queries(client_as, alice, django_assert_max_num_queries):
    directives = [make_directive(alice, title=f"D{i}") for i in range(5)]
    for i in range(40):
        order = make_order(alice, title=f"Order {i}")
        if i % 2:
            order_link(order=order, directive=directives[i % 5], actor=SYSTEM)
        elif i % 3 == 0:
            Order.objects.filter(pk=order.pk).update(status=Order.Status.DONE)
    client = client_as(alice)
    with django_assert_max_num_queries(8):
        response = client.get(BOARD)
    assert response.status_code == 200
    assert sum(len(column["orders"]) for column in response.context["board"]) == 40
