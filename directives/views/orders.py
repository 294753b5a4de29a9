"""The orders board: work items for the planner, in columns by status, created,
edited, linked to directives and cancelled through ``directives.services``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path, reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from directives.forms import add_service_errors
from directives.models import Order
from directives.order_forms import OrderForm, OrderLinkForm, linkable_directives
from directives.selectors import orders_visible_to
from directives.services import (
    ORDER_DELETABLE_STATUSES,
    order_cancel,
    order_create,
    order_delete,
    order_link,
    order_unlink,
    order_update,
)
from directives.views.common import refusal_text
from makima.errors import DomainError
from makima.state import Actor

# Finished orders pile up; the board shows the most recent ones of those columns.
CLOSED_COLUMN_LIMIT = 50
CLOSED = (Order.Status.DONE, Order.Status.CANCELLED)
COLUMNS = (Order.Status.OPEN, Order.Status.LINKED, Order.Status.IN_PROGRESS, *CLOSED)
PRIORITY_ORDER = {value: rank for rank, value in enumerate(Order.Priority.values)}


def _orders(user: Any) -> QuerySet[Order]:
    return orders_visible_to(user).select_related("directive", "owner")


def _sort_key(order: Order) -> tuple[int, float]:
    return (PRIORITY_ORDER.get(order.priority, len(PRIORITY_ORDER)), -order.created_at.timestamp())


@login_required
@require_GET
def order_board(request: HttpRequest) -> HttpResponse:
    orders = _orders(request.user)
    columns: dict[str, list[Order]] = {status: [] for status in COLUMNS}
    for order in orders.exclude(status__in=CLOSED):
        columns[order.status].append(order)
    for status in CLOSED:
        columns[status] = list(orders.filter(status=status).order_by("-updated_at", "-pk")[:CLOSED_COLUMN_LIMIT])
    totals = dict(orders.order_by().values_list("status").annotate(n=Count("pk")))
    for status in (Order.Status.OPEN, Order.Status.LINKED, Order.Status.IN_PROGRESS):
        columns[status].sort(key=_sort_key)
    board = [
        {
            "status": status,
            "label": Order.Status(status).label,
            "orders": columns[status],
            "total": totals.get(status, 0),
        }
        for status in COLUMNS
    ]
    return render(
        request,
        "orders/board.html",
        {
            "nav": "orders",
            "board": board,
            "any_orders": any(totals.values()),
            "linkable": list(linkable_directives(request.user)),
            "closed_limit": CLOSED_COLUMN_LIMIT,
        },
    )


@login_required
@require_http_methods(["GET", "POST"])
def order_create_view(request: HttpRequest) -> HttpResponse:
    form = OrderForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            order = order_create(owner=request.user, actor=Actor.for_user(request.user), **form.cleaned_data)
        except ValidationError as exc:
            add_service_errors(form, exc)
        except DomainError as exc:
            form.add_error(None, refusal_text(exc))
        else:
            messages.success(request, f"Order “{order.title}” created.")
            return redirect(reverse("order-board"))
    status = 400 if request.method == "POST" else 200
    return render(request, "orders/form.html", {"nav": "orders", "form": form, "order": None}, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def order_edit_view(request: HttpRequest, pk: Any) -> HttpResponse:
    order = get_object_or_404(_orders(request.user), pk=pk)
    if request.method == "POST":
        form = OrderForm(request.POST)
        if form.is_valid():
            try:
                order_update(order=order, actor=Actor.for_user(request.user), **form.cleaned_data)
            except ValidationError as exc:
                add_service_errors(form, exc)
            except DomainError as exc:
                form.add_error(None, refusal_text(exc))
            else:
                messages.success(request, f"Order “{order.title}” saved.")
                return redirect(reverse("order-board"))
        status = 400
    else:
        form = OrderForm.for_order(order)
        status = 200
    return render(
        request,
        "orders/form.html",
        {
            "nav": "orders",
            "form": form,
            "order": order,
            "link_form": OrderLinkForm(user=request.user, initial={"directive": order.directive_id}),
            "deletable": ORDER_DELETABLE_STATUSES,
        },
        status=status,
    )


def _back(request: HttpRequest, order: Order) -> HttpResponse:
    # A teammate who unlinks an order from a shared directive no longer sees it: back to the board then.
    if request.POST.get("next") == "edit" and _orders(request.user).filter(pk=order.pk).exists():
        return redirect(reverse("order-edit", args=[order.pk]))
    return redirect(reverse("order-board"))


def _act(request: HttpRequest, pk: Any, action: Callable[[Order, Actor], str]) -> HttpResponse:
    """Run one order action; a refusal from the service becomes an error message."""
    order = get_object_or_404(_orders(request.user), pk=pk)
    try:
        done = action(order, Actor.for_user(request.user))
    except (DomainError, ValidationError) as exc:
        messages.error(request, refusal_text(exc))
    else:
        messages.success(request, done)
    return _back(request, order)


@login_required
@require_POST
def order_link_view(request: HttpRequest, pk: Any) -> HttpResponse:
    order = get_object_or_404(_orders(request.user), pk=pk)
    form = OrderLinkForm(request.POST, user=request.user)
    if not form.is_valid():
        messages.error(request, " ".join(form.errors.get("directive", ["Choose a directive."])))
        return _back(request, order)
    directive = form.cleaned_data["directive"]
    try:
        order_link(order=order, directive=directive, actor=Actor.for_user(request.user))
    except (DomainError, ValidationError) as exc:
        messages.error(request, refusal_text(exc))
    else:
        messages.success(request, f"Order “{order.title}” linked to “{directive.title}”; its planner picks it up.")
    return _back(request, order)


@login_required
@require_POST
def order_unlink_view(request: HttpRequest, pk: Any) -> HttpResponse:
    def unlink(order: Order, actor: Actor) -> str:
        order_unlink(order=order, actor=actor)
        return f"Order “{order.title}” unlinked; it is open again."

    return _act(request, pk, unlink)


@login_required
@require_POST
def order_cancel_view(request: HttpRequest, pk: Any) -> HttpResponse:
    def cancel(order: Order, actor: Actor) -> str:
        order_cancel(order=order, actor=actor)
        return f"Order “{order.title}” cancelled."

    return _act(request, pk, cancel)


@login_required
@require_POST
def order_delete_view(request: HttpRequest, pk: Any) -> HttpResponse:
    order = get_object_or_404(_orders(request.user), pk=pk)
    title = order.title
    try:
        order_delete(order=order, actor=Actor.for_user(request.user))
    except (DomainError, ValidationError) as exc:
        messages.error(request, refusal_text(exc))
        return _back(request, order)
    messages.success(request, f"Order “{title}” deleted.")
    return redirect(reverse("order-board"))


urlpatterns = [
    path("orders/", order_board, name="order-board"),
    path("orders/new/", order_create_view, name="order-create"),
    path("orders/<uuid:pk>/edit/", order_edit_view, name="order-edit"),
    path("orders/<uuid:pk>/link/", order_link_view, name="order-link"),
    path("orders/<uuid:pk>/unlink/", order_unlink_view, name="order-unlink"),
    path("orders/<uuid:pk>/cancel/", order_cancel_view, name="order-cancel"),
    path("orders/<uuid:pk>/delete/", order_delete_view, name="order-delete"),
]
