"""``GET /metrics``: figures for Prometheus, in its text exposition format (0.0.4).

Several daphne processes and cluster workers share the work, so nothing is
counted in process memory: every figure is read from the database when the
scrape arrives, in a fixed number of queries (six) however many rows there are.

- ``makima_tasks{status}`` (gauge): tasks by status, every status, zeros included;
- ``makima_directives{status}`` (gauge): directives by status;
- ``makima_daemons_connected`` (gauge): daemons whose websocket is connected;
- ``makima_outbox_depth{status}`` (gauge): daemon commands not yet
  acknowledged (``queued``, ``sent``); ``makima_outbox_oldest_age_seconds``
  (gauge): the age of the oldest of them, 0 when there is none;
- ``makima_dispatch_latency_seconds`` (histogram): from a task becoming
  pending (created, or put back after an interruption or a refusal) to its
  dispatch to a daemon, over the dispatches of the last hour (of at most the
  latest 2000 tasks), read from the ``task_created``/``task_pending``/
  ``task_starting`` events of the audit log;
- ``makima_tick_duration_seconds`` (histogram): the run time of the last 100
  ``orchestrator_tick`` runs that django-q2 recorded (:func:`tick_duration`);
  the latest of them as
  ``makima_tick_last_duration_seconds``, ``makima_tick_last_run_timestamp_seconds``
  (when it ended, Unix time) and ``makima_tick_last_run_success`` (1 or 0).

The two histograms describe a sliding sample, not counts since start-up:
read them with ``histogram_quantile(0.9, makima_dispatch_latency_seconds_bucket)``
directly, never through ``rate()``.

Access: when ``MAKIMA_METRICS_TOKEN`` is set, a request must carry
``Authorization: Bearer <that token>`` (else 401). When it is not set, only
requests made directly from this machine are answered (the peer address is
loopback and no ``X-Forwarded-For``/``Forwarded`` header says a proxy passed
on someone else's request); anything else gets 403. The figures are counts,
but they still describe the fleet's activity, hence not public by default.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Min
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from contracts.models import Task
from daemons.authentication import bearer_from_header
from daemons.models import Daemon, DaemonCommand
from directives.models import Directive, DirectiveEvent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DISPATCH_WINDOW = timedelta(hours=1)
DISPATCH_SAMPLE = 2000
DISPATCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
TICK_FUNC = "directives.tasks.orchestrator_tick"
TICK_SAMPLE = 100
TICK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

BECAME_PENDING = ("task_created", "task_pending")
DISPATCHED = "task_starting"

Labels = dict[str, str]


# --------------------------------------------------------------------------- the text format


def _value(number: float) -> str:
    if isinstance(number, int):
        return str(number)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(float(number))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, labels: Labels, number: float) -> str:
    if labels:
        inner = ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items())
        return f"{name}{{{inner}}} {_value(number)}"
    return f"{name} {_value(number)}"


class Exposition:
    """Lines of the text format, one ``# HELP``/``# TYPE`` header per metric."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def _header(self, name: str, kind: str, help_text: str) -> None:
        escaped = help_text.replace("\\", "\\\\").replace("\n", " ")
        self.lines.append(f"# HELP {name} {escaped}")
        self.lines.append(f"# TYPE {name} {kind}")

    def gauge(self, name: str, help_text: str, samples: Iterable[tuple[Labels, float]]) -> None:
        self._header(name, "gauge", help_text)
        self.lines.extend(_sample(name, labels, number) for labels, number in samples)

    def histogram(self, name: str, help_text: str, observations: Sequence[float], buckets: Sequence[float]) -> None:
        self._header(name, "histogram", help_text)
        for bound in (*buckets, math.inf):
            count = sum(1 for seconds in observations if seconds <= bound)
            self.lines.append(_sample(f"{name}_bucket", {"le": _value(float(bound))}, count))
        self.lines.append(_sample(f"{name}_sum", {}, float(sum(observations))))
        self.lines.append(_sample(f"{name}_count", {}, len(observations)))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# --------------------------------------------------------------------------- reading the figures


def _by_status(queryset: Any, statuses: Iterable[str]) -> list[tuple[Labels, float]]:
    counts = dict(queryset.order_by().values("status").annotate(n=Count("pk")).values_list("status", "n"))
    return [({"status": status}, counts.get(status, 0)) for status in statuses]


def dispatch_latencies(*, now: datetime) -> list[float]:
    """Seconds from pending to dispatched for each dispatch since ``now - DISPATCH_WINDOW``.

    One query: every pending/dispatch event of the latest ``DISPATCH_SAMPLE``
    tasks dispatched in the window, in the order they happened. A task may
    have several (a retry or a refusal puts it back to pending): each
    dispatch is measured from the latest time the task became pending.
    """
    since = now - DISPATCH_WINDOW
    recent = (
        DirectiveEvent.objects.filter(subject_type="task", event_type=DISPATCHED, created_at__gte=since)
        .order_by("-id")
        .values("subject_id")[:DISPATCH_SAMPLE]
    )
    rows = (
        DirectiveEvent.objects.filter(
            subject_type="task", subject_id__in=recent, event_type__in=(*BECAME_PENDING, DISPATCHED)
        )
        .order_by("id")
        .values_list("subject_id", "event_type", "created_at")
    )
    pending_since: dict[str, datetime] = {}
    latencies: list[float] = []
    for subject, event_type, at in rows:
        if event_type in BECAME_PENDING:
            pending_since[subject] = at
        elif subject in pending_since:
            became_pending = pending_since.pop(subject)
            if at >= since:
                latencies.append(max(0.0, (at - became_pending).total_seconds()))
    return latencies


