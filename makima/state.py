"""Guarded, race-safe status transitions shared by every model with a status.

Every status field has one table of allowed transitions next to its
``TextChoices``. :func:`cas_transition` checks a move against that table and
applies it with a compare-and-set ``UPDATE … WHERE status = <expected>`` so
that two workers racing from the same state cannot both win.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from django.db import models, transaction
from django.db.models.expressions import Combinable
from django.utils import timezone

from makima.errors import Conflict


class InvalidTransition(Conflict):
    """A status change that the model's transition table does not allow."""

    def __init__(self, subject: str, current: str, target: str, *, reason: str = "") -> None:
        self.subject = subject
        self.current = current
        self.target = target
        message = f"{subject} cannot go from '{current}' to '{target}'"
        if reason:
            message = f"{message}: {reason}"
        super().__init__(message)


class Transitions:
    """An allowed-transitions table: ``{from_status: {to_status, …}}``."""

    def __init__(self, table: Mapping[str, Iterable[str]]) -> None:
        self.table = {source: frozenset(targets) for source, targets in table.items()}

    def allows(self, current: str, target: str) -> bool:
        return target in self.table.get(current, frozenset())

    def targets(self, current: str) -> frozenset[str]:
        return self.table.get(current, frozenset())

    def check(self, subject: str, current: str, target: str) -> None:
        if not self.allows(current, target):
            raise InvalidTransition(subject, current, target)


def cas_transition(
    instance: models.Model,
    *,
    to: str,
    transitions: Transitions,
    subject: str,
    field: str = "status",
    updates: Mapping[str, Any] | None = None,
    expected: str | None = None,
) -> bool:
    """Move ``instance`` to status ``to`` if the table allows it.

    Returns ``True`` when this call changed the row, ``False`` when the row was
    already in ``to`` (a repeated transition is a no-op) or another worker moved
    it there first. Raises :class:`InvalidTransition` when the move is not
    allowed from the current state, including the state a racing worker left.

    With ``expected`` the call is a *claim*: "move it from ``expected`` to
    ``to`` if it is still there". A row found elsewhere means another worker
    got there first, and the call returns ``False`` instead of raising.
    ``instance`` is updated in memory to match the row.
    """
    current = expected if expected is not None else getattr(instance, field)
    if current == to:
        return False
    transitions.check(subject, current, to)
    values: dict[str, Any] = {field: to, **(updates or {})}
    if any(f.name == "updated_at" for f in instance._meta.concrete_fields):
        values.setdefault("updated_at", timezone.now())
    model = type(instance)
    changed = model._default_manager.filter(pk=instance.pk, **{field: current}).update(**values)
    if changed == 1:
        expressions = [name for name, value in values.items() if isinstance(value, Combinable)]
        for name, value in values.items():
            if name not in expressions:
                setattr(instance, name, value)
        if expressions:
            instance.refresh_from_db(fields=expressions)
        return True
    # Someone else moved the row first: look at where it is now.
    actual = model._default_manager.filter(pk=instance.pk).values_list(field, flat=True).first()
    if actual is None:
        raise model.DoesNotExist(f"{subject} no longer exists")
    setattr(instance, field, actual)
    if actual == to or expected is not None:
        return False
    raise InvalidTransition(subject, actual, to, reason="it changed concurrently")


class Actor:
    """Who caused a change, as written to the event log."""

    __slots__ = ("name", "type", "user")

    def __init__(self, type: str, name: str = "", user: Any = None) -> None:
        self.type = type
        self.name = name
        self.user = user

    @classmethod
    def for_user(cls, user: Any) -> Actor:
        return cls("user", user.get_username(), user)

    def __repr__(self) -> str:
        return f"Actor({self.type!r}, {self.name!r})"


SYSTEM = Actor("system")


def atomic_unit() -> Any:
    """A unit of work that is all-or-nothing: its own transaction when none is
    open, otherwise part of the caller's, without a savepoint.

    For services whose writes only make sense together (a status change and
    its event) and that raise nothing after a failed statement: a savepoint
    costs two extra statements, and this runs several times per hand-off on
    the dispatch path. Callers that catch database errors and go on must use
    ``transaction.atomic()``.
    """
    if transaction.get_connection().in_atomic_block:
        return contextlib.nullcontext()
    return transaction.atomic()
