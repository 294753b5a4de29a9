"""``manage.py createapikey``: a token for an existing user, printed once, last."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from daemons.models import ApiToken
from daemons.services import token_authenticate


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def createapikey(*args: str) -> list[str]:
    out = StringIO()
    call_command("createapikey", *args, stdout=out)
    return out.getvalue().splitlines()


def test_it_prints_a_user_api_key_alone_on_the_last_line(alice):
    lines = createapikey("alice")

    plain = lines[-1]
    assert plain.startswith("mk_u_")
    assert plain == plain.strip() and " " not in plain
    token = token_authenticate(plain)
    assert token is not None
    assert (token.owner, token.kind) == (alice, ApiToken.Kind.USER)


def test_it_says_what_it_created_for_whom_and_that_it_is_shown_once(alice):
    lines = createapikey("alice")

    explanation = " ".join(lines[:-1])
    assert "alice" in explanation
    assert "an API key" in explanation
    assert "once" in explanation
    assert lines[-1] not in explanation


def test_with_daemon_it_creates_a_daemon_token(alice):
    lines = createapikey("alice", "--daemon")

    assert "a daemon token" in lines[0]
    plain = lines[-1]
    assert plain.startswith("mk_d_")
    token = token_authenticate(plain, kinds=frozenset({ApiToken.Kind.DAEMON}))
    assert token is not None and token.owner == alice


def test_it_stores_the_name(alice):
    plain = createapikey("alice", "--name", "CI runner")[-1]

    assert token_authenticate(plain).name == "CI runner"


def test_each_run_creates_a_new_token(alice):
    first = createapikey("alice")[-1]
    second = createapikey("alice")[-1]

    assert first != second
    assert ApiToken.objects.filter(owner=alice).count() == 2


def test_an_unknown_user_is_refused_and_nothing_is_created(alice):
    with pytest.raises(CommandError, match="No user named 'mallory'"):
        createapikey("mallory", "--daemon")

    assert not ApiToken.objects.exists()


def test_an_inactive_user_is_refused_and_nothing_is_created(alice):
    alice.is_active = False
    alice.save(update_fields=["is_active"])

    with pytest.raises(CommandError, match="inactive"):
        createapikey("alice")

    assert not ApiToken.objects.exists()
