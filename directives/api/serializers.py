"""Serializers of the directives API.

Output serializers render rows; input serializers only check the shape and
types of a request body (they refuse unknown and read-only fields) and hand
the values to a service, which owns every rule about what may change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from directives import branches
from directives.models import (
    AgentKind,
    ApprovalRequest,
    Chain,
    Directive,
    DirectiveEvent,
    Evaluation,
    Order,
    Step,
)
from directives.selectors import directives_visible_to

# --------------------------------------------------------------------------- shared


class StrictInputMixin:
    """Refuses body fields the serializer does not accept, so that a typo or an
    attempt to set a read-only field is a 400 instead of being silently dropped."""

    #: Fields of the object's representation that this body cannot set.
    read_only_names: tuple[str, ...] = ()

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            fields = self.fields  # type: ignore[attr-defined]
            writable = {name for name, f in fields.items() if not f.read_only}
            unknown = sorted(str(key) for key in data if key not in writable)
            if unknown:
                known = set(fields) | set(self.read_only_names)
                raise serializers.ValidationError(
                    {key: ["This field is read-only." if key in known else "Unknown field."] for key in unknown}
                )
        return super().to_internal_value(data)  # type: ignore[misc]


class BranchNameField(serializers.CharField):
    """A git branch name: ``../../etc`` or ``--upload-pack=…`` are refused here,
    with a clear error, rather than by the daemon's git when the task starts."""

    # Doubled braces: DRF formats these messages.
    default_error_messages = {"branch": branches.RULE.replace("{", "{{").replace("}", "}}")}

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data)
        if not branches.is_branch_name(value):
            self.fail("branch")
        return value


def _request_user(field: serializers.Field) -> Any:
    request = field.context.get("request")
    return getattr(request, "user", None)


@extend_schema_field(
    {
        "oneOf": [
            {"type": "array", "items": {"type": "string"}},
            {"type": "string", "enum": ["auto"]},
        ],
        "nullable": True,
        "description": 'Verifier commands, "auto" (detect them), or null (none).',
    }
)
class VerifiersField(serializers.JSONField):
    """A list of verifier commands, ``"auto"``, or ``null``."""

    default_error_messages = {"verifiers": 'Must be a list of commands, "auto", or null.'}

    def to_internal_value(self, data: Any) -> Any:
        value = super().to_internal_value(data)
        if value is None or value == "auto":
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            self.fail("verifiers")
        return value


# --------------------------------------------------------------------------- directives


class StepCountsSerializer(serializers.Serializer):
    """Number of the directive's steps (outside superseded chains) by status."""

    total = serializers.IntegerField()
    pending = serializers.IntegerField()
    ready = serializers.IntegerField()
    running = serializers.IntegerField()
    evaluating = serializers.IntegerField()
    awaiting_approval = serializers.IntegerField()
    passed = serializers.IntegerField()
    failed = serializers.IntegerField()
    skipped = serializers.IntegerField()
    blocked = serializers.IntegerField()


class DirectiveSerializer(serializers.ModelSerializer):
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True)
    team_name = serializers.CharField(source="team.name", read_only=True, allow_null=True, default=None)
    step_counts = serializers.SerializerMethodField()
    # Empty until a pull request is recorded: a plain string, since "" is not a "uri".
    pr_url = serializers.CharField(read_only=True, help_text="The pull request's URL; empty until one is recorded.")

    class Meta:
        model = Directive
        fields = [
            "id",
            "owner",
            "team",
            "team_name",
            "title",
            "goal",
            "requirements",
            "acceptance_criteria",
            "constraints",
            "repository_url",
            "base_branch",
            "local_path",
            "status",
            "autonomy_level",
            "confidence_threshold_green",
            "confidence_threshold_yellow",
            "max_rework_cycles",
            "evaluation_mode",
            "verifiers",
            "agent",
            "fail_closed",
            "require_plan_approval",
            "max_total_cost_usd",
            "max_wall_time_minutes",
            "max_chain_regenerations",
            "total_cost_usd",
            "started_at",
            "chain_generation_count",
            "current_chain",
            "orchestrator_task",
            "completion_task",
            "pr_branch",
            "pr_url",
            "goal_updated_at",
            "created_at",
            "updated_at",
            "step_counts",
        ]
        read_only_fields = fields

    @extend_schema_field(StepCountsSerializer)
    def get_step_counts(self, directive: Directive) -> dict[str, int]:
        # Filled by the viewset's annotation (one query for a whole page).
        counts = {status: getattr(directive, f"step_count_{status}", 0) or 0 for status in Step.Status.values}
        return {"total": sum(counts.values()), **counts}


