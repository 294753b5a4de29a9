"""Mint a user API key (or a daemon token) for an existing user."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from daemons.models import ApiToken
from daemons.services import token_create
from makima.state import Actor


class Command(BaseCommand):
    help = (
        "Create an API key (or, with --daemon, a daemon token) for an existing user. "
        "The token is printed once, alone on the last line of the output."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username", metavar="USER", help="Username of the token's owner.")
        parser.add_argument("--name", default="", help="A label to recognise the token by.")
        parser.add_argument(
            "--daemon", action="store_true", help="Create a daemon token (for `makima daemon run`) instead."
        )

    def handle(self, *args: Any, username: str, name: str, daemon: bool, **options: Any) -> None:
        User = get_user_model()
        try:
            owner = User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(f"No user named {username!r}; create it first (manage.py createsuperuser).") from None
        if not owner.is_active:
            raise CommandError(f"User {username!r} is inactive; its tokens would not work.")
        kind = ApiToken.Kind.DAEMON if daemon else ApiToken.Kind.USER
        new = token_create(owner=owner, kind=kind, name=name, actor=Actor("system", "createapikey"))
        what = "a daemon token" if daemon else "an API key"
        label = f" named {name!r}" if name else ""
        self.stdout.write(f"Created {what}{label} for {username}. It is shown only this once; store it now:")
        # The token alone on the last line, so that scripts can take `| tail -n 1`.
        self.stdout.write(new.plain)
