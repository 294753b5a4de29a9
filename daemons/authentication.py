"""``Authorization: Bearer <token>`` for the REST API (user API keys and task tokens)."""

from __future__ import annotations

from typing import Any

from rest_framework import authentication, exceptions

from daemons.models import ApiToken
from daemons.services import token_authenticate

API_TOKEN_KINDS = frozenset({ApiToken.Kind.USER, ApiToken.Kind.TASK})


def bearer_from_header(value: str | bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header value, or ``None``."""
    if not value:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """Sets ``request.user`` to the token's owner and ``request.auth`` to the ``ApiToken``.

    Daemon tokens are for the daemon websocket only and are refused here.
    """

    keyword = "Bearer"

    def authenticate(self, request: Any) -> tuple[Any, ApiToken] | None:
        header = authentication.get_authorization_header(request)
        if not header:
            return None
        plain = bearer_from_header(header)
        if plain is None:
            if header.lower().startswith(b"bearer"):
                raise exceptions.AuthenticationFailed("Malformed Authorization header: expected 'Bearer <token>'.")
            return None
        token = token_authenticate(plain)
        if token is None:
            raise exceptions.AuthenticationFailed("Invalid, expired or revoked token.")
        if token.kind not in API_TOKEN_KINDS:
            raise exceptions.AuthenticationFailed("Daemon tokens only open the daemon websocket; use an API key.")
        return token.owner, token

    def authenticate_header(self, request: Any) -> str:
        return 'Bearer realm="api"'