class TeamField(serializers.PrimaryKeyRelatedField):
    """A team (group id) the requesting user belongs to."""

    default_error_messages = {
        "does_not_exist": "You are not a member of a team with id {pk_value}.",
        "incorrect_type": "Expected a team id (a number), got {data_type}.",
    }

    def get_queryset(self) -> Any:
        user = _request_user(self)
        if user is None or not user.is_authenticated:
            return Group.objects.none()
        return user.groups.all()


class DirectiveCreateSerializer(StrictInputMixin, serializers.Serializer):
    """The body of ``POST /directives/``."""

    read_only_names = tuple(DirectiveSerializer.Meta.fields)

    title = serializers.CharField(max_length=200)
    goal = serializers.CharField()
    team = TeamField(queryset=Group.objects.none(), required=False, allow_null=True)
    requirements = serializers.ListField(
        child=serializers.JSONField(),
        required=False,
        help_text='Strings or objects {"id", "description"}.',
    )
    acceptance_criteria = serializers.ListField(
        child=serializers.JSONField(),
        required=False,
        help_text='Strings or objects {"id", "criterion"}.',
    )
    constraints = serializers.ListField(child=serializers.CharField(), required=False)
    repository_url = serializers.CharField(max_length=500, required=False, allow_blank=True)
    base_branch = BranchNameField(max_length=200, required=False)
    local_path = serializers.CharField(max_length=500, required=False, allow_blank=True)
    autonomy_level = serializers.ChoiceField(choices=Directive.Autonomy.choices, required=False)
    confidence_threshold_green = serializers.FloatField(min_value=0.0, max_value=1.0, required=False)
    confidence_threshold_yellow = serializers.FloatField(min_value=0.0, max_value=1.0, required=False)
    max_rework_cycles = serializers.IntegerField(min_value=0, required=False)
    evaluation_mode = serializers.ChoiceField(choices=Directive.EvaluationMode.choices, required=False)
    verifiers = VerifiersField(required=False, allow_null=True)
    agent = serializers.ChoiceField(choices=AgentKind.choices, required=False)
    fail_closed = serializers.BooleanField(required=False)
    require_plan_approval = serializers.BooleanField(required=False)
    max_total_cost_usd = serializers.DecimalField(
        max_digits=12, decimal_places=4, min_value=0, required=False, allow_null=True
    )
    max_wall_time_minutes = serializers.IntegerField(min_value=0, required=False, allow_null=True)
    max_chain_regenerations = serializers.IntegerField(min_value=0, required=False, allow_null=True)


class DirectiveUpdateSerializer(DirectiveCreateSerializer):
    """The body of ``PATCH /directives/{id}/``: any directive field, plus
    ``pr_url``/``pr_branch`` (records the pull request) and ``status``, which
    only accepts ``completed`` (from ``completing``)."""

    status = serializers.ChoiceField(
        choices=[(Directive.Status.COMPLETED.value, "completed")],
        required=False,
        error_messages={
            "invalid_choice": (
                '"{input}" cannot be set here: PATCH only accepts "completed" (from "completing"); '
                "use the start, pause, resume, stop, replan, regenerate and archive actions."
            )
        },
    )
    pr_url = serializers.URLField(max_length=500, required=False)
    pr_branch = BranchNameField(max_length=300, required=False)


