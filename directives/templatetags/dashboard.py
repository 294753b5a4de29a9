"""Small template filters shared by the dashboard's pages."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django import template

register = template.Library()


@register.filter
def label(value: Any) -> str:
    """``awaiting_approval`` → ``awaiting approval``."""
    return str(value or "").replace("_", " ")


@register.filter
def duration(value: Any) -> str:
    """A timedelta or a number of seconds as ``2h 05m``, ``3m 20s`` or ``4.2s``."""
    if value is None or value == "":
        return "—"
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        seconds = 0.0
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


@register.simple_tag
def elapsed(start: datetime | None, end: datetime | None = None) -> str:
    """Duration between two datetimes (``end`` missing: still running → ``—``)."""
    if start is None or end is None:
        return "—"
    return duration(end - start)


@register.filter
def usd(value: Any) -> str:
    if value is None or value == "":
        return "—"
    return f"${Decimal(value):.2f}"
