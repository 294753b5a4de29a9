"""Who may use the daemons and tokens endpoints: only their owner, never a team member."""

from __future__ import annotations

from typing import Any

import pytest

from daemons.models import ApiToken
from tests.factories import make_daemon, make_token

# (method, url template, body, status for the owner)
ENDPOINTS = {
    "daemons-list": ("get", "/api/v1/daemons/", None, 200),
    "daemon-detail": ("get", "/api/v1/daemons/{daemon}/", None, 200),
    "tokens-list": ("get", "/api/v1/tokens/", None, 200),
    "token-create": ("post", "/api/v1/tokens/", {"name": "laptop", "kind": "user"}, 201),
    "token-detail": ("get", "/api/v1/tokens/{token}/", None, 200),
    "token-revoke": ("post", "/api/v1/tokens/{token}/revoke/", None, 200),
}
LISTS = ["daemons-list", "tokens-list"]
OBJECT_ENDPOINTS = ["daemon-detail", "token-detail", "token-revoke"]


@pytest.fixture
def world(alice, carol):
    return {
        "daemon": make_daemon(alice).pk,
        "token": make_token(alice, name="ci").token.pk,
        "daemon_token": make_token(alice, kind=ApiToken.Kind.DAEMON, name="build box").token.pk,
    }


def call(client: Any, endpoint: str, objects: dict[str, Any]) -> Any:
    method, template, body, _ = ENDPOINTS[endpoint]
    return getattr(client, method)(template.format(**objects), body, format="json")


def alices_tokens_untouched(world: dict[str, Any]) -> bool:
    return not ApiToken.objects.filter(pk__in=[world["token"], world["daemon_token"]], revoked_at__isnull=False)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_anonymous_requests_are_refused_with_401(api, world, endpoint):
    response = call(api, endpoint, world)
    assert response.status_code == 401
    assert alices_tokens_untouched(world)
    assert ApiToken.objects.count() == 2


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_owner_can_use_every_endpoint(api_as, alice, world, endpoint):
    assert call(api_as(alice), endpoint, world).status_code == ENDPOINTS[endpoint][3]


@pytest.mark.parametrize("user", ["bob", "carol"])
@pytest.mark.parametrize("endpoint", OBJECT_ENDPOINTS)
def test_anyone_else_gets_404_for_alices_daemons_and_tokens(request, api_as, world, endpoint, user):
    response = call(api_as(request.getfixturevalue(user)), endpoint, world)
    assert response.status_code == 404
    assert alices_tokens_untouched(world)


@pytest.mark.parametrize("user", ["bob", "carol"])
@pytest.mark.parametrize("endpoint", LISTS)
def test_alices_daemons_and_tokens_are_absent_from_anyone_elses_lists(request, api_as, world, endpoint, user):
    response = call(api_as(request.getfixturevalue(user)), endpoint, world)
    assert response.status_code == 200
    assert response.json()["results"] == []


def test_the_owners_lists_hold_her_daemons_and_tokens(api_as, alice, world):
    client = api_as(alice)
    assert [row["id"] for row in call(client, "daemons-list", world).json()["results"]] == [str(world["daemon"])]
    tokens = {row["id"] for row in call(client, "tokens-list", world).json()["results"]}
    assert tokens == {str(world["token"]), str(world["daemon_token"])}


def test_a_token_created_by_someone_else_is_their_own(api_as, bob, world):
    response = call(api_as(bob), "token-create", world)
    assert response.status_code == 201
    assert ApiToken.objects.get(pk=response.json()["id"]).owner == bob
