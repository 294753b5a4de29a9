"""What a user may see of daemons, commands and tokens: only their own."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, Q, QuerySet

from contracts.models import Task
from daemons.models import ApiToken, Daemon, DaemonCommand


def daemons_visible_to(user: Any) -> QuerySet[Daemon]:
    if not user.is_authenticated:
        return Daemon.objects.none()
    # Meta.ordering is not applied to aggregate (GROUP BY) queries: order explicitly.
    return (
        Daemon.objects.filter(owner=user)
        .annotate(running_task_count=Count("tasks", filter=Q(tasks__status__in=list(Task.ON_DAEMON))))
        .order_by(*Daemon._meta.ordering)
    )


def commands_visible_to(user: Any) -> QuerySet[DaemonCommand]:
    if not user.is_authenticated:
        return DaemonCommand.objects.none()
    return DaemonCommand.objects.filter(owner=user)


def tokens_visible_to(user: Any) -> QuerySet[ApiToken]:
    """A user's own user API keys and daemon tokens (task tokens are the server's)."""
    if not user.is_authenticated:
        return ApiToken.objects.none()
    return ApiToken.objects.filter(owner=user, kind__in=[ApiToken.Kind.USER, ApiToken.Kind.DAEMON])
