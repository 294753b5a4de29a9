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
        "Create the demo user (with a fresh password, printed), a bare git repository holding a small "
        "Python package, and a demo directive on it that the scripted agent plans as a diamond of steps."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--username", default="demo")
        parser.add_argument("--password", help="Use this password instead of a random one.")
        parser.add_argument(
            "--repository",
            default=str(Path(settings.BASE_DIR) / "var" / "demo" / "greeter.git"),
            help="Where the demo's bare repository lives (created if missing).",
        )
        parser.add_argument("--start", action="store_true", help="Start the demo directive.")

    def handle(self, *args: Any, username: str, password: str | None, repository: str, start: bool, **options: Any):
        password = password or secrets.token_urlsafe(9)
        path = demo.build_repository(Path(repository))
        User = get_user_model()
        with transaction.atomic():
            user, created = User.objects.get_or_create(username=username, defaults={"email": f"{username}@localhost"})
            user.is_staff = True
            user.is_superuser = True
            user.set_password(password)
            user.save()
            # A finished demo gets a fresh one, so that every run shows the whole lifecycle.
            directive = (
                Directive.objects.filter(owner=user, title=demo.TITLE)
                .exclude(status__in=Directive.TERMINAL)
                .order_by("-created_at")
                .first()
            )
            if directive is None:
                directive = directive_create(owner=user, repository_url=str(path), **demo.DIRECTIVE)
            if start and directive.status == Directive.Status.DRAFT:
                directive_start(directive=directive, actor=Actor.for_user(user))
        self.stdout.write(f"Demo user {'created' if created else 'updated'}: {username} / {password}")
        self.stdout.write(f"Demo repository: {path}")
        self.stdout.write(f"Demo directive: {directive.pk} ({directive.status})")
