"""Directives and everything that hangs off them: chains, steps, evaluations,
approvals, the event log, goal history and orders."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

from makima.state import Transitions

OWNER = settings.AUTH_USER_MODEL
UNIT_INTERVAL = [MinValueValidator(0.0), MaxValueValidator(1.0)]


class AgentKind(models.TextChoices):
    CLAUDE = "claude", "Claude Code"
    COMMAND = "command", "Command"
    SCRIPTED = "scripted", "Scripted"


class Directive(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft"
        PLANNING = "planning"
        ACTIVE = "active"
        PAUSED = "paused"
        COMPLETING = "completing"
        COMPLETED = "completed"
        FAILED = "failed"
        ARCHIVED = "archived"

    TRANSITIONS = Transitions(
        {
            Status.DRAFT: {Status.PLANNING, Status.ACTIVE, Status.FAILED},
            Status.PLANNING: {Status.ACTIVE, Status.PAUSED, Status.FAILED},
            Status.ACTIVE: {Status.PAUSED, Status.PLANNING, Status.COMPLETING, Status.FAILED},
            Status.PAUSED: {Status.ACTIVE, Status.PLANNING, Status.FAILED},
            Status.COMPLETING: {Status.COMPLETED, Status.ACTIVE, Status.PAUSED, Status.FAILED},
            Status.COMPLETED: {Status.PLANNING, Status.ARCHIVED},
            Status.FAILED: {Status.ARCHIVED},
            Status.ARCHIVED: set(),
        }
    )
    TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.ARCHIVED})
    ACTIVE = frozenset({Status.PLANNING, Status.ACTIVE, Status.COMPLETING})

    class PlanningReason(models.TextChoices):
        INITIAL = "initial"
        REPLAN = "replan"
        REGENERATE = "regenerate"
        ORDER_PICKUP = "order_pickup"
        PLAN_DENIED = "plan_denied"

    class Autonomy(models.TextChoices):
        FULL_AUTO = "full_auto", "Full auto"
        GUIDED = "guided", "Guided"
        MANUAL = "manual", "Manual"

    class EvaluationMode(models.TextChoices):
        AGENT = "agent"
        VERIFIERS = "verifiers"
        BOTH = "both"
        OFF = "off"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(OWNER, on_delete=models.CASCADE, related_name="directives")
    team = models.ForeignKey(Group, null=True, blank=True, on_delete=models.SET_NULL, related_name="directives")
    title = models.CharField(max_length=200)
    goal = models.TextField()
    requirements = models.JSONField(default=list, blank=True)
    acceptance_criteria = models.JSONField(default=list, blank=True)
    constraints = models.JSONField(default=list, blank=True)
    repository_url = models.CharField(max_length=500, blank=True)
    base_branch = models.CharField(max_length=200, default="main")
    local_path = models.CharField(max_length=500, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DRAFT, db_index=True)
    autonomy_level = models.CharField(max_length=16, choices=Autonomy.choices, default=Autonomy.GUIDED)
    confidence_threshold_green = models.FloatField(default=0.8, validators=UNIT_INTERVAL)
    confidence_threshold_yellow = models.FloatField(default=0.5, validators=UNIT_INTERVAL)
    max_rework_cycles = models.PositiveIntegerField(default=3)
    evaluation_mode = models.CharField(max_length=16, choices=EvaluationMode.choices, default=EvaluationMode.BOTH)
    verifiers = models.JSONField(default=list, blank=True, help_text='A list of commands, "auto", or empty.')
    agent = models.CharField(max_length=16, choices=AgentKind.choices, default=AgentKind.CLAUDE)
    fail_closed = models.BooleanField(default=False)
    require_plan_approval = models.BooleanField(default=False)
    max_total_cost_usd = models.DecimalField(max_digits=12, decimal_places=4, null=True, blank=True)
    max_wall_time_minutes = models.PositiveIntegerField(null=True, blank=True)
    max_chain_regenerations = models.PositiveIntegerField(null=True, blank=True)
    total_cost_usd = models.DecimalField(max_digits=12, decimal_places=4, default=0)
    started_at = models.DateTimeField(null=True, blank=True)
    chain_generation_count = models.PositiveIntegerField(
        default=0, help_text="How many times the chain was regenerated."
    )
    planning_reason = models.CharField(
        max_length=16,
        choices=PlanningReason.choices,
        blank=True,
        help_text="Why the directive is (or was last) planning; picks the planner's prompt.",
    )
    planning_note = models.TextField(blank=True, help_text="A reviewer's note for the next plan.")
    current_chain = models.ForeignKey(
        "directives.Chain", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    orchestrator_task = models.ForeignKey(
        "contracts.Task", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    completion_task = models.ForeignKey(
        "contracts.Task", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    pr_branch = models.CharField(max_length=300, blank=True)
    pr_url = models.URLField(max_length=500, blank=True)
    goal_updated_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(
                fields=["status", "updated_at"],
                name="directive_active_idx",
                condition=Q(status__in=["planning", "active", "completing"]),
            ),
            models.Index(fields=["owner", "-created_at"], name="directive_owner_idx"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(confidence_threshold_yellow__lte=models.F("confidence_threshold_green")),
                name="directive_yellow_lte_green",
            ),
        ]

    def __str__(self) -> str:
        return self.title


class GoalHistory(models.Model):
    directive = models.ForeignKey(Directive, on_delete=models.CASCADE, related_name="goal_history")
    previous_goal = models.TextField()
    replaced_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-replaced_at"]
        verbose_name_plural = "goal history"

    def __str__(self) -> str:
        return f"{self.directive} goal replaced {self.replaced_at:%Y-%m-%d %H:%M}"


class Chain(models.Model):
    class Status(models.TextChoices):
        ACTIVE = "active"
        COMPLETED = "completed"
        FAILED = "failed"
        SUPERSEDED = "superseded"

    TRANSITIONS = Transitions(
        {
            Status.ACTIVE: {Status.COMPLETED, Status.FAILED, Status.SUPERSEDED},
            Status.COMPLETED: {Status.SUPERSEDED, Status.ACTIVE},
            Status.FAILED: {Status.SUPERSEDED, Status.ACTIVE},
            Status.SUPERSEDED: set(),
        }
    )
    TERMINAL = frozenset({Status.SUPERSEDED})

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(OWNER, on_delete=models.CASCADE, related_name="chains")
    directive = models.ForeignKey(Directive, on_delete=models.CASCADE, related_name="chains")
    generation = models.PositiveIntegerField()
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    rationale = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["directive", "generation"]
        constraints = [
            models.UniqueConstraint(fields=["directive", "generation"], name="chain_unique_generation"),
        ]

    def __str__(self) -> str:
        return f"{self.name} (gen {self.generation})"


class Step(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        READY = "ready"
        RUNNING = "running"
        EVALUATING = "evaluating"
        AWAITING_APPROVAL = "awaiting_approval"
        PASSED = "passed"
        FAILED = "failed"
        SKIPPED = "skipped"
        BLOCKED = "blocked"

    TRANSITIONS = Transitions(
        {
            Status.PENDING: {Status.READY, Status.SKIPPED, Status.BLOCKED},
            Status.READY: {Status.RUNNING, Status.PENDING, Status.SKIPPED, Status.BLOCKED},
            # running → ready: its task was interrupted or refused and waits for another daemon.
            Status.RUNNING: {Status.EVALUATING, Status.FAILED, Status.READY, Status.PENDING},
            Status.EVALUATING: {Status.PASSED, Status.AWAITING_APPROVAL, Status.PENDING, Status.FAILED},
            Status.AWAITING_APPROVAL: {Status.PASSED, Status.PENDING, Status.FAILED},
            # passed/failed → evaluating: a user asked for a manual evaluation.
            Status.PASSED: {Status.EVALUATING},
            Status.FAILED: {Status.PENDING, Status.SKIPPED, Status.EVALUATING},
            Status.BLOCKED: {Status.PENDING, Status.SKIPPED},
            Status.SKIPPED: set(),
        }
    )
    DONE = frozenset({Status.PASSED, Status.SKIPPED})
    TERMINAL = frozenset({Status.PASSED, Status.SKIPPED})
    IN_FLIGHT = frozenset({Status.RUNNING, Status.EVALUATING, Status.AWAITING_APPROVAL})

    class StepType(models.TextChoices):
        RESEARCH = "research"
        DESIGN = "design"
        IMPLEMENT = "implement"
        TEST = "test"
        REVIEW = "review"
        DOCUMENT = "document"
        TASK = "task"

    class Confidence(models.TextChoices):
        GREEN = "green"
        YELLOW = "yellow"
        RED = "red"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(OWNER, on_delete=models.CASCADE, related_name="steps")
    directive = models.ForeignKey(Directive, on_delete=models.CASCADE, related_name="steps")
    chain = models.ForeignKey(Chain, null=True, blank=True, on_delete=models.CASCADE, related_name="steps")
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    step_type = models.CharField(max_length=16, choices=StepType.choices, default=StepType.TASK)
    task_plan = models.TextField(blank=True)
    depends_on = models.ManyToManyField(
        "self", through="StepDependency", symmetrical=False, related_name="dependents", blank=True
    )
    order_index = models.PositiveIntegerField(default=0)
    agent = models.CharField(max_length=16, choices=AgentKind.choices, blank=True)
    generation = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=24, choices=Status.choices, default=Status.PENDING, db_index=True)
    execution_task = models.ForeignKey(
        "contracts.Task", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    execution_contract = models.ForeignKey(
        "contracts.Contract", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    monitoring_task = models.ForeignKey(
        "contracts.Task", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    monitoring_contract = models.ForeignKey(
        "contracts.Contract", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    rework_count = models.PositiveIntegerField(default=0)
    rework_instructions = models.TextField(blank=True)
    confidence_score = models.FloatField(null=True, blank=True, validators=UNIT_INTERVAL)
    confidence_level = models.CharField(max_length=8, choices=Confidence.choices, blank=True)
    last_evaluation = models.ForeignKey(
        "directives.Evaluation", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    verifiers = models.JSONField(null=True, blank=True, help_text="Overrides the directive's verifiers when set.")
    editor_x = models.FloatField(null=True, blank=True)
    editor_y = models.FloatField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["order_index", "created_at"]
        indexes = [
            models.Index(
                fields=["directive", "status"],
                name="step_open_idx",
                condition=Q(status__in=["pending", "ready", "running", "evaluating"]),
            ),
        ]
        constraints = [
            models.UniqueConstraint(fields=["directive", "generation", "name"], name="step_unique_name_per_generation"),
        ]

    def __str__(self) -> str:
        return self.name


class StepDependency(models.Model):
    """One edge of the step DAG; ``position`` keeps the order the dependencies were given in."""

    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="dependency_links")
    depends_on = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="dependent_links")
    position = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["step", "position"]
        constraints = [
            models.UniqueConstraint(fields=["step", "depends_on"], name="step_dependency_unique"),
            models.CheckConstraint(condition=~Q(step=models.F("depends_on")), name="step_dependency_not_self"),
        ]

    def __str__(self) -> str:
        return f"{self.step_id} after {self.depends_on_id}"


class Evaluation(models.Model):
    class Kind(models.TextChoices):
        AGENT = "agent"
        VERIFIERS = "verifiers"
        COMPOSITE = "composite"
        MANUAL = "manual"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(OWNER, on_delete=models.CASCADE, related_name="evaluations")
    directive = models.ForeignKey(Directive, on_delete=models.CASCADE, related_name="evaluations")
    chain = models.ForeignKey(Chain, null=True, blank=True, on_delete=models.SET_NULL, related_name="evaluations")
    step = models.ForeignKey(Step, on_delete=models.CASCADE, related_name="evaluations")
    contract = models.ForeignKey(
        "contracts.Contract", null=True, blank=True, on_delete=models.SET_NULL, related_name="evaluations"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    passed = models.BooleanField()
    overall_score = models.FloatField(validators=UNIT_INTERVAL)
    confidence_level = models.CharField(max_length=8, choices=Step.Confidence.choices)
    criteria_results = models.JSONField(default=list, blank=True)
    verifier_results = models.JSONField(default=list, blank=True)
    summary_feedback = models.TextField(blank=True)
    rework_instructions = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.kind} evaluation of {self.step_id}: {self.overall_score:.2f} {self.confidence_level}"


class ApprovalRequest(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        DENIED = "denied"
        EXPIRED = "expired"

    TRANSITIONS = Transitions(
        {
            Status.PENDING: {Status.APPROVED, Status.DENIED, Status.EXPIRED},
            Status.APPROVED: set(),
            Status.DENIED: set(),
            Status.EXPIRED: set(),
        }
    )
    TERMINAL = frozenset({Status.APPROVED, Status.DENIED, Status.EXPIRED})

    class Kind(models.TextChoices):
        STEP_REVIEW = "step_review"
        PLAN_REVIEW = "plan_review"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(OWNER, on_delete=models.CASCADE, related_name="approval_requests")
    directive = models.ForeignKey(Directive, on_delete=models.CASCADE, related_name="approvals")
    step = models.ForeignKey(Step, null=True, blank=True, on_delete=models.CASCADE, related_name="approvals")
    evaluation = models.ForeignKey(
        Evaluation, null=True, blank=True, on_delete=models.SET_NULL, related_name="approvals"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    description = models.TextField(blank=True)
    context = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    response_note = models.TextField(blank=True)
    responded_by = models.ForeignKey(OWNER, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    responded_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["expires_at"], name="approval_pending_idx", condition=Q(status="pending")),
        ]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} for {self.directive}"


class DirectiveEvent(models.Model):
    """The audit log: one row per state change. Integer ids increase with time."""

    class Severity(models.TextChoices):
        INFO = "info"
        WARN = "warn"
        ERROR = "error"

    class Actor(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        DAEMON = "daemon"
        AGENT = "agent"

    id = models.BigAutoField(primary_key=True)
    directive = models.ForeignKey(Directive, null=True, blank=True, on_delete=models.CASCADE, related_name="events")
    chain = models.ForeignKey(Chain, null=True, blank=True, on_delete=models.SET_NULL, related_name="events")
    step = models.ForeignKey(Step, null=True, blank=True, on_delete=models.SET_NULL, related_name="events")
    subject_type = models.CharField(max_length=32, blank=True)
    subject_id = models.CharField(max_length=64, blank=True)
    event_type = models.CharField(max_length=64, db_index=True)
    severity = models.CharField(max_length=8, choices=Severity.choices, default=Severity.INFO)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    actor_type = models.CharField(max_length=8, choices=Actor.choices, default=Actor.SYSTEM)
    actor = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["directive", "id"], name="event_directive_idx"),
            models.Index(fields=["subject_type", "subject_id"], name="event_subject_idx"),
        ]

    def __str__(self) -> str:
        return f"#{self.id} {self.event_type}"


class Order(models.Model):
    class Status(models.TextChoices):
        OPEN = "open"
        LINKED = "linked"
        IN_PROGRESS = "in_progress"
        DONE = "done"
        CANCELLED = "cancelled"

    TRANSITIONS = Transitions(
        {
            Status.OPEN: {Status.LINKED, Status.CANCELLED},
            Status.LINKED: {Status.IN_PROGRESS, Status.OPEN, Status.CANCELLED},
            Status.IN_PROGRESS: {Status.DONE, Status.LINKED, Status.CANCELLED},
            Status.DONE: set(),
            Status.CANCELLED: {Status.OPEN},
        }
    )
    TERMINAL = frozenset({Status.DONE})

    class Priority(models.TextChoices):
        CRITICAL = "critical"
        HIGH = "high"
        MEDIUM = "medium"
        LOW = "low"

    PRIORITY_RANK = {Priority.CRITICAL: 0, Priority.HIGH: 1, Priority.MEDIUM: 2, Priority.LOW: 3}

    class OrderType(models.TextChoices):
        FEATURE = "feature"
        BUG = "bug"
        CHORE = "chore"
        SPIKE = "spike"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(OWNER, on_delete=models.CASCADE, related_name="orders")
    title = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    priority = models.CharField(max_length=16, choices=Priority.choices, default=Priority.MEDIUM)
    order_type = models.CharField(max_length=16, choices=OrderType.choices, default=OrderType.FEATURE)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN, db_index=True)
    directive = models.ForeignKey(Directive, null=True, blank=True, on_delete=models.SET_NULL, related_name="orders")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.title