class ChainSerializer(serializers.ModelSerializer):
    class Meta:
        model = Chain
        fields = [
            "id",
            "directive",
            "generation",
            "name",
            "description",
            "rationale",
            "status",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


# --------------------------------------------------------------------------- steps


class StepSerializer(serializers.ModelSerializer):
    depends_on = serializers.SerializerMethodField(
        help_text="Ids of the steps this one depends on, in the order given."
    )
    # Both may be empty ("" = the directive's agent / not evaluated yet); read-only
    # model fields lose allow_blank, which the schema needs to allow "".
    agent = serializers.ChoiceField(
        choices=AgentKind.choices, allow_blank=True, read_only=True, help_text="Empty: the directive's agent."
    )
    confidence_level = serializers.ChoiceField(
        choices=Step.Confidence.choices, allow_blank=True, read_only=True, help_text="Empty until evaluated."
    )

    class Meta:
        model = Step
        fields = [
            "id",
            "directive",
            "chain",
            "generation",
            "name",
            "description",
            "step_type",
            "task_plan",
            "depends_on",
            "order_index",
            "agent",
            "status",
            "execution_task",
            "execution_contract",
            "monitoring_task",
            "monitoring_contract",
            "rework_count",
            "rework_instructions",
            "confidence_score",
            "confidence_level",
            "last_evaluation",
            "verifiers",
            "editor_x",
            "editor_y",
            "started_at",
            "finished_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.ListField(child=serializers.UUIDField()))
    def get_depends_on(self, step: Step) -> list[str]:
        # ``dependency_links`` is prefetched ordered by position (see StepViewSet.get_queryset).
        links = sorted(step.dependency_links.all(), key=lambda link: link.position)
        return [str(link.depends_on_id) for link in links]


class StepInputSerializer(StrictInputMixin, serializers.Serializer):
    """One step, as given to add-step, batch and update."""

    read_only_names = tuple(StepSerializer.Meta.fields)

    name = serializers.CharField(max_length=200)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    task_plan = serializers.CharField(required=False, allow_blank=True, default="")
    step_type = serializers.ChoiceField(choices=Step.StepType.choices, required=False, default=Step.StepType.TASK)
    depends_on = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        default=list,
        help_text="Ids of steps of this directive, or names of steps in the same batch or the current plan.",
    )
    order_index = serializers.IntegerField(min_value=0, required=False, default=0)
    agent = serializers.ChoiceField(
        choices=AgentKind.choices, required=False, allow_blank=True, default="", help_text="Overrides the directive's."
    )
    verifiers = VerifiersField(required=False, allow_null=True, default=None)
    editor_x = serializers.FloatField(required=False, allow_null=True, default=None)
    editor_y = serializers.FloatField(required=False, allow_null=True, default=None)


class StepCreateSerializer(StepInputSerializer):
    generation = serializers.IntegerField(
        min_value=1,
        required=False,
        write_only=True,
        help_text="Accepted for the CLI's --generation and ignored: steps join the generation being planned or run.",
    )


class StepBatchSerializer(serializers.Serializer):
    """The body of ``POST /directives/{id}/steps/batch/``."""

    steps = serializers.ListField(
        child=StepCreateSerializer(),
        allow_empty=False,
        max_length=settings.MAKIMA_MAX_STEPS_PER_BATCH,
        error_messages={"empty": "At least one step is required."},
    )

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = sorted(str(key) for key in data if key != "steps")
            if unknown:
                raise serializers.ValidationError({key: ["Unknown field."] for key in unknown})
        try:
            return super().to_internal_value(data)
        except serializers.ValidationError as exc:
            raw = data.get("steps") if isinstance(data, Mapping) else None
            if isinstance(exc.detail, dict) and "steps" in exc.detail:
                exc.detail["steps"] = name_step_errors(exc.detail["steps"], raw)
            raise


def name_step_errors(errors: Any, raw: Any) -> list[str]:
    """Flatten per-item errors of a batch into messages that name each step,
    in the same form as the service's ("step 'B': …")."""
    if not isinstance(errors, Mapping):
        return [str(e) for e in (errors if isinstance(errors, list) else [errors])]
    messages: list[str] = []
    for index in sorted(errors, key=lambda i: int(i) if str(i).isdigit() else -1):
        where = f"steps[{int(index) + 1}]" if str(index).isdigit() else str(index)
        item = raw[int(index)] if str(index).isdigit() and isinstance(raw, list) else None
        if isinstance(item, Mapping) and isinstance(item.get("name"), str) and item["name"].strip():
            where = f"step '{item['name'].strip()}' ({where})"
        for message in _flatten(errors[index]):
            messages.append(f"{where}: {message}")
    return messages


def _flatten(errors: Any, prefix: str = "") -> list[str]:
    if isinstance(errors, Mapping):
        out: list[str] = []
        for key, value in errors.items():
            label = "" if key == "non_field_errors" else f"{prefix}{key}"
            out.extend(_flatten(value, f"{label}." if label else ""))
        return out
    if isinstance(errors, list):
        return [m for value in errors for m in _flatten(value, prefix)]
    return [f"{prefix.rstrip('.')}: {errors}" if prefix else str(errors)]


class StepBatchResultSerializer(serializers.Serializer):
    steps = StepSerializer(many=True)


# --------------------------------------------------------------------------- evaluations, approvals, events


class EvaluationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Evaluation
        fields = [
            "id",
            "directive",
            "chain",
            "step",
            "contract",
            "kind",
            "passed",
            "overall_score",
            "confidence_level",
            "criteria_results",
            "verifier_results",
            "summary_feedback",
            "rework_instructions",
            "created_at",
        ]
        read_only_fields = fields


class ApprovalSerializer(serializers.ModelSerializer):
    # null until someone answers.
    responded_by = serializers.SlugRelatedField(slug_field="username", read_only=True, allow_null=True)

    class Meta:
        model = ApprovalRequest
        fields = [
            "id",
            "directive",
            "step",
            "evaluation",
            "kind",
            "description",
            "context",
            "status",
            "response_note",
            "responded_by",
            "responded_at",
            "expires_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class ApprovalAnswerSerializer(StrictInputMixin, serializers.Serializer):
    """The optional body of ``approve`` and ``deny``."""

    note = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        help_text="Kept on the approval; on a denied step review it becomes the rework instructions.",
    )


class DirectiveEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = DirectiveEvent
        fields = [
            "id",
            "directive",
            "chain",
            "step",
            "subject_type",
            "subject_id",
            "event_type",
            "severity",
            "message",
            "data",
            "actor_type",
            "actor",
            "created_at",
        ]
        read_only_fields = fields


class EventQuerySerializer(serializers.Serializer):
    """Query parameters of the event feed."""

    after = serializers.IntegerField(
        min_value=0, required=False, help_text="Only events with a larger id (the last id you have seen)."
    )
    severity = serializers.ChoiceField(choices=DirectiveEvent.Severity.choices, required=False)
    limit = serializers.IntegerField(
        min_value=1, max_value=1000, required=False, default=200, help_text="At most this many events (1–1000)."
    )


# --------------------------------------------------------------------------- orders


class OrderSerializer(serializers.ModelSerializer):
    owner = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Order
        fields = [
            "id",
            "owner",
            "title",
            "description",
            "priority",
            "order_type",
            "status",
            "directive",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class OrderWriteSerializer(StrictInputMixin, serializers.Serializer):
    """The body of order create and update; status and directive change through actions."""

    read_only_names = tuple(OrderSerializer.Meta.fields)

    title = serializers.CharField(max_length=200)
    description = serializers.CharField(required=False, allow_blank=True)
    priority = serializers.ChoiceField(choices=Order.Priority.choices, required=False)
    order_type = serializers.ChoiceField(choices=Order.OrderType.choices, required=False)


class VisibleDirectiveField(serializers.PrimaryKeyRelatedField):
    """A directive the requesting user may see; any other id is "unknown"."""

    default_error_messages = {
        "does_not_exist": "Unknown directive {pk_value}.",
        "incorrect_type": "Expected a directive id, got {data_type}.",
    }

    def get_queryset(self) -> Any:
        user = _request_user(self)
        if user is None:
            return Directive.objects.none()
        return directives_visible_to(user)


class OrderLinkSerializer(StrictInputMixin, serializers.Serializer):
    directive = VisibleDirectiveField(queryset=Directive.objects.none(), pk_field=serializers.UUIDField())


# --------------------------------------------------------------------------- errors and small bodies


class DirectivesErrorSerializer(serializers.Serializer):
    """An error answer: ``detail`` always, ``errors`` (field errors) on 400."""

    detail = serializers.CharField()
    errors = serializers.DictField(required=False, help_text="Field errors; only on 400.")


class DirectiveReasonSerializer(StrictInputMixin, serializers.Serializer):
    """The optional body of ``pause`` and ``stop``."""

    reason = serializers.CharField(required=False, allow_blank=True, default="", help_text="Kept in the event log.")
