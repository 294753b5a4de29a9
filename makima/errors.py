"""Domain errors raised by services; the API maps them to HTTP status codes."""

from __future__ import annotations


class DomainError(Exception):
    """Base class for errors a service raises on purpose."""

    status_code = 400


class Conflict(DomainError):
    """The request is valid but the object's state does not allow it (HTTP 409)."""

    status_code = 409


class OutOfScope(DomainError):
    """A token tried to act outside what it was minted for (HTTP 403)."""

    status_code = 403
