"""Websocket route of the daemon gateway (protocol.md)."""

from __future__ import annotations

from django.urls import URLPattern, path

from daemons.consumers import DaemonConsumer

# Daemons send no Origin header: this route is deliberately not wrapped in
# AllowedHostsOriginValidator (the browser routes are); the token is the check.
websocket_urlpatterns: list[URLPattern] = [
    path("ws/daemon/", DaemonConsumer.as_asgi()),
]
