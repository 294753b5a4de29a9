"""Template context shared by every dashboard page."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from directives.models import ApprovalRequest
from directives.selectors import approvals_visible_to


def navigation(request: HttpRequest) -> dict[str, Any]:
    """The navigation bar's badge: pending approvals the user may answer (one
    COUNT query, lazily, so pages that do not render the bar pay nothing)."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}

    def pending_approvals() -> int:
        return approvals_visible_to(user).filter(status=ApprovalRequest.Status.PENDING).count()

    return {"nav_pending_approvals": pending_approvals}