def tick_duration(started: datetime, stopped: datetime, result: Any) -> float:
    """How long one recorded tick ran: the ``seconds`` the tick measured itself
    and returned, else (a failed run has a traceback for a result)
    ``stopped - started``, which is longer: django-q2 stamps ``started`` when
    the task is enqueued, so it also counts the wait for a free worker."""
    if isinstance(result, dict) and isinstance(result.get("seconds"), int | float):
        return max(0.0, float(result["seconds"]))
    return max(0.0, (stopped - started).total_seconds())


def collect(*, now: datetime | None = None) -> str:
    """The whole exposition, read from the database now."""
    from django_q.models import Task as QueuedTask

    now = now or timezone.now()
    out = Exposition()
    out.gauge("makima_tasks", "Tasks by status.", _by_status(Task.objects.all(), Task.Status.values))
    out.gauge(
        "makima_directives", "Directives by status.", _by_status(Directive.objects.all(), Directive.Status.values)
    )
    out.gauge(
        "makima_daemons_connected",
        "Daemons whose websocket is connected.",
        [({}, Daemon.objects.filter(status=Daemon.Status.CONNECTED).count())],
    )

    undelivered = (DaemonCommand.Status.QUEUED, DaemonCommand.Status.SENT)
    outbox = {
        status: (n, oldest)
        for status, n, oldest in DaemonCommand.objects.filter(status__in=undelivered)
        .order_by()
        .values("status")
        .annotate(n=Count("pk"), oldest=Min("created_at"))
        .values_list("status", "n", "oldest")
    }
    out.gauge(
        "makima_outbox_depth",
        "Daemon commands not yet acknowledged, by status.",
        [({"status": status}, outbox.get(status, (0, None))[0]) for status in undelivered],
    )
    oldest = min((first for _, first in outbox.values() if first is not None), default=None)
    out.gauge(
        "makima_outbox_oldest_age_seconds",
        "Age of the oldest daemon command not yet acknowledged (0 when there is none).",
        [({}, max(0.0, (now - oldest).total_seconds()) if oldest else 0)],
    )

    out.histogram(
        "makima_dispatch_latency_seconds",
        "Seconds from a task becoming pending to its dispatch to a daemon, over the last hour's dispatches.",
        dispatch_latencies(now=now),
        DISPATCH_BUCKETS,
    )

    ticks = list(
        QueuedTask.objects.filter(func=TICK_FUNC)
        .exclude(started__isnull=True)
        .exclude(stopped__isnull=True)
        .order_by("-stopped")
        .values_list("started", "stopped", "success", "result")[:TICK_SAMPLE]
    )
    durations = [tick_duration(started, stopped, result) for started, stopped, _, result in ticks]
    out.histogram(
        "makima_tick_duration_seconds",
        f"Run time of the last {TICK_SAMPLE} orchestrator ticks recorded by django-q2.",
        durations,
        TICK_BUCKETS,
    )
    if ticks:
        _, last_stopped, last_success, _ = ticks[0]
        out.gauge("makima_tick_last_duration_seconds", "Run time of the latest tick.", [({}, durations[0])])
        out.gauge(
            "makima_tick_last_run_timestamp_seconds",
            "When the latest tick ended (Unix time).",
            [({}, last_stopped.timestamp())],
        )
        out.gauge("makima_tick_last_run_success", "1 when the latest tick succeeded.", [({}, int(bool(last_success)))])
    return out.text()


# --------------------------------------------------------------------------- the view


def _refusal(request: HttpRequest) -> HttpResponse | None:
    """The answer for a request that may not read the metrics, else ``None``."""
    expected = settings.MAKIMA_METRICS_TOKEN
    if expected:
        given = bearer_from_header(request.headers.get("Authorization")) or ""
        if hmac.compare_digest(given.encode(), expected.encode()):
            return None
        response = HttpResponse("metrics: a valid bearer token is required\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    try:
        local = ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        local = False
    # A proxy on this host forwards other machines' requests from a loopback address.
    proxied = "HTTP_X_FORWARDED_FOR" in request.META or "HTTP_FORWARDED" in request.META
    if local and not proxied:
        return None
    return HttpResponse(
        "metrics: set MAKIMA_METRICS_TOKEN to scrape from another machine\n", status=403, content_type="text/plain"
    )


@never_cache
@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    return HttpResponse(collect(), content_type=CONTENT_TYPE)
