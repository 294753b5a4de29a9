"""``/api/v1/daemons/`` and ``/api/v1/tokens/``, and the API's catch-all JSON 404."""

from __future__ import annotations

from django.urls import re_path
from rest_framework.routers import SimpleRouter

from daemons.api.views import DaemonViewSet, TokenViewSet
from makima.api import not_found

router = SimpleRouter()
router.register("daemons", DaemonViewSet, basename="daemon")
router.register("tokens", TokenViewSet, basename="token")

# These routes are the last ones included under /api/v1/ (makima/urls.py), so
# this pattern only catches paths no API route matched: unknown endpoints and
# ids that are not UUIDs answer a JSON 404 instead of Django's HTML page. Only
# paths ending in "/": a known route without its slash still gets the redirect.
urlpatterns = [*router.urls, re_path(r"^(?P<path>(?:.*/)?)$", not_found)]
