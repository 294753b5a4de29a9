"""Background work run by the django-q2 cluster: thin wrappers over services."""

from __future__ import annotations

from typing import Any

from directives.lifecycle import tick


def orchestrator_tick() -> dict[str, Any]:
    """The orchestrator's safety net; scheduled by ``setup_schedules``."""
    return tick()
