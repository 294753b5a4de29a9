"""Create (or refresh) the demo user and a sample directive for the local stack."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from directives.models import Directive
from directives.services import StepSpec, directive_create, steps_add
from makima.state import Actor

DEMO_TITLE = "Add a greeting module"


class Command(BaseCommand):
    help = "Create the demo user (with a fresh password, printed) and a sample draft directive."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--username", default="demo")
        parser.add_argument("--password", help="Use this password instead of a random one.")

    def handle(self, *args: Any, username: str, password: str | None, **options: Any) -> None:
        password = password or secrets.token_urlsafe(9)
        User = get_user_model()
        with transaction.atomic():
            user, created = User.objects.get_or_create(username=username, defaults={"email": f"{username}@localhost"})
            user.is_staff = True
            user.is_superuser = True
            user.set_password(password)
            user.save()
            if not Directive.objects.filter(owner=user, title=DEMO_TITLE).exists():
                directive = directive_create(
                    owner=user,
                    title=DEMO_TITLE,
                    goal="Add a `greet(name)` function to the demo package, with tests and documentation.",
                    requirements=["greet('Ada') returns 'Hello, Ada!'"],
                    acceptance_criteria=["pytest passes", "README documents greet()"],
                    constraints=["Standard library only"],
                    repository_url="demo-repo",
                    agent="scripted",
                    verifiers=["pytest -q"],
                )
                steps_add(
                    directive=directive,
                    specs=[
                        StepSpec(name="Design the API", step_type="design", order_index=0),
                        StepSpec(name="Implement greet", step_type="implement", depends_on=["Design the API"]),
                        StepSpec(name="Write tests", step_type="test", depends_on=["Design the API"]),
                        StepSpec(
                            name="Document greet",
                            step_type="document",
                            depends_on=["Implement greet", "Write tests"],
                        ),
                    ],
                    actor=Actor.for_user(user),
                )
        self.stdout.write(f"Demo user {'created' if created else 'updated'}: {username} / {password}")
