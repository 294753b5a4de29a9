"""``Authorization: Bearer <token>`` on the REST API: which tokens open it and which do not."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from daemons.models import ApiToken
from daemons.services import token_revoke
from makima.state import SYSTEM
from tests.factories import make_contract, make_daemon, make_directive, make_task, make_token

URLS = ["/api/v1/contracts/", "/api/v1/tasks/", "/api/v1/daemons/", "/api/v1/tokens/"]


def bearer(value: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {value}")
    return client


@pytest.mark.parametrize("url", URLS)
def test_a_user_api_key_opens_the_api_as_its_owner(alice, bob, url):
    directive = make_directive(alice)
    make_task(directive, contract=make_contract(directive))
    make_daemon(alice)
    response = bearer(make_token(alice).plain).get(url)
    assert response.status_code == 200
    assert response.json()["count"] >= 1
    assert bearer(make_token(bob).plain).get(url).json()["count"] == (1 if url == "/api/v1/tokens/" else 0)


@pytest.mark.parametrize("url", URLS)
def test_a_revoked_api_key_is_refused_with_401(alice, url):
    new = make_token(alice)
    token_revoke(token=new.token, actor=SYSTEM)
    response = bearer(new.plain).get(url)
    assert response.status_code == 401
    assert response.json()["detail"]


@pytest.mark.parametrize("url", URLS)
def test_an_expired_api_key_is_refused_with_401(alice, url):
    new = make_token(alice, expires_at=timezone.now() - timedelta(minutes=1))
    assert bearer(new.plain).get(url).status_code == 401


def test_an_api_key_that_has_not_expired_yet_works(alice):
    new = make_token(alice, expires_at=timezone.now() + timedelta(hours=1))
    assert bearer(new.plain).get("/api/v1/contracts/").status_code == 200


@pytest.mark.parametrize("url", URLS)
def test_a_daemon_token_is_refused_on_the_rest_api_with_401(alice, url):
    new = make_token(alice, kind=ApiToken.Kind.DAEMON)
    response = bearer(new.plain).get(url)
    assert response.status_code == 401
    assert "daemon" in response.json()["detail"].lower()


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("header", ["Bearer nonsense", "Bearer ", "Bearer", "Bearer mk_u_" + "x" * 300])
def test_a_garbage_bearer_token_is_refused_with_401(db, url, header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get(url)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_the_key_of_a_deactivated_user_is_refused(alice):
    new = make_token(alice)
    alice.is_active = False
    alice.save(update_fields=["is_active"])
    assert bearer(new.plain).get("/api/v1/contracts/").status_code == 401


def test_an_anonymous_request_is_told_to_use_a_bearer_token(api, db):
    response = api.get("/api/v1/contracts/")
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
