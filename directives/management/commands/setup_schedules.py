"""Create or update makima's django-q2 schedules; remove obsolete ones. Idempotent."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django_q.models import Schedule

PREFIX = "makima."


def tick_cron(seconds: int) -> str:
    """A cron expression (croniter's 6-field form with seconds last) for every ``seconds``."""
    if seconds < 60:
        return f"* * * * * */{seconds}"
    return f"*/{max(1, seconds // 60)} * * * *"


def desired_schedules() -> dict[str, dict[str, Any]]:
    return {
        f"{PREFIX}orchestrator_tick": {
            "func": "directives.tasks.orchestrator_tick",
            "schedule_type": Schedule.CRON,
            "cron": tick_cron(settings.MAKIMA_TICK_SECONDS),
            "repeats": -1,
        },
    }


class Command(BaseCommand):
    help = "Create or update makima's django-q2 schedules (idempotent) and delete obsolete ones."

    def handle(self, *args: Any, **options: Any) -> None:
        wanted = desired_schedules()
        for name, fields in wanted.items():
            _, created = Schedule.objects.update_or_create(name=name, defaults=fields)
            self.stdout.write(f"{'created' if created else 'updated'} schedule {name}: {fields['cron']}")
        obsolete = Schedule.objects.filter(name__startswith=PREFIX).exclude(name__in=wanted)
        for name in obsolete.values_list("name", flat=True):
            self.stdout.write(f"deleted obsolete schedule {name}")
        obsolete.delete()
