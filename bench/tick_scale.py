"""Tick wall time and query count at 10, 100 and 1,000 active directives of 20 steps.

    .venv/bin/python bench/tick_scale.py            # SQLite in a temporary file
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/makima_bench .venv/bin/python bench/tick_scale.py

Each directive is a linear chain of 20 steps whose first step runs on a
connected daemon: the steady state a tick spends most of its life in.
"""

from __future__ import annotations

import statistics
import time

from _setup import django_setup

SIZES = (10, 100, 1000)
STEPS = 20
REPEATS = 5


def main() -> None:
    vendor = django_setup()
    from django.contrib.auth.models import User
    from django.db import connection, reset_queries
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from daemons.models import Daemon
    from directives.lifecycle import tick
    from directives.models import Directive
    from tests.factories import make_steady_directives

    owner, _ = User.objects.get_or_create(username="bench")
    daemon, _ = Daemon.objects.get_or_create(
        owner=owner,
        name="bench-daemon",
        defaults={"status": "connected", "capabilities": ["scripted"], "max_concurrent_tasks": 100000},
    )
    print(f"database: {vendor}; {STEPS} steps per directive; median of {REPEATS} ticks")
    print(f"{'directives':>10} {'queries':>8} {'median ms':>10} {'max ms':>8}")
    for size in SIZES:
        Directive.objects.filter(owner=owner).delete()
        make_steady_directives(owner, daemon, size, steps=STEPS)
        Daemon.objects.filter(pk=daemon.pk).update(last_seen_at=timezone.now())
        times = []
        queries = 0
        for _ in range(REPEATS):
            reset_queries()
            with CaptureQueriesContext(connection) as captured:
                started = time.perf_counter()
                tick()
                times.append((time.perf_counter() - started) * 1000)
            queries = len(captured)
        print(f"{size:>10} {queries:>8} {statistics.median(times):>10.1f} {max(times):>8.1f}")


if __name__ == "__main__":
    main()
