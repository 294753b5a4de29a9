"""Log lines that say which directive, step, task and daemon they are about.

Code that works on one directive (a lifecycle phase, the tick's pass over a
directive), one task (a daemon's report, a finished task's consequences) or
one daemon (its websocket) binds the ids for the duration of that work::

    with log_context(directive=task.directive_id, step=task.step_id, task=task.pk):
        ...

and :class:`ContextFilter`, installed on the log handlers (``LOGGING`` in
``makima/settings.py``), copies them onto every record emitted meanwhile as
``directive_id``, ``step_id``, ``task_id`` and ``daemon`` (``""`` when
unknown), plus ``log_context``: the known ones as `` [directive=… task=…]``
(empty when none is known), which the format puts before the message.

The ids live in a :class:`contextvars.ContextVar`, so they follow the work,
not the thread: an asyncio task started inside a context inherits it and
changes made inside that task never leak out; ``sync_to_async`` and
``database_sync_to_async`` copy it into their worker thread; a context
manager always restores what was bound before, also when the block raises.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import Any

# What the filter puts on records, in the order shown: (key, record attribute).
FIELDS = (("directive", "directive_id"), ("step", "step_id"), ("task", "task_id"), ("daemon", "daemon"))
_KEYS = frozenset(key for key, _ in FIELDS)

_EMPTY: Mapping[str, str] = MappingProxyType({})
_context: ContextVar[Mapping[str, str]] = ContextVar("makima_log_context", default=_EMPTY)


MAX_VALUE_CHARS = 100
_CONTROL = dict.fromkeys([*range(32), 127], "?")


def _printable(value: Any) -> str:
    # A daemon names itself: a newline in its name must not forge a log line.
    return str(value)[:MAX_VALUE_CHARS].translate(_CONTROL)


def _merged(ids: Mapping[str, Any]) -> Mapping[str, str]:
    unknown = set(ids) - _KEYS
    if unknown:
        raise TypeError(f"log context takes only {', '.join(sorted(_KEYS))}, not {', '.join(sorted(unknown))}")
    # None means "not known here": it keeps what an outer context bound.
    given = {key: _printable(value) for key, value in ids.items() if value is not None and value != ""}
    return MappingProxyType({**_context.get(), **given})


@contextlib.contextmanager
def log_context(
    *, directive: Any = None, step: Any = None, task: Any = None, daemon: Any = None
) -> Iterator[Mapping[str, str]]:
    """Bind ids (a value or an object's ``pk`` as given; ``None`` keeps the
    outer value) for the block; the previous ones come back when it ends."""
    token = _context.set(_merged({"directive": directive, "step": step, "task": task, "daemon": daemon}))
    try:
        yield _context.get()
    finally:
        _context.reset(token)


def bind(**ids: Any) -> Token[Mapping[str, str]]:
    """Bind ids until :func:`unbind` (or for the rest of the current asyncio
    task or ``contextvars`` context): for work whose span is not one block,
    such as a websocket connection that lives across many handler calls."""
    return _context.set(_merged(ids))


def unbind(token: Token[Mapping[str, str]]) -> None:
    """Undo a :func:`bind`."""
    _context.reset(token)


def current() -> dict[str, str]:
    """The ids bound now (only the known ones)."""
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Puts the bound ids on every record it sees (never drops one).

    Install it on handlers, not loggers: a logger's filters do not see the
    records that propagate to it from child loggers. A value the caller gave
    through ``extra=`` is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _context.get()
        shown = []
        for key, attribute in FIELDS:
            value = record.__dict__.setdefault(attribute, ids.get(key, ""))
            if value:
                shown.append(f"{key}={value}")
        record.__dict__.setdefault("log_context", f" [{' '.join(shown)}]" if shown else "")
        return True
