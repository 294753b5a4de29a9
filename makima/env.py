"""Typed readers for settings that come from environment variables.

Each reader raises ``ImproperlyConfigured`` with the variable's name and what
was wrong, so that a typo in a deployment fails at start-up rather than later.
A variable ``NAME_FILE`` (a path) is read instead of ``NAME`` when set, so that
secrets can come from mounted files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _raw(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    path = environ.get(f"{name}_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE: cannot read {path!r}: {exc.strerror}") from exc
    return environ.get(name)


def env_str(name: str, default: str, *, environ: Mapping[str, str] | None = None) -> str:
    value = _raw(name, environ)
    return default if value is None else value


def env_bool(name: str, default: bool, *, environ: Mapping[str, str] | None = None) -> bool:
    value = _raw(name, environ)
    if value is None:
        return default
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false, yes/no, on/off), got {value!r}")


def env_int(
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    value = _raw(name, environ)
    if value is None or value.strip() == "":
        return default
    try:
        number = int(value.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}, got {number}")
    return number


def env_float(
    name: str,
    default: float,
    *,
    minimum: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> float:
    value = _raw(name, environ)
    if value is None or value.strip() == "":
        return default
    try:
        number = float(value.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    return number


def env_list(name: str, default: list[str], *, environ: Mapping[str, str] | None = None) -> list[str]:
    value = _raw(name, environ)
    if value is None:
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def env_url(name: str, default: str, *, schemes: tuple[str, ...], environ: Mapping[str, str] | None = None) -> str:
    value = env_str(name, default, environ=environ)
    if value and not value.startswith(tuple(f"{s}://" for s in schemes)):
        raise ImproperlyConfigured(
            f"{name} must start with one of {', '.join(s + '://' for s in schemes)}, got {value!r}"
        )
    return value


def database_from_url(url: str, *, base_dir: str) -> dict:
    """Django ``DATABASES['default']`` for a ``DATABASE_URL``.

    SQLite gets WAL journaling, a busy timeout and IMMEDIATE transactions so
    that the web process and the cluster process can write to one file
    without "database is locked" errors; PostgreSQL keeps connections open
    and checks them before reuse so that a database restart heals itself.
    """
    import dj_database_url

    if not url:
        url = f"sqlite:///{os.path.join(base_dir, 'makima.sqlite3')}"
    if not url.startswith(("sqlite://", "postgres://", "postgresql://", "pgsql://")):
        raise ImproperlyConfigured(
            f"DATABASE_URL must be a sqlite:// or postgresql:// URL, got {url.split('://')[0]!r}://…"
        )
    try:
        config = dj_database_url.parse(url)
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL cannot be parsed: {exc}") from None
    if config["ENGINE"] == "django.db.backends.sqlite3":
        config["OPTIONS"] = {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
        # Tests get a file too, not Django's shared-cache in-memory database:
        # there, a thread reading while another writes fails at once with
        # "database table is locked" (shared-cache locks ignore the busy
        # timeout), unlike the file the web and cluster processes share.
        config["TEST"] = {"NAME": os.path.join(tempfile.gettempdir(), f"makima-test-{os.getpid()}.sqlite3")}
    else:
        # A host that drops packets would otherwise hold a request (and
        # /healthz) until the kernel's TCP timeout, minutes later.
        config.setdefault("OPTIONS", {}).setdefault("connect_timeout", 5)
    # Keep connections: websocket consumers touch the database for every
    # message, and reconnecting (and re-running the PRAGMAs) each time costs
    # more than the queries themselves.
    config["CONN_MAX_AGE"] = 600
    config["CONN_HEALTH_CHECKS"] = True
    return config
