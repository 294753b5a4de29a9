"""``GET /healthz``: is this process able to do its work?

Three checks, run together, each bounded by ``MAKIMA_HEALTH_TIMEOUT_S``:

- **database** — ``SELECT 1`` on the default database;
- **channel_layer** — a real round trip: a message sent to a fresh channel is
  received back (with Redis, a Redis that is down or unreachable fails it);
- **cluster** — a django-q2 cluster is alive and schedules the orchestrator's
  tick. Every cluster's sentinel runs the scheduler about every 30 s, which
  moves the ``makima.orchestrator_tick`` schedule's ``next_run`` into the
  future; so that schedule must exist and its ``next_run`` must not be more
  than ``MAKIMA_HEALTH_CLUSTER_STALE_S`` (90 s) overdue. This is the only
  signal the ORM broker leaves in a place every process can read: its
  cluster status (``Stat``) lives in the Django cache, which is per process
  here. With the Redis broker the sentinel also saves its ``Stat`` to Redis
  every half second with a 3 s expiry, so there a cluster must also be listed
  by ``Stat.get_all()`` (and not stopping or stopped): a stopped cluster then
  fails the check within seconds rather than after the schedule goes stale.

200 ``{"status": "ok", "checks": {…}}`` when every check passes, else 503
with ``"status": "fail"`` and ``"failing": [names]``. No authentication (load
balancers poll it), so the answer reveals nothing secret: failures say what
failed and the exception's class, never its text (which may carry a host or
a user name); the details go to the log. It costs one query for the
database, one for the schedule, and two Redis round trips (one with the Redis
broker's ``KEYS``/``MGET``). ``SECURE_REDIRECT_EXEMPT`` keeps it reachable
over plain http behind a TLS-terminating load balancer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import Awaitable
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

logger = logging.getLogger(__name__)

TICK_SCHEDULE = "makima.orchestrator_tick"  # the name `setup_schedules` gives it

Result = dict[str, Any]


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


def check_database(*, using: str = DEFAULT_DB_ALIAS) -> Result:
    """A trivial query on the database ``using`` (an alias of ``DATABASES``)."""
    started = time.monotonic()
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT 1")
        row = cursor.fetchone()
    if row is None or row[0] != 1:
        return {"ok": False, "error": "SELECT 1 did not return 1"}
    return {"ok": True, "ms": _ms(started)}


async def check_channel_layer(*, alias: str = "default") -> Result:
    """Send a message to a new channel and receive it back."""
    started = time.monotonic()
    layer = get_channel_layer(alias)
    if layer is None:
        return {"ok": False, "error": "no channel layer is configured"}
    # A plain (not process-local "!") name: the receive is a direct pop of that one channel.
    channel = f"makima-healthz.{uuid.uuid4().hex}"
    nonce = uuid.uuid4().hex
    await layer.send(channel, {"type": "healthz.ping", "nonce": nonce})
    message = await layer.receive(channel)
    if message.get("nonce") != nonce:
        return {"ok": False, "error": "the channel layer returned another message"}
    return {"ok": True, "backend": type(layer).__name__, "ms": _ms(started)}


@functools.cache
def _broker() -> Any:
    # One broker (one Redis connection pool) per process, not one per probe.
    from django_q.brokers import get_broker

    return get_broker()


def check_cluster(*, broker: Any = None, now: datetime | None = None) -> Result:
    """A django-q2 cluster runs the scheduler (and, with Redis, reports its status)."""
    from django_q.brokers.orm import ORM
    from django_q.conf import Conf
    from django_q.models import Schedule
    from django_q.status import Stat

    now = now or timezone.now()
    runs = list(Schedule.objects.filter(name=TICK_SCHEDULE).values_list("next_run", flat=True)[:1])
    if not runs or runs[0] is None:
        return {"ok": False, "error": f"there is no {TICK_SCHEDULE} schedule; run `manage.py setup_schedules`"}
    overdue = max(0.0, (now - runs[0]).total_seconds())
    result: Result = {"ok": True, "schedule_overdue_s": round(overdue, 1)}
    if overdue > settings.MAKIMA_HEALTH_CLUSTER_STALE_S:
        return {
            **result,
            "ok": False,
            "error": f"{TICK_SCHEDULE} is {overdue:.0f} s overdue: no cluster is running the scheduler",
        }
    broker = broker if broker is not None else _broker()
    if isinstance(broker, ORM):
        return result  # the ORM broker keeps cluster status in a per-process cache: nothing more to read
    stopping = {str(Conf.STOPPING), str(Conf.STOPPED)}
    alive = [stat for stat in Stat.get_all(broker=broker) if str(stat.status) not in stopping]
    if not alive:
        return {
            **result,
            "ok": False,
            "clusters": 0,
            "error": "no django-q2 cluster reported its status in the last 3 s",
        }
    return {**result, "clusters": len(alive)}


async def _guarded(name: str, check: Awaitable[Result], timeout: float) -> Result:
    try:
        async with asyncio.timeout(timeout):
            return await check
    except TimeoutError:
        logger.warning("healthz: the %s check did not answer within %g s", name, timeout)
        return {"ok": False, "error": f"no answer within {timeout:g} s"}
    except Exception as exc:
        # The exception's text may name hosts or users: it goes to the log only.
        logger.warning("healthz: the %s check failed: %r", name, exc)
        return {"ok": False, "error": f"the check raised {type(exc).__name__}"}


async def run_checks() -> dict[str, Result]:
    """Every check, at the same time, each within ``MAKIMA_HEALTH_TIMEOUT_S``."""
    timeout = settings.MAKIMA_HEALTH_TIMEOUT_S
    checks = {
        "database": sync_to_async(check_database)(),
        "channel_layer": check_channel_layer(),
        "cluster": sync_to_async(check_cluster)(),
    }
    results = await asyncio.gather(*(_guarded(name, check, timeout) for name, check in checks.items()))
    return dict(zip(checks, results, strict=True))


@never_cache
@require_safe
async def healthz(request: HttpRequest) -> JsonResponse:
    checks = await run_checks()
    failing = [name for name, result in checks.items() if not result["ok"]]
    body: dict[str, Any] = {"status": "fail" if failing else "ok", "checks": checks}
    if failing:
        body["failing"] = failing
    return JsonResponse(body, status=503 if failing else 200)
