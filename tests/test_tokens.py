"""API keys, daemon tokens and task tokens: stored hashed, checked strictly."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
import time_machine
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext

from contracts.models import Task
from daemons.models import ApiToken
from daemons.services import token_authenticate, token_create, token_revoke
from directives.models import DirectiveEvent
from makima.state import Actor
from tests.factories import make_contract, make_directive, make_task, make_token

T0 = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def running_task(alice) -> Task:
    task = make_task(make_directive(alice))
    Task.objects.filter(pk=task.pk).update(status=Task.Status.RUNNING)
    task.refresh_from_db()
    return task


def _updates_of_api_tokens(queries: CaptureQueriesContext) -> list[str]:
    return [
        q["sql"] for q in queries.captured_queries if q["sql"].upper().startswith("UPDATE") and "apitoken" in q["sql"]
    ]


# --------------------------------------------------------------------------- creation


@pytest.mark.parametrize(
    ("kind", "prefix"),
    [(ApiToken.Kind.USER, "mk_u_"), (ApiToken.Kind.DAEMON, "mk_d_"), (ApiToken.Kind.TASK, "mk_t_")],
)
def test_the_plain_token_is_prefixed_by_its_kind(alice, running_task, kind, prefix):
    new = token_create(owner=alice, kind=kind, task=running_task if kind == ApiToken.Kind.TASK else None)

    assert new.plain.startswith(prefix)
    assert len(new.plain) > len(prefix) + 40
    assert new.token.kind == kind
    assert new.token.prefix == new.plain[: len(new.token.prefix)]


def test_only_a_sha256_digest_of_the_token_is_stored(alice):
    new = token_create(owner=alice, name="laptop")
    row = ApiToken.objects.get(pk=new.token.pk)

    assert row.digest == hashlib.sha256(new.plain.encode()).hexdigest()
    secret = new.plain[len(row.prefix) :]
    for field in ApiToken._meta.concrete_fields:
        value = str(field.value_from_object(row))
        assert new.plain not in value, field.name
        assert secret not in value, field.name


def test_the_plain_token_appears_nowhere_in_the_database(alice):
    new = token_create(owner=alice, kind=ApiToken.Kind.DAEMON, name="build box")
    out = StringIO()

    call_command("dumpdata", stdout=out)

    dump = out.getvalue()
    assert str(new.token.pk) in dump  # the dump did include the token's row
    assert new.plain not in dump
    assert new.plain[len(new.token.prefix) :] not in dump


def test_each_token_gets_its_own_secret(alice):
    plains = {token_create(owner=alice).plain for _ in range(5)}
    assert len(plains) == 5


def test_a_task_token_is_scoped_to_its_task_directive_and_contract(alice):
    directive = make_directive(alice)
    contract = make_contract(directive)
    task = make_task(directive, contract=contract)

    new = token_create(owner=alice, kind=ApiToken.Kind.TASK, task=task)

    assert (new.token.task_id, new.token.directive_id, new.token.contract_id) == (task.pk, directive.pk, contract.pk)


def test_a_task_token_needs_a_task_and_kinds_are_checked(alice):
    with pytest.raises(ValueError, match="needs its task"):
        token_create(owner=alice, kind=ApiToken.Kind.TASK)
    with pytest.raises(ValueError, match="unknown token kind"):
        token_create(owner=alice, kind="root")
    assert not ApiToken.objects.exists()


def test_creating_a_token_is_logged_without_the_secret(alice):
    new = token_create(owner=alice)

    event = DirectiveEvent.objects.get(event_type="token_created", subject_id=str(new.token.pk))
    assert event.data == {"kind": "user", "prefix": new.token.prefix}


# --------------------------------------------------------------------------- authentication


def test_a_live_token_authenticates_as_its_owner(alice):
    new = make_token(alice)

    token = token_authenticate(new.plain)

    assert token is not None
    assert token.pk == new.token.pk
    assert token.owner == alice


def test_a_revoked_token_does_not_authenticate(alice):
    new = make_token(alice)
    token_revoke(token=new.token, actor=Actor.for_user(alice))

    assert token_authenticate(new.plain) is None


def test_an_expired_token_does_not_authenticate(alice):
    with time_machine.travel(T0, tick=False):
        new = make_token(alice, expires_at=T0 + timedelta(hours=1))
        assert token_authenticate(new.plain) is not None
    with time_machine.travel(T0 + timedelta(hours=1), tick=False):
        assert token_authenticate(new.plain) is None


@pytest.mark.parametrize(
    "plain",
    ["", "mk_u_not-a-token", "mk_u_" + "x" * 300, None, 42],
    ids=["empty", "unknown", "too-long", "none", "not-text"],
)
def test_an_unknown_or_malformed_token_does_not_authenticate(alice, plain):
    make_token(alice)
    assert token_authenticate(plain) is None


def test_a_token_of_another_kind_does_not_authenticate_where_kinds_are_limited(alice):
    daemon = make_token(alice, ApiToken.Kind.DAEMON)
    user = make_token(alice, ApiToken.Kind.USER)
    only_daemons = frozenset({ApiToken.Kind.DAEMON})

    assert token_authenticate(user.plain, kinds=only_daemons) is None
    assert token_authenticate(daemon.plain, kinds=only_daemons).pk == daemon.token.pk
    assert token_authenticate(daemon.plain, kinds=frozenset({ApiToken.Kind.USER, ApiToken.Kind.TASK})) is None


def test_a_token_of_an_inactive_owner_does_not_authenticate(alice):
    new = make_token(alice)
    alice.is_active = False
    alice.save(update_fields=["is_active"])

    assert token_authenticate(new.plain) is None


def test_a_task_token_works_while_its_task_runs(alice, running_task):
    new = make_token(alice, ApiToken.Kind.TASK, task=running_task)

    assert token_authenticate(new.plain).task_id == running_task.pk


@pytest.mark.parametrize("ended", sorted(Task.TERMINAL))
def test_a_task_token_stops_working_when_its_task_has_ended(alice, running_task, ended):
    new = make_token(alice, ApiToken.Kind.TASK, task=running_task)
    # Behind the services' back, so that only the task's status (not a revocation) decides.
    Task.objects.filter(pk=running_task.pk).update(status=ended)

    assert token_authenticate(new.plain) is None


def test_the_last_use_is_recorded_at_most_once_a_minute(alice):
    new = make_token(alice)
    assert new.token.last_used_at is None

    with time_machine.travel(T0, tick=False):
        token_authenticate(new.plain)
    assert ApiToken.objects.get(pk=new.token.pk).last_used_at == T0

    with time_machine.travel(T0 + timedelta(seconds=59), tick=False), CaptureQueriesContext(connection) as queries:
        assert token_authenticate(new.plain) is not None
    assert _updates_of_api_tokens(queries) == []
    assert ApiToken.objects.get(pk=new.token.pk).last_used_at == T0

    with time_machine.travel(T0 + timedelta(seconds=61), tick=False):
        token_authenticate(new.plain)
    assert ApiToken.objects.get(pk=new.token.pk).last_used_at == T0 + timedelta(seconds=61)


def test_a_failed_authentication_does_not_record_a_use(alice):
    new = make_token(alice)
    token_revoke(token=new.token, actor=Actor.for_user(alice))

    token_authenticate(new.plain)

    assert ApiToken.objects.get(pk=new.token.pk).last_used_at is None


# --------------------------------------------------------------------------- revocation


def test_revoking_twice_is_a_no_op_with_one_event(alice):
    new = make_token(alice)
    actor = Actor.for_user(alice)

    with time_machine.travel(T0, tick=False):
        token_revoke(token=new.token, actor=actor)
    with time_machine.travel(T0 + timedelta(minutes=5), tick=False):
        token_revoke(token=new.token, actor=actor)
        # A stale copy that never saw the first revocation changes nothing either.
        stale = ApiToken.objects.get(pk=new.token.pk)
        stale.revoked_at = None
        token_revoke(token=stale, actor=actor)

    assert ApiToken.objects.get(pk=new.token.pk).revoked_at == T0
    events = DirectiveEvent.objects.filter(event_type="token_revoked", subject_id=str(new.token.pk))
    assert events.count() == 1
    assert events.get().actor == "alice"
