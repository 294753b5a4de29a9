"""Contracts (the workspace of one unit of agent work), their files, and the
tasks that run on daemons together with their output."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from directives.models import AgentKind
from makima.state import Transitions

OWNER = settings.AUTH_USER_MODEL


class Contract(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        COMPLETED = "completed"
        FAILED = "failed"
        ARCHIVED = "archived"

    TRANSITIONS = Transitions(
        {
            Status.ACTIVE: {Status.COMPLETED, Status.FAILED, Status.ARCHIVED},
            # completed/failed → active: the same workspace is reopened for rework.
            Status.COMPLETED: {Status.ACTIVE, Status.ARCHIVED},
            Status.FAILED: {Status.ACTIVE, Status.ARCHIVED},
            Status.ARCHIVED: set(),
        }
    )
    TERMINAL = frozenset({Status.ARCHIVED})

    class ContractType(models.TextChoices):
        PLANNING = "planning"
        EXECUTION = "execution"
        MONITORING = "monitoring"
        COMPLETION = "completion"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(OWNER, on_delete=models.CASCADE, related_name="contracts")
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    contract_type = models.CharField(max_length=16, choices=ContractType.choices)
    phase = models.CharField(max_length=32, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE, db_index=True)
    directive = models.ForeignKey(
        "directives.Directive", null=True, blank=True, on_delete=models.CASCADE, related_name="contracts"
    )
    step = models.ForeignKey(
        "directives.Step", null=True, blank=True, on_delete=models.SET_NULL, related_name="contracts"
    )
    is_directive_orchestrator = models.BooleanField(default=False)
    supervisor_task = models.ForeignKey(
        "contracts.Task", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    completed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name


class ContractRepository(models.Model):
    contract = models.ForeignKey(Contract, on_delete=models.CASCADE, related_name="repositories")
    name = models.CharField(max_length=200)
    url = models.CharField(max_length=500, blank=True, help_text="Remote URL")
    local_path = models.CharField(max_length=500, blank=True)
    is_primary = models.BooleanField(default=False)

    class Meta:
        verbose_name_plural = "contract repositories"
        constraints = [
            models.UniqueConstraint(
                fields=["contract"], condition=Q(is_primary=True), name="contract_one_primary_repo"
            ),
        ]

    def __str__(self) -> str:
        return self.name


class ContractFile(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    contract = models.ForeignKey(Contract, on_delete=models.CASCADE, related_name="files")
    name = models.CharField(max_length=200)
    content = models.TextField(blank=True)
    body = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [models.Index(fields=["contract", "name"], name="contract_file_name_idx")]

    def __str__(self) -> str:
        return self.name


class Task(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        STARTING = "starting"
        RUNNING = "running"
        PAUSED = "paused"
        DONE = "done"
        FAILED = "failed"
        INTERRUPTED = "interrupted"
        CANCELLED = "cancelled"

    TRANSITIONS = Transitions(
        {
            Status.PENDING: {Status.STARTING, Status.CANCELLED},
            # starting → pending: the daemon refused it (ack ok:false); another daemon may take it.
            # starting → done/failed: a short task can finish before task_started arrives.
            Status.STARTING: {
                Status.RUNNING,
                Status.PENDING,
                Status.DONE,
                Status.FAILED,
                Status.INTERRUPTED,
                Status.CANCELLED,
            },
            Status.RUNNING: {Status.PAUSED, Status.DONE, Status.FAILED, Status.INTERRUPTED, Status.CANCELLED},
            Status.PAUSED: {Status.RUNNING, Status.DONE, Status.FAILED, Status.INTERRUPTED, Status.CANCELLED},
            # interrupted → pending: retried under MAKIMA_MAX_TASK_ATTEMPTS.
            Status.INTERRUPTED: {Status.PENDING, Status.CANCELLED},
            Status.DONE: set(),
            Status.FAILED: set(),
            Status.CANCELLED: set(),
        }
    )
    TERMINAL = frozenset({Status.DONE, Status.FAILED, Status.CANCELLED})
    ON_DAEMON = frozenset({Status.STARTING, Status.RUNNING, Status.PAUSED})
    FINISHED = frozenset({Status.DONE, Status.FAILED, Status.INTERRUPTED, Status.CANCELLED})

    class Kind(models.TextChoices):
        PLANNING = "planning"
        EXECUTION = "execution"
        MONITORING = "monitoring"
        COMPLETION = "completion"
        VERIFICATION = "verification"

    class CompletionAction(models.TextChoices):
        NONE = "none"
        BRANCH = "branch"
        PR = "pr"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(OWNER, on_delete=models.CASCADE, related_name="tasks")
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    agent = models.CharField(max_length=16, choices=AgentKind.choices, default=AgentKind.CLAUDE)
    plan = models.TextField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    daemon = models.ForeignKey("daemons.Daemon", null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks")
    version = models.PositiveIntegerField(default=0, help_text="Optimistic lock, bumped on every dispatch.")
    attempt = models.PositiveIntegerField(default=1)
    priority = models.IntegerField(default=0)
    contract = models.ForeignKey(Contract, null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks")
    directive = models.ForeignKey(
        "directives.Directive", null=True, blank=True, on_delete=models.CASCADE, related_name="tasks"
    )
    step = models.ForeignKey("directives.Step", null=True, blank=True, on_delete=models.SET_NULL, related_name="tasks")
    is_supervisor = models.BooleanField(default=False)
    repository_url = models.CharField(max_length=500, blank=True)
    local_path = models.CharField(max_length=500, blank=True)
    base_branch = models.CharField(max_length=200, default="main")
    branch = models.CharField(max_length=300, blank=True)
    continue_from_task = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="continued_by"
    )
    merge_branches = models.JSONField(default=list, blank=True)
    completion_action = models.CharField(
        max_length=8, choices=CompletionAction.choices, default=CompletionAction.BRANCH
    )
    verifiers = models.JSONField(default=list, blank=True)
    timeout_s = models.PositiveIntegerField(default=3600)
    exit_code = models.IntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    summary = models.TextField(blank=True)
    question = models.TextField(blank=True, help_text="What a paused agent is waiting for.")
    base_commit = models.CharField(max_length=64, blank=True)
    commit_sha = models.CharField(max_length=64, blank=True)
    cost_usd = models.DecimalField(max_digits=12, decimal_places=4, default=0)
    verifier_results = models.JSONField(default=list, blank=True)
    supervisor_completed_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(
                fields=["owner", "-priority", "created_at"],
                name="task_pending_idx",
                condition=Q(status="pending"),
            ),
            models.Index(
                fields=["daemon", "status"],
                name="task_on_daemon_idx",
                condition=Q(status__in=["starting", "running", "paused"]),
            ),
        ]

    def __str__(self) -> str:
        return self.name


class TaskOutput(models.Model):
    class Stream(models.TextChoices):
        STDOUT = "stdout"
        STDERR = "stderr"
        AGENT = "agent"
        SYSTEM = "system"

    id = models.BigAutoField(primary_key=True)
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="output")
    # A retried task runs again (Task.attempt + 1) and its daemon numbers lines
    # from 1 again: seq is unique per attempt, not per task.
    attempt = models.PositiveIntegerField(default=1)
    seq = models.PositiveIntegerField()
    stream = models.CharField(max_length=8, choices=Stream.choices, default=Stream.STDOUT)
    content = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["task", "attempt", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["task", "attempt", "seq"], name="task_output_unique_attempt_seq")
        ]

    def __str__(self) -> str:
        return f"{self.task_id}#{self.attempt}.{self.seq}"
