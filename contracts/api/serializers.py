"""Serializers of the contracts API: contracts, their files, tasks and task output.

They only shape input and output; validation that protects the data (file
names, sizes, body elements) lives in ``contracts.services``.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from contracts.models import Contract, ContractFile, ContractRepository, Task, TaskOutput
from contracts.services import TASK_MESSAGE_MAX_CHARS

# A task's output is read in pages of at most this many lines.
OUTPUT_PAGE_DEFAULT = 200
OUTPUT_PAGE_MAX = 1000
INTEGER_MAX = 2**31 - 1  # TaskOutput.attempt is an integer column


class StrictCharField(serializers.CharField):
    """A ``CharField`` that refuses numbers and booleans instead of turning them into text."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


BODY_ELEMENT_SCHEMA: dict[str, Any] = {
    "type": "array",
    "description": "Optional structured body: a list of elements, each with a type and its text.",
    "items": {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": ["code", "markdown", "paragraph"]},
            "content": {"type": "string", "description": "The element's text (or use `text`)."},
            "text": {"type": "string", "description": "Same as `content`."},
            "language": {"type": "string", "description": "Language of a code element."},
        },
        "required": ["type"],
    },
}


@extend_schema_field(BODY_ELEMENT_SCHEMA)
class BodyField(serializers.JSONField):
    """A contract file's optional body; its elements are checked by the service."""


class ContractRepositorySerializer(serializers.ModelSerializer):
    class Meta:
        model = ContractRepository
        fields = ["name", "url", "local_path", "is_primary"]
        read_only_fields = fields


class ContractSerializer(serializers.ModelSerializer):
    repositories = ContractRepositorySerializer(many=True, read_only=True)

    class Meta:
        model = Contract
        fields = [
            "id",
            "name",
            "description",
            "contract_type",
            "phase",
            "status",
            "directive",
            "step",
            "is_directive_orchestrator",
            "supervisor_task",
            "repositories",
            "completed_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class ContractFileSerializer(serializers.ModelSerializer):
    """A file as listed: everything but its content."""

    size = serializers.SerializerMethodField(help_text="Size of the content in bytes (UTF-8).")

    class Meta:
        model = ContractFile
        fields = ["id", "contract", "name", "size", "created_at"]
        read_only_fields = fields

    def get_size(self, obj: ContractFile) -> int:
        size = getattr(obj, "size", None)  # annotated by the view's queryset
        return size if size is not None else len(obj.content.encode("utf-8"))


class ContractFileDetailSerializer(ContractFileSerializer):
    """A file with its content and optional structured body."""

    body = BodyField(read_only=True, allow_null=True)

    class Meta(ContractFileSerializer.Meta):
        fields = [*ContractFileSerializer.Meta.fields, "content", "body"]
        read_only_fields = fields


class ContractFileCreateSerializer(serializers.Serializer):
    """``POST /contracts/{id}/files/``: a plain file name, text content and an optional body."""

    name = StrictCharField(max_length=200, trim_whitespace=False, help_text="A plain file name, no path.")
    content = StrictCharField(
        required=False, default="", allow_blank=True, trim_whitespace=False, help_text="The file's text."
    )
    body = BodyField(required=False, allow_null=True, default=None)


class TaskSerializer(serializers.ModelSerializer):
    """A task as agents and the dashboard see it. Tokens are never part of it."""

    merge_branches = serializers.ListField(child=serializers.CharField(), read_only=True)
    daemon_name = serializers.CharField(source="daemon.name", read_only=True, default=None, allow_null=True)
    verifier_results = serializers.ListField(child=serializers.DictField(), read_only=True)

    class Meta:
        model = Task
        fields = [
            "id",
            "name",
            "kind",
            "agent",
            "status",
            "plan",
            "directive",
            "step",
            "contract",
            "daemon",
            "daemon_name",
            "is_supervisor",
            "attempt",
            "priority",
            "repository_url",
            "base_branch",
            "branch",
            "continue_from_task",
            "merge_branches",
            "completion_action",
            "exit_code",
            "error",
            "summary",
            "question",
            "commit_sha",
            "verifier_results",
            "cost_usd",
            "supervisor_completed_at",
            "started_at",
            "finished_at",
            "last_heartbeat_at",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class TaskMessageSerializer(serializers.Serializer):
    """``POST /tasks/{id}/message/``: the answer to a paused task's question."""

    message = StrictCharField(
        max_length=TASK_MESSAGE_MAX_CHARS,
        help_text=f"The answer handed to the waiting agent (1–{TASK_MESSAGE_MAX_CHARS} characters).",
    )


class TaskOutputSerializer(serializers.ModelSerializer):
    class Meta:
        model = TaskOutput
        fields = ["seq", "stream", "content", "created_at"]
        read_only_fields = fields


class TaskOutputQuerySerializer(serializers.Serializer):
    """Query parameters of ``GET /tasks/{id}/output/``."""

    attempt = serializers.IntegerField(
        min_value=1,
        max_value=INTEGER_MAX,
        required=False,
        help_text=(
            "Whose lines: a retried task runs again as its next attempt and numbers its lines from 1 again. "
            "Default: the task's current attempt."
        ),
    )
    after_seq = serializers.IntegerField(
        min_value=0,
        required=False,
        default=0,
        help_text="Return lines of that attempt with a larger seq (0: from the start).",
    )
    limit = serializers.IntegerField(
        min_value=1,
        max_value=OUTPUT_PAGE_MAX,
        required=False,
        default=OUTPUT_PAGE_DEFAULT,
        help_text=f"At most this many lines (1–{OUTPUT_PAGE_MAX}).",
    )


class TaskOutputPageSerializer(serializers.Serializer):
    """One page of one attempt's output, oldest first. Poll again with the same
    ``attempt`` and ``after_seq=next_after_seq``; once ``task_attempt`` is larger
    than ``attempt``, the task was retried: read the new attempt from ``after_seq=0``."""

    attempt = serializers.IntegerField(help_text="The attempt these lines belong to.")
    items = TaskOutputSerializer(many=True)
    next_after_seq = serializers.IntegerField(
        help_text="The seq of the last line returned, or the requested after_seq when there is none."
    )
    has_more = serializers.BooleanField(help_text="More lines are already stored after this page.")
    # A plain string rather than a second copy of the Task status enum (which would make
    # drf-spectacular's enum naming ambiguous).
    task_status = serializers.CharField(help_text="The task's status, so a poller knows when to stop.")
    task_attempt = serializers.IntegerField(
        help_text="The task's current attempt, so a poller knows when a retry started (seq begins at 1 again)."
    )
