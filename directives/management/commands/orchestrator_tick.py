"""Run the orchestrator's safety-net tick once, or in a loop."""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import close_old_connections

from directives.lifecycle import tick


class Command(BaseCommand):
    help = "Reconcile leases and approvals, then run every orchestrator phase for every live directive."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--loop", action="store_true", help="Tick forever, every --interval seconds.")
        parser.add_argument("--interval", type=float, default=None, help="Seconds between ticks (MAKIMA_TICK_SECONDS).")

    def handle(self, *args: Any, loop: bool, interval: float | None, **options: Any) -> None:
        interval = interval if interval is not None else settings.MAKIMA_TICK_SECONDS
        if interval <= 0:
            raise ValueError("--interval must be positive")
        while True:
            started = time.monotonic()
            stats = tick()
            self.stdout.write(" ".join(f"{key}={value}" for key, value in sorted(stats.items())))
            if not loop:
                return
            close_old_connections()
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
