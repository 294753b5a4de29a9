"""Websocket routes: ``/ws/daemon/`` (daemons) and ``/ws/directives/<id>/`` (dashboard)."""

from __future__ import annotations

from django.urls import URLPattern

from daemons.routing import websocket_urlpatterns as daemon_urlpatterns

# The dashboard route (browser, wrapped in AllowedHostsOriginValidator) joins here.
websocket_urlpatterns: list[URLPattern] = [
    *daemon_urlpatterns,
]
