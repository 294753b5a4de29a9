"""Websocket routes: ``/ws/daemon/`` (daemons) and ``/ws/directives/<id>/`` (dashboard)."""

from __future__ import annotations

from collections.abc import Iterable

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import URLPattern

from daemons.routing import websocket_urlpatterns as daemon_urlpatterns
from directives.routing import websocket_urlpatterns as dashboard_urlpatterns


def for_browsers(patterns: Iterable[URLPattern]) -> list[URLPattern]:
    """The same routes, each behind an Origin check (no cross-site socket may
    ride on the session cookie) and the session authentication."""
    return [
        URLPattern(p.pattern, AllowedHostsOriginValidator(AuthMiddlewareStack(p.callback)), name=p.name)
        for p in patterns
    ]


# Daemons send no Origin and authenticate with their token: their route stays unwrapped.
websocket_urlpatterns: list[URLPattern] = [
    *daemon_urlpatterns,
    *for_browsers(dashboard_urlpatterns),
]
