"""What a user may see: every query for directives and their children starts here."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, Q, QuerySet

from directives.models import ApprovalRequest, Chain, Directive, DirectiveEvent, Evaluation, Order, Step


def directive_visibility(user: Any, *, prefix: str = "") -> Q:
    """A ``Q`` for rows whose directive (reached through ``prefix``) the user owns
    or that is shared with one of the user's teams."""
    if not user.is_authenticated:
        return Q(pk__in=[])
    owner = Q(**{f"{prefix}owner": user})
    team = Q(**{f"{prefix}team__in": user.groups.all()})
    return owner | team


def directives_visible_to(user: Any) -> QuerySet[Directive]:
    return Directive.objects.filter(directive_visibility(user))


def chains_visible_to(user: Any) -> QuerySet[Chain]:
    return Chain.objects.filter(directive_visibility(user, prefix="directive__"))


def steps_visible_to(user: Any) -> QuerySet[Step]:
    return Step.objects.filter(directive_visibility(user, prefix="directive__"))


def evaluations_visible_to(user: Any) -> QuerySet[Evaluation]:
    return Evaluation.objects.filter(directive_visibility(user, prefix="directive__"))


def approvals_visible_to(user: Any) -> QuerySet[ApprovalRequest]:
    return ApprovalRequest.objects.filter(directive_visibility(user, prefix="directive__"))


def events_visible_to(user: Any) -> QuerySet[DirectiveEvent]:
    return DirectiveEvent.objects.filter(directive_visibility(user, prefix="directive__"))


def orders_visible_to(user: Any) -> QuerySet[Order]:
    """Orders are their owner's; an order linked to a shared directive is visible to its team."""
    if not user.is_authenticated:
        return Order.objects.none()
    return Order.objects.filter(Q(owner=user) | Q(directive__team__in=user.groups.all()))


# Chains whose steps count as the directive's steps: every generation but the superseded ones.
LIVE_CHAIN_STATUSES = tuple(s for s in Chain.Status.values if s != Chain.Status.SUPERSEDED)


def live_step_counts(prefix: str) -> dict[str, Count]:
    """Annotations for a directive queryset: ``<prefix><status>`` per step status
    and ``<prefix>total``, over steps of no chain or of a live chain, all in the
    same query (one per list page, whatever the number of directives)."""
    live = Q(steps__chain__isnull=True) | Q(steps__chain__status__in=LIVE_CHAIN_STATUSES)
    counts = {
        f"{prefix}{status}": Count("steps", filter=live & Q(steps__status=status)) for status in Step.Status.values
    }
    counts[f"{prefix}total"] = Count("steps", filter=live)
    return counts
