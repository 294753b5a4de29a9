"""Create (or refresh) the demo user, the demo repository and the demo directive."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from directives import demo
from directives.models import Directive
from directives.services import directive_create, directive_start
from makima.state import Actor


class Command(BaseCommand):
    help = (
        "Create the demo user (with a fresh password, printed), bare git repositories holding a small "
        "Python package, and two demo directives on them that the scripted agent plans as a diamond of "
        "steps: one runs to completion on its own, the other waits for a person to approve a step."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--username", default="demo")
        parser.add_argument("--password", help="Use this password instead of a random one.")
        parser.add_argument(
            "--repository",
            default=str(Path(settings.BASE_DIR) / "var" / "demo" / "greeter.git"),
            help="Where the demo's bare repository lives (created if missing); the reviewed directive's "
            "repository is created next to it.",
        )
        parser.add_argument(
            "--pace",
            type=float,
            default=3.0,
            help="Seconds every step's agent takes at least, so that the dashboard shows each step run.",
        )
        parser.add_argument("--start", action="store_true", help="Start the demo directives.")

    def handle(
        self, *args: Any, username: str, password: str | None, repository: str, pace: float, start: bool, **options: Any
    ) -> None:
        password = password or secrets.token_urlsafe(9)
        path = demo.build_repository(Path(repository), script=demo.paced(demo.SCRIPT, pace))
        review_path = demo.build_repository(
            Path(repository).with_name(Path(repository).stem + "-review.git"),
            script=demo.paced(demo.REVIEW_SCRIPT, pace),
        )
        User = get_user_model()
        with transaction.atomic():
            user, created = User.objects.get_or_create(username=username, defaults={"email": f"{username}@localhost"})
            user.is_staff = True
            user.is_superuser = True
            user.set_password(password)
            user.save()
            directive = self._directive(user, demo.DIRECTIVE, path, start=start)
            review = self._directive(user, demo.REVIEW_DIRECTIVE, review_path, start=start)
        self.stdout.write(f"Demo user {'created' if created else 'updated'}: {username} / {password}")
        self.stdout.write(f"Demo repository: {path}")
        self.stdout.write(f"Demo directive: {directive.pk} ({directive.status})")
        self.stdout.write(f"Demo directive to review: {review.pk} ({review.status})")

    def _directive(self, user: Any, fields: dict[str, Any], path: Path, *, start: bool) -> Directive:
        # A finished demo gets a fresh one, so that every run shows the whole lifecycle.
        directive = (
            Directive.objects.filter(owner=user, title=fields["title"])
            .exclude(status__in=Directive.TERMINAL)
            .order_by("-created_at")
            .first()
        )
        if directive is None:
            directive = directive_create(owner=user, repository_url=str(path), **fields)
        if start and directive.status == Directive.Status.DRAFT:
            directive_start(directive=directive, actor=Actor.for_user(user))
        return directive
