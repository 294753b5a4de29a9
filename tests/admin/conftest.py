from __future__ import annotations

import pytest
from django.test import Client


@pytest.fixture(autouse=True)
def fast_password_hashing(settings) -> None:
    """The named users are created with a password; hashing it properly costs
    a third of a second per user per test, and nothing here tests hashing."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def staff(client: Client, root) -> Client:
    """A browser session logged in to the admin as root (a superuser)."""
    client.force_login(root)
    return client
