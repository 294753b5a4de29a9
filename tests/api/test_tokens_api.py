"""``/api/v1/tokens/``: a user's API keys and daemon tokens."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from daemons.models import ApiToken
from directives.models import DirectiveEvent
from tests.factories import make_directive, make_task, make_token


def bearer(value: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {value}")
    return client


def test_creating_an_api_key_shows_its_value_once(api_as, alice):
    client = api_as(alice)
    response = client.post("/api/v1/tokens/", {"name": "laptop"}, format="json")
    assert response.status_code == 201
    body = response.json()
    plain = body["token"]
    assert plain.startswith("mk_u_")
    assert body["kind"] == "user"
    assert body["name"] == "laptop"
    assert plain.startswith(body["prefix"])
    assert "digest" not in body
    token = ApiToken.objects.get(pk=body["id"])
    assert token.owner == alice

    detail = client.get(f"/api/v1/tokens/{token.pk}/")
    listing = client.get("/api/v1/tokens/")
    for response in (detail, listing):
        assert response.status_code == 200
        assert plain not in response.content.decode()
        assert token.digest not in response.content.decode()
    assert "token" not in detail.json()
    assert set(detail.json()) == {
        "id",
        "name",
        "kind",
        "prefix",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    }


def test_a_created_api_key_opens_the_api(api_as, alice):
    plain = api_as(alice).post("/api/v1/tokens/", {"name": "cli", "kind": "user"}, format="json").json()["token"]
    assert bearer(plain).get("/api/v1/contracts/").status_code == 200


def test_a_daemon_token_can_be_created_but_does_not_open_the_rest_api(api_as, alice):
    response = api_as(alice).post("/api/v1/tokens/", {"name": "build box", "kind": "daemon"}, format="json")
    assert response.status_code == 201
    assert response.json()["token"].startswith("mk_d_")
    assert ApiToken.objects.get(pk=response.json()["id"]).kind == ApiToken.Kind.DAEMON
    assert bearer(response.json()["token"]).get("/api/v1/contracts/").status_code == 401


def test_creating_a_token_records_who_did_it(api_as, alice):
    response = api_as(alice).post("/api/v1/tokens/", {"name": "laptop"}, format="json")
    event = DirectiveEvent.objects.get(event_type="token_created", subject_id=response.json()["id"])
    assert (event.actor_type, event.actor) == ("user", "alice")


@pytest.mark.parametrize(
    "body",
    [
        {"kind": "user"},
        {"name": "", "kind": "user"},
        {"name": "x" * 201},
        {"name": "agent", "kind": "task"},
        {"name": "root", "kind": "admin"},
        {"name": "old", "expires_at": "2001-01-01T00:00:00Z"},
        {"name": "when", "expires_at": "tomorrow"},
    ],
    ids=["no-name", "blank-name", "long-name", "task-kind", "unknown-kind", "past-expiry", "bad-expiry"],
)
def test_a_bad_token_request_is_refused_with_400_and_creates_nothing(api_as, alice, body):
    response = api_as(alice).post("/api/v1/tokens/", body, format="json")
    assert response.status_code == 400
    assert response.json()["detail"]
    assert response.json()["errors"]
    assert not ApiToken.objects.exists()


def test_malformed_json_is_refused_with_400(api_as, alice):
    response = api_as(alice).post("/api/v1/tokens/", '{"name": ', content_type="application/json")
    assert response.status_code == 400
    assert response.json()["detail"]
    assert not ApiToken.objects.exists()


def test_a_token_may_be_given_an_expiry(api_as, alice):
    expires = timezone.now() + timedelta(days=30)
    response = api_as(alice).post("/api/v1/tokens/", {"name": "temp", "expires_at": expires.isoformat()}, format="json")
    assert response.status_code == 201
    assert ApiToken.objects.get(pk=response.json()["id"]).expires_at == expires


def test_revoking_a_token_stops_it_at_once_and_keeps_it_listed(api_as, alice):
    new = make_token(alice)
    assert bearer(new.plain).get("/api/v1/tasks/").status_code == 200
    client = api_as(alice)

    response = client.post(f"/api/v1/tokens/{new.token.pk}/revoke/")
    assert response.status_code == 200
    assert response.json()["revoked_at"] is not None
    assert bearer(new.plain).get("/api/v1/tasks/").status_code == 401
    [row] = client.get("/api/v1/tokens/").json()["results"]
    assert row["revoked_at"] == response.json()["revoked_at"]
    assert DirectiveEvent.objects.filter(event_type="token_revoked", subject_id=str(new.token.pk)).count() == 1


def test_revoking_a_revoked_token_changes_nothing(api_as, alice):
    new = make_token(alice)
    client = api_as(alice)
    first = client.post(f"/api/v1/tokens/{new.token.pk}/revoke/").json()["revoked_at"]
    second = client.post(f"/api/v1/tokens/{new.token.pk}/revoke/")
    assert second.status_code == 200
    assert second.json()["revoked_at"] == first
    assert DirectiveEvent.objects.filter(event_type="token_revoked").count() == 1


def test_an_api_key_can_revoke_itself(alice):
    new = make_token(alice)
    client = bearer(new.plain)
    assert client.post(f"/api/v1/tokens/{new.token.pk}/revoke/").status_code == 200
    assert client.get("/api/v1/tokens/").status_code == 401


def test_task_tokens_are_neither_listed_nor_reachable(api_as, alice):
    task_token = make_token(alice, kind=ApiToken.Kind.TASK, task=make_task(make_directive(alice))).token
    key = make_token(alice).token
    client = api_as(alice)
    assert [row["id"] for row in client.get("/api/v1/tokens/").json()["results"]] == [str(key.pk)]
    assert client.get(f"/api/v1/tokens/{task_token.pk}/").status_code == 404
    assert client.post(f"/api/v1/tokens/{task_token.pk}/revoke/").status_code == 404
    task_token.refresh_from_db()
    assert task_token.revoked_at is None


def test_tokens_can_be_filtered_by_kind(api_as, alice):
    make_token(alice)
    daemon = make_token(alice, kind=ApiToken.Kind.DAEMON).token
    response = api_as(alice).get("/api/v1/tokens/?kind=daemon")
    assert [row["id"] for row in response.json()["results"]] == [str(daemon.pk)]
    assert api_as(alice).get("/api/v1/tokens/?kind=task").status_code == 400
