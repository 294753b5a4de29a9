"""Serializers of the daemons API: daemons and the requesting user's API tokens.

Token digests are never serialized; the plain token appears only in the
answer to the request that created it.
"""

from __future__ import annotations

from typing import Any

from django.utils import timezone
from rest_framework import serializers

from daemons.models import ApiToken, Daemon

# The kinds a user may create and list here; task tokens are minted by the server per task.
USER_TOKEN_KINDS = [(ApiToken.Kind.USER.value, "User API key"), (ApiToken.Kind.DAEMON.value, "Daemon token")]


class DaemonSerializer(serializers.ModelSerializer):
    capabilities = serializers.ListField(
        child=serializers.CharField(), read_only=True, help_text="Agents this daemon can run."
    )
    running_task_count = serializers.IntegerField(
        read_only=True, help_text="Tasks starting, running or paused on this daemon."
    )

    class Meta:
        model = Daemon
        fields = [
            "id",
            "name",
            "hostname",
            "version",
            "status",
            "capabilities",
            "max_concurrent_tasks",
            "running_task_count",
            "connected_at",
            "last_seen_at",
            "created_at",
        ]
        read_only_fields = fields


class TokenSerializer(serializers.ModelSerializer):
    """A token as listed: recognisable by its prefix, never its value."""

    # A plain string, not the model's choices: only user and daemon tokens are shown
    # here, and the create request documents that choice set as an enum.
    kind = serializers.CharField(read_only=True, help_text="`user` (API key) or `daemon`.")

    class Meta:
        model = ApiToken
        fields = ["id", "name", "kind", "prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
        read_only_fields = fields


class TokenCreatedSerializer(TokenSerializer):
    """The answer to creating a token: the only time its plain value is shown."""

    token = serializers.CharField(read_only=True, help_text="The token itself. Store it now: it is not shown again.")

    class Meta(TokenSerializer.Meta):
        fields = [*TokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class TokenCreateSerializer(serializers.Serializer):
    """``POST /tokens/``."""

    name = serializers.CharField(max_length=200, help_text="What the token is for, to recognise it later.")
    kind = serializers.ChoiceField(
        choices=USER_TOKEN_KINDS,
        default=ApiToken.Kind.USER.value,
        help_text="`user` for an API key, `daemon` for a token that runs `makima daemon`.",
    )
    expires_at = serializers.DateTimeField(
        required=False, allow_null=True, default=None, help_text="Optional; the token stops working then."
    )

    def validate_expires_at(self, value: Any) -> Any:
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("must be in the future")
        return value
