"""Daemons (worker machines), the durable command outbox, and API tokens."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from makima.state import Transitions

OWNER = settings.AUTH_USER_MODEL


class Daemon(models.Model):
    class Status(models.TextChoices):
        CONNECTED = "connected"
        DISCONNECTED = "disconnected"
        DRAINING = "draining"

    TRANSITIONS = Transitions(
        {
            Status.CONNECTED: {Status.DISCONNECTED, Status.DRAINING},
            Status.DISCONNECTED: {Status.CONNECTED},
            Status.DRAINING: {Status.CONNECTED, Status.DISCONNECTED},
        }
    )

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(OWNER, on_delete=models.CASCADE, related_name="daemons")
    name = models.CharField(max_length=200)
    hostname = models.CharField(max_length=255, blank=True)
    version = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DISCONNECTED, db_index=True)
    max_concurrent_tasks = models.PositiveIntegerField(default=1)
    capabilities = models.JSONField(default=list, blank=True, help_text="Agents this daemon can run.")
    token = models.ForeignKey(
        "daemons.ApiToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="daemons"
    )
    connection_id = models.CharField(
        max_length=64, blank=True, help_text="Identifies the live websocket; a newer connection replaces it."
    )
    connected_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="daemon_unique_name_per_owner")]
        indexes = [
            models.Index(fields=["owner"], name="daemon_connected_idx", condition=Q(status="connected")),
        ]

    def __str__(self) -> str:
        return self.name


class DaemonCommand(models.Model):
    """The outbox: a command is stored here before it is sent to its daemon."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        SENT = "sent"
        ACKED = "acked"
        FAILED = "failed"

    TRANSITIONS = Transitions(
        {
            Status.QUEUED: {Status.SENT, Status.FAILED},
            # sent → queued: not acknowledged before the connection dropped; send again.
            Status.SENT: {Status.ACKED, Status.FAILED, Status.QUEUED},
            Status.ACKED: set(),
            Status.FAILED: set(),
        }
    )
    TERMINAL = frozenset({Status.ACKED, Status.FAILED})

    class CommandType(models.TextChoices):
        SPAWN_TASK = "spawn_task"
        INTERRUPT_TASK = "interrupt_task"
        SEND_MESSAGE = "send_message"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(OWNER, on_delete=models.CASCADE, related_name="daemon_commands")
    daemon = models.ForeignKey(Daemon, on_delete=models.CASCADE, related_name="commands")
    task = models.ForeignKey(
        "contracts.Task", null=True, blank=True, on_delete=models.SET_NULL, related_name="commands"
    )
    command_type = models.CharField(max_length=32, choices=CommandType.choices)
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.QUEUED, db_index=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    acked_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [
            models.Index(
                fields=["daemon", "created_at"],
                name="command_undelivered_idx",
                condition=Q(status__in=["queued", "sent"]),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.command_type} → {self.daemon}"


class ApiToken(models.Model):
    """A bearer token. Only a SHA-256 digest of the secret is stored; the plain
    value is returned once, by the service that creates it."""

    class Kind(models.TextChoices):
        USER = "user", "User API key"
        DAEMON = "daemon", "Daemon token"
        TASK = "task", "Task token"

    PREFIXES = {Kind.USER: "mk_u_", Kind.DAEMON: "mk_d_", Kind.TASK: "mk_t_"}

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(OWNER, on_delete=models.CASCADE, related_name="api_tokens")
    kind = models.CharField(max_length=8, choices=Kind.choices, db_index=True)
    name = models.CharField(max_length=200, blank=True)
    prefix = models.CharField(max_length=16, help_text="The first characters of the token, to recognise it.")
    digest = models.CharField(max_length=64, unique=True)
    task = models.ForeignKey("contracts.Task", null=True, blank=True, on_delete=models.CASCADE, related_name="tokens")
    directive = models.ForeignKey(
        "directives.Directive", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    contract = models.ForeignKey(
        "contracts.Contract", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=~Q(kind="task") | Q(task__isnull=False),
                name="task_token_has_task",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} {self.prefix}… ({self.name or self.owner})"
