"""Tokens are stored as SHA-256 digests: the plain value is nowhere in the database."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from io import StringIO

import time_machine
from django.core.management import call_command
from django.db import connection
from rest_framework.test import APIClient

from daemons.models import ApiToken
from daemons.services import token_create
from tests.factories import make_contract, make_directive, make_task


def bearer(value: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {value}")
    return client


def every_stored_value() -> str:
    """Every value of every row of every table, as text."""
    chunks: list[str] = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f"SELECT * FROM {connection.ops.quote_name(table)}")
            for row in cursor.fetchall():
                for value in row:
                    if isinstance(value, memoryview):
                        value = value.tobytes()
                    if isinstance(value, bytes):
                        value = value.decode("utf-8", errors="replace")
                    chunks.append(str(value))
    return "\n".join(chunks)


def make_some_tokens(api_as, alice) -> list[str]:
    client = api_as(alice)
    plains = [
        client.post("/api/v1/tokens/", {"name": "laptop", "kind": "user"}, format="json").json()["token"],
        client.post("/api/v1/tokens/", {"name": "build box", "kind": "daemon"}, format="json").json()["token"],
        token_create(owner=alice, name="service").plain,
    ]
    directive = make_directive(alice)
    task = make_task(directive, contract=make_contract(directive))
    plains.append(token_create(owner=alice, kind=ApiToken.Kind.TASK, task=task).plain)
    # Use every token once, so that "last used" bookkeeping has written what it writes.
    for plain in plains:
        bearer(plain).get("/api/v1/tasks/")
    return plains


def test_no_apitoken_column_holds_a_plain_token(api_as, alice):
    plains = make_some_tokens(api_as, alice)
    columns = [field.attname for field in ApiToken._meta.concrete_fields]
    for row in ApiToken.objects.values_list(*columns):
        for value in row:
            for plain in plains:
                assert plain not in str(value)


def test_no_table_of_the_database_holds_a_plain_token(api_as, alice):
    plains = make_some_tokens(api_as, alice)
    stored = every_stored_value()
    assert ApiToken.objects.count() == 4 and stored
    for plain in plains:
        assert plain not in stored
        # Not even the secret part without its recognisable prefix.
        assert plain[5:] not in stored


def test_a_dump_of_the_database_holds_no_plain_token(api_as, alice):
    plains = make_some_tokens(api_as, alice)
    dump = StringIO()
    call_command("dumpdata", stdout=dump)
    assert '"daemons.apitoken"' in dump.getvalue()
    for plain in plains:
        assert plain not in dump.getvalue()


def test_the_stored_digest_is_the_sha256_of_the_plain_token(api_as, alice):
    response = api_as(alice).post("/api/v1/tokens/", {"name": "laptop"}, format="json")
    plain = response.json()["token"]
    token = ApiToken.objects.get(pk=response.json()["id"])
    assert token.digest == hashlib.sha256(plain.encode()).hexdigest()
    assert token.prefix == plain[: len(token.prefix)] and len(token.prefix) < len(plain) // 3


def test_a_revoked_token_stops_working(api_as, alice):
    client = api_as(alice)
    response = client.post("/api/v1/tokens/", {"name": "laptop"}, format="json")
    plain = response.json()["token"]
    assert bearer(plain).get("/api/v1/tasks/").status_code == 200
    client.post(f"/api/v1/tokens/{response.json()['id']}/revoke/")
    assert bearer(plain).get("/api/v1/tasks/").status_code == 401


def test_the_last_use_of_a_token_is_recorded(alice):
    new = token_create(owner=alice, name="laptop")
    assert new.token.last_used_at is None
    with time_machine.travel("2030-01-01 12:00:00Z", tick=False):
        bearer(new.plain).get("/api/v1/tasks/")
    new.token.refresh_from_db()
    noon = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    assert new.token.last_used_at == noon
    # A use a few minutes later is recorded again.
    with time_machine.travel("2030-01-01 12:05:00Z", tick=False):
        bearer(new.plain).get("/api/v1/tasks/")
    new.token.refresh_from_db()
    assert new.token.last_used_at == noon + timedelta(minutes=5)
