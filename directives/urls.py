"""Dashboard pages of directives, approvals and orders (each view module lists its own routes)."""

from __future__ import annotations

from directives.views import actions, detail, editing, inbox, orders

urlpatterns = [
    *editing.urlpatterns,
    *detail.urlpatterns,
    *actions.urlpatterns,
    *inbox.urlpatterns,
    *orders.urlpatterns,
]
