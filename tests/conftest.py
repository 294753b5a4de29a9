from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from tests.factories import make_team, make_user


@pytest.fixture
def alice(db):
    return make_user("alice")


@pytest.fixture
def bob(db):
    return make_user("bob")


@pytest.fixture
def carol(db, alice):
    """carol shares the "platform" team with alice."""
    user = make_user("carol")
    make_team("platform", alice, user)
    return user


@pytest.fixture
def platform(carol):
    from django.contrib.auth.models import Group

    return Group.objects.get(name="platform")


@pytest.fixture
def root(db):
    return make_user("root", is_staff=True, is_superuser=True)


@pytest.fixture
def api():
    return APIClient()


@pytest.fixture
def api_as():
    """``api_as(user)``: an API client logged in (session) as ``user``."""

    def login(user):
        client = APIClient()
        client.force_authenticate(user)
        return client

    return login


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """PBKDF2 costs ~0.2 s per user; tests create many users."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
