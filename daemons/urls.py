"""Dashboard pages of daemons and API keys."""

from __future__ import annotations

from daemons import views

urlpatterns = [*views.urlpatterns]
