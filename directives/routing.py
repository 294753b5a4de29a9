"""Websocket route of the dashboard's live feed (spec 5.3)."""

from __future__ import annotations

from django.urls import URLPattern, path

from directives.consumers import DirectiveLiveConsumer

# Wrapped in AllowedHostsOriginValidator(AuthMiddlewareStack(...)) by makima.routing:
# browsers send an Origin, and the session cookie is the credential.
websocket_urlpatterns: list[URLPattern] = [
    path("ws/directives/<uuid:directive_id>/", DirectiveLiveConsumer.as_asgi()),
]
