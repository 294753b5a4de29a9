"""Django admin for contracts, their repositories and files, tasks and task output.

All of these rows are written by the orchestrator and by daemons through the
services, so the admin shows them read-only (staff see every owner's rows).
Output and file lists are bounded so that a task with a long log still opens fast.
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.db.models.functions import Length
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.safestring import SafeString

from contracts.models import Contract, ContractFile, ContractRepository, Task, TaskOutput
from directives.admin import (
    ReadOnlyInline,
    UUIDSearchMixin,
    ViewOnlyMixin,
    changelist_url,
    link_column,
    related_count,
    short,
)


class ContractRepositoryInline(ReadOnlyInline):
    model = ContractRepository
    fields = ("name", "url", "local_path", "is_primary")
    limit = 50


class ContractFileInline(ReadOnlyInline):
    model = ContractFile
    fields = ("name", "size", "created_at")
    row_ordering = ("-created_at",)
    limit = 50
    verbose_name_plural = "latest files"

    def get_queryset(self, request: HttpRequest) -> QuerySet[ContractFile]:
        # Only the size is shown here; the content stays in the database until a file is opened.
        return super().get_queryset(request).defer("content", "body").annotate(content_length=Length("content"))

    @admin.display(description="characters")
    def size(self, file: ContractFile) -> int:
        return file.content_length


class TaskInline(ReadOnlyInline):
    model = Task
    fields = ("name", "kind", "status", "daemon", "attempt", "cost_usd", "created_at")
    row_ordering = ("-created_at",)
    limit = 50
    select_related = ("daemon",)
    verbose_name_plural = "latest tasks"


class TaskOutputInline(ReadOnlyInline):
    """The tail of a task's output, oldest line first (a retried task's attempts in turn)."""

    model = TaskOutput
    fields = ("attempt", "seq", "stream", "content", "created_at")
    row_ordering = ("-attempt", "-seq")
    reverse_rows = True
    limit = 200
    show_change_link = False
    verbose_name_plural = "output (last lines)"


@admin.register(Contract)
class ContractAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = (
        "name",
        "owner",
        "contract_type",
        "status",
        "phase",
        "directive_link",
        "step_link",
        "is_directive_orchestrator",
        "file_count",
        "task_count",
        "created_at",
    )
    list_filter = ("contract_type", "status", "is_directive_orchestrator")
    list_select_related = ("owner", "directive", "step")
    search_fields = ("name", "description", "directive__title", "owner__username")
    search_help_text = "Name, description, directive title, owner, or a contract, directive or step id."
    uuid_search_fields = ("pk", "directive_id", "step_id")
    date_hierarchy = "created_at"
    inlines = (ContractRepositoryInline, ContractFileInline, TaskInline)
    fieldsets = (
        (None, {"fields": ("id", "name", "owner", "contract_type", "phase", "status", "description")}),
        ("Work", {"fields": ("directive", "step", "is_directive_orchestrator", "supervisor_task")}),
        ("Record", {"fields": ("completed_at", "created_at", "updated_at")}),
    )

    directive_link = link_column("directive", ordering="directive__title")
    step_link = link_column("step", ordering="step__name")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Contract]:
        return (
            super()
            .get_queryset(request)
            .annotate(file_total=related_count(ContractFile, "contract"), task_total=related_count(Task, "contract"))
        )

    @admin.display(description="files", ordering="file_total")
    def file_count(self, contract: Contract) -> int:
        return contract.file_total

    @admin.display(description="tasks", ordering="task_total")
    def task_count(self, contract: Contract) -> int:
        return contract.task_total


@admin.register(ContractRepository)
class ContractRepositoryAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = ("name", "contract_link", "url", "local_path", "is_primary")
    list_filter = ("is_primary",)
    list_select_related = ("contract",)
    search_fields = ("name", "url", "local_path", "contract__name")
    search_help_text = "Name, URL, path, contract name, or a contract id."
    uuid_search_fields = ("contract_id",)
    fields = ("contract", "name", "url", "local_path", "is_primary")

    contract_link = link_column("contract", ordering="contract__name")


@admin.register(ContractFile)
class ContractFileAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = ("name", "contract_link", "size", "created_at")
    list_select_related = ("contract",)
    search_fields = ("name", "contract__name")
    search_help_text = "File name, contract name, or a file or contract id."
    uuid_search_fields = ("pk", "contract_id")
    date_hierarchy = "created_at"
    fields = ("id", "contract", "name", "size", "created_at", "contents", "body")

    contract_link = link_column("contract", ordering="contract__name")

    def get_queryset(self, request: HttpRequest) -> QuerySet[ContractFile]:
        # Files hold up to a megabyte each and a list needs only their size; the
        # change page loads the content when it shows it.
        return super().get_queryset(request).defer("content", "body").annotate(content_length=Length("content"))

    @admin.display(description="characters", ordering="content_length")
    def size(self, file: ContractFile) -> int:
        return file.content_length

    @admin.display(description="content")
    def contents(self, file: ContractFile) -> SafeString:
        return format_html('<pre style="white-space: pre-wrap">{}</pre>', file.content)


@admin.register(Task)
class TaskAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = (
        "name",
        "owner",
        "kind",
        "status",
        "agent",
        "daemon_link",
        "directive_link",
        "step_link",
        "attempt",
        "cost_usd",
        "output_lines",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "kind", "agent", "completion_action", "is_supervisor")
    list_select_related = ("owner", "daemon", "directive", "step")
    search_fields = ("name", "branch", "commit_sha", "directive__title", "owner__username")
    search_help_text = (
        "Name, branch, commit, directive title, owner, or a task, directive, step, contract or daemon id."
    )
    uuid_search_fields = ("pk", "directive_id", "step_id", "contract_id", "daemon_id")
    date_hierarchy = "created_at"
    inlines = (TaskOutputInline,)
    fieldsets = (
        (None, {"fields": ("id", "name", "owner", "kind", "agent", "status", "attempt", "version", "priority")}),
        ("Links", {"fields": ("directive", "step", "contract", "daemon", "is_supervisor", "continue_from_task")}),
        (
            "Repository",
            {
                "fields": (
                    "repository_url",
                    "local_path",
                    "base_branch",
                    "branch",
                    "merge_branches",
                    "completion_action",
                    "base_commit",
                    "commit_sha",
                )
            },
        ),
        ("Plan", {"fields": ("plan", "verifiers", "timeout_s")}),
        (
            "Result",
            {
                "fields": (
                    "exit_code",
                    "error",
                    "summary",
                    "question",
                    "cost_usd",
                    "verifier_results",
                    "supervisor_completed_at",
                    "output_log",
                )
            },
        ),
        (
            "Record",
            {"fields": ("started_at", "finished_at", "last_heartbeat_at", "created_at", "updated_at")},
        ),
    )

    daemon_link = link_column("daemon", ordering="daemon__name")
    directive_link = link_column("directive", ordering="directive__title")
    step_link = link_column("step", ordering="step__name")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Task]:
        return super().get_queryset(request).annotate(output_count=related_count(TaskOutput, "task"))

    @admin.display(description="output", ordering="output_count")
    def output_lines(self, task: Task) -> int:
        return task.output_count

    @admin.display(description="output log")
    def output_log(self, task: Task) -> SafeString:
        url = changelist_url(TaskOutput, task__id__exact=task.pk)
        return format_html('<a href="{}">All {} output lines</a>', url, task.output_count)


@admin.register(TaskOutput)
class TaskOutputAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = ("task_link", "attempt", "seq", "stream", "content_excerpt", "created_at")
    list_filter = ("stream",)
    list_select_related = ("task",)
    search_fields = ("content",)
    search_help_text = "Output text, or a task id."
    uuid_search_fields = ("task_id",)
    # Output grows without bound: skip the second COUNT(*) over the whole table.
    show_full_result_count = False
    fields = ("task", "attempt", "seq", "stream", "content", "created_at")

    task_link = link_column("task", ordering="task__name")

    @admin.display(description="content")
    def content_excerpt(self, line: TaskOutput) -> str:
        return short(line.content, 120)
