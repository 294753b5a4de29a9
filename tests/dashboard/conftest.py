from __future__ import annotations

import pytest
from django.test import Client


@pytest.fixture
def client_as():
    """``client_as(user)``: a browser-like test client signed in as ``user``."""

    def login(user):
        client = Client()
        client.force_login(user)
        return client

    return login
