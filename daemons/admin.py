"""Django admin for daemons, the daemon command outbox and API tokens.

Daemons and their commands are written by the websocket gateway and the
orchestrator, so they are read-only here. Tokens are minted by
``manage.py createapikey`` (the plain value is printed once and never stored)
and can only be revoked here, through ``token_revoke``; their digest is never shown.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from contracts.models import Task
from daemons.models import ApiToken, Daemon, DaemonCommand
from daemons.services import token_revoke
from directives.admin import UUIDSearchMixin, ViewOnlyMixin, apply_service, link_column, related_count


@admin.register(Daemon)
class DaemonAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = (
        "name",
        "owner",
        "hostname",
        "status",
        "load",
        "capabilities",
        "version",
        "connected_at",
        "last_seen_at",
    )
    list_filter = ("status", ("owner", admin.RelatedOnlyFieldListFilter))
    list_select_related = ("owner",)
    search_fields = ("name", "hostname", "owner__username")
    search_help_text = "Name, hostname, owner, or a daemon id."
    fieldsets = (
        (None, {"fields": ("id", "name", "owner", "hostname", "version", "status", "load")}),
        ("Capacity", {"fields": ("max_concurrent_tasks", "capabilities")}),
        ("Connection", {"fields": ("token", "connection_id", "connected_at", "last_seen_at")}),
        ("Record", {"fields": ("created_at", "updated_at")}),
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Daemon]:
        return (
            super()
            .get_queryset(request)
            .annotate(tasks_on_daemon=related_count(Task, "daemon", status__in=Task.ON_DAEMON))
        )

    @admin.display(description="tasks running / max", ordering="tasks_on_daemon")
    def load(self, daemon: Daemon) -> str:
        return f"{daemon.tasks_on_daemon}/{daemon.max_concurrent_tasks}"


@admin.register(DaemonCommand)
class DaemonCommandAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = ("created_at", "command_type", "daemon_link", "task_link", "status", "sent_at", "acked_at")
    list_filter = ("status", "command_type")
    list_select_related = ("daemon", "task")
    search_fields = ("daemon__name", "error")
    search_help_text = "Daemon name, error, or a command, daemon or task id."
    uuid_search_fields = ("pk", "daemon_id", "task_id")
    date_hierarchy = "created_at"
    show_full_result_count = False
    fields = (
        "id",
        "command_type",
        "status",
        "daemon",
        "task",
        "owner",
        "payload",
        "error",
        "created_at",
        "sent_at",
        "acked_at",
        "updated_at",
    )

    daemon_link = link_column("daemon", ordering="daemon__name")
    task_link = link_column("task", ordering="task__name")


@admin.register(ApiToken)
class ApiTokenAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = (
        "prefix_display",
        "name",
        "owner",
        "kind",
        "is_live",
        "task_link",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    )
    list_filter = ("kind", ("revoked_at", admin.EmptyFieldListFilter), ("owner", admin.RelatedOnlyFieldListFilter))
    list_select_related = ("owner", "task")
    search_fields = ("name", "prefix", "owner__username")
    search_help_text = "Name, prefix, owner, or a token, task or directive id."
    uuid_search_fields = ("pk", "task_id", "directive_id")
    date_hierarchy = "created_at"
    actions = ("revoke_tokens",)
    # No ``digest`` anywhere: it is the stored secret's hash and of no use to a reader.
    fields = (
        "id",
        "prefix_display",
        "name",
        "owner",
        "kind",
        "task",
        "directive",
        "contract",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    )

    task_link = link_column("task", ordering="task__name")

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        note = (
            "Tokens are minted with “manage.py createapikey USER [--daemon]”, which prints the token once; "
            "here they can only be revoked."
        )
        return super().changelist_view(request, {"subtitle": note, **(extra_context or {})})

    def has_revoke_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("daemons.change_apitoken")

    @admin.display(description="prefix", ordering="prefix")
    def prefix_display(self, token: ApiToken) -> str:
        return f"{token.prefix}…"

    @admin.display(description="live", boolean=True)
    def is_live(self, token: ApiToken) -> bool:
        # The same rules as token_authenticate, minus the owner's is_active flag.
        if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= timezone.now()):
            return False
        return token.kind != ApiToken.Kind.TASK or (token.task is not None and token.task.status not in Task.TERMINAL)

    @admin.action(description="Revoke selected tokens", permissions=["revoke"])
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[ApiToken]) -> None:
        apply_service(
            self,
            request,
            queryset,
            lambda token, actor: token_revoke(token=token, actor=actor),
            verb="revoke",
            done="revoked",
            state=lambda token: token.revoked_at is None,
        )
