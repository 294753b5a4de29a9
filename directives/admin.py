"""Django admin for directives, goal history, chains, steps, dependencies,
evaluations, approvals, the event log and orders.

Staff see every row here (no owner scoping). Rows change only through the
services: admin actions call them, and the add/change forms of directives,
steps and orders hand their cleaned data to ``directive_create``,
``directive_update``, ``step_update``, ``order_create`` and ``order_update``.
Status fields change only through actions; audit rows are read-only.

The helpers at the top are shared with the contracts and daemons admins
(``directives`` is the app the other two already build on).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets, model_ngettext, quote
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db import models
from django.db.models import Count, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils.functional import cached_property
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator

from directives.models import (
    ApprovalRequest,
    Chain,
    Directive,
    DirectiveEvent,
    Evaluation,
    GoalHistory,
    Order,
    Step,
    StepDependency,
)
from directives.services import (
    DIRECTIVE_EDITABLE_FIELDS,
    ORDER_EDITABLE_FIELDS,
    STEP_EDITABLE_FIELDS,
    STEP_EDITABLE_STATUSES,
    approval_approve,
    approval_deny,
    directive_clean,
    directive_create,
    directive_pause,
    directive_resume,
    directive_start,
    directive_stop,
    directive_update,
    order_create,
    order_update,
    step_retry,
    step_skip,
    step_spec_from_mapping,
    step_update,
)
from makima.errors import Conflict, DomainError
from makima.state import Actor

# --------------------------------------------------------------------------- shared helpers

# A bulk action over hundreds of refused rows should not bury the page in messages.
MAX_REFUSAL_MESSAGES = 20


def admin_url(obj: models.Model) -> str:
    """The admin change page of ``obj``."""
    opts = obj._meta
    return reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[quote(obj.pk)])


def admin_link(obj: models.Model | None, label: object = None) -> SafeString | None:
    """A link to ``obj``'s change page; the label (agent text, often) is escaped.
    ``None`` lets the admin show its "-" placeholder."""
    if obj is None:
        return None
    return format_html('<a href="{}">{}</a>', admin_url(obj), obj if label is None else label)


def changelist_url(model: type[models.Model], **params: Any) -> str:
    """The admin changelist of ``model``, filtered by ``params``."""
    opts = model._meta
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
    return f"{url}?{urlencode(params)}" if params else url


def link_column(field: str, *, description: str | None = None, ordering: str | None = None) -> Callable[..., Any]:
    """A changelist column linking to the object in ``field`` (select it with
    ``list_select_related`` so that the column costs no query per row)."""

    @admin.display(description=description or field.replace("_", " "), ordering=ordering or field)
    def column(self: admin.ModelAdmin, obj: models.Model) -> SafeString | None:
        return admin_link(getattr(obj, field))

    column.__name__ = f"{field}_link"
    return column


def related_count(model: type[models.Model], fk: str, *, outer: str = "pk", **filters: Any) -> Coalesce:
    """``COUNT(*)`` of ``model`` rows whose ``fk`` points at the outer row, as a
    subquery: one query for the whole page, and unlike ``Count`` over joins it
    does not multiply when several counts are annotated together."""
    rows = (
        model._default_manager.filter(**{fk: OuterRef(outer)}, **filters)
        .order_by()
        .values(fk)
        .annotate(n=Count("pk"))
        .values("n")
    )
    return Coalesce(Subquery(rows, output_field=models.IntegerField()), 0)


def short(text: str, length: int = 80) -> str:
    """``text`` cut to ``length`` characters for a list column (still escaped by the admin)."""
    return Truncator(text).chars(length)


def describe(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(error.messages)
    if isinstance(error, ObjectDoesNotExist):
        return "it was deleted meanwhile"
    return str(error)


def apply_service(
    modeladmin: admin.ModelAdmin,
    request: HttpRequest,
    queryset: QuerySet[Any],
    service: Callable[[Any, Actor], object],
    *,
    verb: str,
    done: str,
    state: Callable[[Any], object] = attrgetter("status"),
) -> None:
    """Run ``service(obj, actor)`` for every selected object.

    A refusal (an invalid transition or any other domain error) is reported for
    that object and the others still go through; each call is its own
    transaction, so one refusal rolls back nothing else.
    """
    actor = Actor.for_user(request.user)
    changed = unchanged = refused = 0
    for obj in queryset:
        before = state(obj)
        try:
            service(obj, actor)
        except (DomainError, ValidationError, ObjectDoesNotExist) as error:
            refused += 1
            if refused <= MAX_REFUSAL_MESSAGES:
                level = messages.WARNING if isinstance(error, Conflict) else messages.ERROR
                # A plain str: the admin template escapes it (names are agent text).
                modeladmin.message_user(request, f"Could not {verb} “{obj}”: {describe(error)}", level)
            continue
        if state(obj) == before:
            unchanged += 1
        else:
            changed += 1
    if refused > MAX_REFUSAL_MESSAGES:
        modeladmin.message_user(
            request, f"… and {refused - MAX_REFUSAL_MESSAGES} more could not be {done}.", messages.WARNING
        )
    if changed:
        modeladmin.message_user(
            request, f"{changed} {model_ngettext(modeladmin.opts, changed)} {done}.", messages.SUCCESS
        )
    if unchanged:
        modeladmin.message_user(
            request,
            f"{unchanged} {model_ngettext(modeladmin.opts, unchanged)} left as they were (already in that state).",
            messages.INFO,
        )


class UUIDSearchMixin(admin.ModelAdmin):
    """A search term that is a UUID finds the rows with that id in
    ``uuid_search_fields`` (its own id, its directive's, …) instead of a text match."""

    uuid_search_fields: Sequence[str] = ("pk",)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        try:
            value = str(uuid.UUID(search_term.strip()))
        except ValueError:
            return super().get_search_results(request, queryset, search_term)
        query = Q()
        for name in self.uuid_search_fields:
            query |= Q(**{name: value})
        return queryset.filter(query), False


class ViewOnlyMixin(admin.ModelAdmin):
    """Rows that the admin shows but never writes: they are created and changed
    by the services only (actions may still call a service)."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Sequence[str]:
        # Every displayed field, so that non-editable ones (ids, timestamps) can be listed too.
        if self.fieldsets:
            return flatten_fieldsets(self.fieldsets)
        return list(self.fields or ())


class ServiceFormMixin(admin.ModelAdmin):
    """For admins whose ``save_model`` calls a service: a refusal raised while
    saving (the row changed state since the form was shown) becomes a message
    on the same page instead of a server error. The admin's transaction has
    been rolled back by then, so nothing half-done remains."""

    def changeform_view(
        self, request: HttpRequest, object_id: str | None = None, form_url: str = "", extra_context: Any = None
    ) -> HttpResponse:
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except (DomainError, ValidationError) as error:
            self.message_user(request, f"Not saved: {describe(error)}", messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())


class BoundedInlineFormSet(BaseInlineFormSet):
    """An inline formset that shows at most ``limit`` rows (in ``row_ordering``)
    and never writes: a directive may have thousands of events and a task
    thousands of output lines, and the change page must not load them all."""

    limit: int | None = None
    row_ordering: Sequence[str] = ()
    # Show the rows picked by ``row_ordering`` in the opposite order (the tail of task output, oldest first).
    reverse_rows: bool = False

    def get_queryset(self) -> Any:
        if not hasattr(self, "_bounded_rows"):
            queryset = super().get_queryset()
            if self.row_ordering:
                queryset = queryset.order_by(*self.row_ordering)
            if self.limit is not None:
                queryset = queryset[: self.limit]
            rows = list(queryset)
            if self.reverse_rows:
                rows.reverse()
            self._bounded_rows = rows
        return self._bounded_rows

    @cached_property
    def total_count(self) -> int:
        return super().get_queryset().count()

    @property
    def is_truncated(self) -> bool:
        return self.limit is not None and len(self.get_queryset()) >= self.limit and self.total_count > self.limit

    @property
    def rows_name(self) -> str:
        return str(self.model._meta.verbose_name_plural)

    @property
    def view_all_url(self) -> str:
        lookup = f"{self.fk.name}__{self.fk.target_field.name}__exact"
        return changelist_url(self.model, **{lookup: self.instance.pk})

    def save(self, commit: bool = True) -> list[Any]:
        # Read-only rows: even tampered POST data must not create or change any.
        self.new_objects, self.changed_objects, self.deleted_objects = [], [], []
        return []


class ReadOnlyInline(admin.TabularInline):
    """A read-only, bounded table of related rows, each linking to its own page;
    when rows were left out, a link below it opens the full filtered list."""

    formset = BoundedInlineFormSet
    template = "admin/edit_inline/bounded_tabular.html"
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True
    limit: int | None = None
    row_ordering: Sequence[str] = ()
    reverse_rows = False
    select_related: Sequence[str] = ()

    def get_formset(self, request: HttpRequest, obj: Any = None, **kwargs: Any) -> Any:
        formset = super().get_formset(request, obj, **kwargs)
        formset.limit = self.limit
        formset.row_ordering = self.row_ordering
        formset.reverse_rows = self.reverse_rows
        return formset

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        queryset = super().get_queryset(request)
        return queryset.select_related(*self.select_related) if self.select_related else queryset

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Sequence[str]:
        return list(self.fields or ())

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# --------------------------------------------------------------------------- inlines


class ChainInline(ReadOnlyInline):
    model = Chain
    fields = ("generation", "name", "status", "created_at")
    row_ordering = ("-generation",)
    limit = 20


class EvaluationInline(ReadOnlyInline):
    model = Evaluation
    fields = ("created_at", "step", "kind", "passed", "overall_score", "confidence_level")
    row_ordering = ("-created_at",)
    limit = 20
    select_related = ("step",)
    verbose_name_plural = "latest evaluations"


class DirectiveEventInline(ReadOnlyInline):
    model = DirectiveEvent
    fields = ("event_link", "created_at", "event_type", "severity", "step", "actor_type", "actor", "message")
    row_ordering = ("-id",)
    limit = 50
    select_related = ("step",)
    show_change_link = False  # the first column links already
    verbose_name_plural = "latest events"

    @admin.display(description="event")
    def event_link(self, event: DirectiveEvent) -> SafeString | None:
        return admin_link(event, f"#{event.pk}")


class StepInline(ReadOnlyInline):
    model = Step
    fields = ("order_index", "name", "step_type", "status", "rework_count", "confidence_level")
    row_ordering = ("order_index", "created_at")
    limit = 200


class StepDependencyInline(ReadOnlyInline):
    """What a step waits for, in the order the dependencies were given."""

    model = StepDependency
    fk_name = "step"
    fields = ("position", "depends_on", "dependency_status")
    row_ordering = ("position",)
    select_related = ("depends_on",)
    show_change_link = False
    verbose_name = "dependency"
    verbose_name_plural = "depends on"

    @admin.display(description="status")
    def dependency_status(self, link: StepDependency) -> str:
        return link.depends_on.get_status_display()


class StepDependentInline(ReadOnlyInline):
    model = StepDependency
    fk_name = "depends_on"
    fields = ("step", "dependent_status")
    row_ordering = ("step__order_index", "step__name")
    select_related = ("step",)
    show_change_link = False
    limit = 100
    verbose_name = "dependent step"
    verbose_name_plural = "steps that depend on this one"

    @admin.display(description="status")
    def dependent_status(self, link: StepDependency) -> str:
        return link.step.get_status_display()


# --------------------------------------------------------------------------- directives


class DirectiveForm(forms.ModelForm):
    """Validates with the same rules as ``directive_create``/``directive_update``."""

    class Meta:
        model = Directive
        fields = sorted(DIRECTIVE_EDITABLE_FIELDS | {"owner"})

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        fields = {name: cleaned[name] for name in DIRECTIVE_EDITABLE_FIELDS - {"team"} if name in cleaned}
        instance = None if self.instance._state.adding else self.instance
        try:
            normalised = directive_clean(fields, instance=instance)
        except ValidationError as error:
            self.add_error(None, error)
        else:
            cleaned.update(normalised)
        return cleaned


def _directive_fieldsets(*, add: bool) -> tuple[tuple[str | None, dict[str, Any]], ...]:
    settings_fieldsets: tuple[tuple[str | None, dict[str, Any]], ...] = (
        ("Repository", {"fields": ("repository_url", "base_branch", "local_path")}),
        ("Plan", {"fields": ("requirements", "acceptance_criteria", "constraints")}),
        (
            "Evaluation",
            {
                "fields": (
                    "evaluation_mode",
                    "verifiers",
                    "agent",
                    "autonomy_level",
                    ("confidence_threshold_green", "confidence_threshold_yellow"),
                    "max_rework_cycles",
                    "fail_closed",
                    "require_plan_approval",
                )
            },
        ),
        ("Circuit breakers", {"fields": ("max_total_cost_usd", "max_wall_time_minutes", "max_chain_regenerations")}),
    )
    if add:
        return ((None, {"fields": ("title", "goal", "owner", "team")}), *settings_fieldsets)
    return (
        (None, {"fields": ("title", "goal", "owner", "team", "status")}),
        *settings_fieldsets,
        (
            "Progress",
            {
                "fields": (
                    "steps_progress",
                    "total_cost_usd",
                    "started_at",
                    "chain_generation_count",
                    "current_chain",
                    "orchestrator_task",
                    "completion_task",
                    "pr_branch",
                    "pull_request",
                    "goal_updated_at",
                    "event_log",
                )
            },
        ),
        ("Record", {"fields": ("id", "created_at", "updated_at")}),
    )


@admin.register(Directive)
class DirectiveAdmin(UUIDSearchMixin, ServiceFormMixin, admin.ModelAdmin):
    form = DirectiveForm
    list_display = (
        "title",
        "status",
        "owner",
        "team",
        "steps_progress",
        "pending_approvals",
        "total_cost_usd",
        "autonomy_level",
        "started_at",
        "updated_at",
    )
    list_filter = (
        "status",
        "autonomy_level",
        "evaluation_mode",
        "agent",
        "require_plan_approval",
        ("owner", admin.RelatedOnlyFieldListFilter),
        ("team", admin.RelatedOnlyFieldListFilter),
    )
    list_select_related = ("owner", "team")
    search_fields = ("title", "goal", "repository_url", "pr_url", "owner__username")
    search_help_text = "Title, goal, repository, pull request URL, owner, or a directive id."
    date_hierarchy = "created_at"
    autocomplete_fields = ("owner", "team")
    inlines = (ChainInline, EvaluationInline, DirectiveEventInline)
    actions = ("start_directives", "pause_directives", "resume_directives", "stop_directives")
    readonly_fields = (
        "id",
        "owner",
        "status",
        "steps_progress",
        "total_cost_usd",
        "started_at",
        "chain_generation_count",
        "current_chain",
        "orchestrator_task",
        "completion_task",
        "pr_branch",
        "pull_request",
        "goal_updated_at",
        "event_log",
        "created_at",
        "updated_at",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Directive]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                step_total=related_count(Step, "chain", outer="current_chain_id"),
                step_done=related_count(Step, "chain", outer="current_chain_id", status__in=Step.DONE),
                approvals_pending=related_count(ApprovalRequest, "directive", status=ApprovalRequest.Status.PENDING),
            )
        )

    def get_fieldsets(self, request: HttpRequest, obj: Directive | None = None) -> Any:
        return _directive_fieldsets(add=obj is None)

    def get_readonly_fields(self, request: HttpRequest, obj: Directive | None = None) -> Sequence[str]:
        return () if obj is None else self.readonly_fields

    def get_inlines(self, request: HttpRequest, obj: Directive | None) -> Any:
        return () if obj is None else self.inlines

    def has_change_permission(self, request: HttpRequest, obj: Directive | None = None) -> bool:
        # directive_update refuses failed and archived directives; show them read-only.
        if obj is not None and obj.status in (Directive.Status.FAILED, Directive.Status.ARCHIVED):
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Directive | None = None) -> bool:
        # Deleting would take the audit log with it; stop or archive instead.
        return False

    def save_model(self, request: HttpRequest, obj: Directive, form: forms.ModelForm, change: bool) -> None:
        actor = Actor.for_user(request.user)
        if change:
            fields = {name: form.cleaned_data[name] for name in form.changed_data if name in DIRECTIVE_EDITABLE_FIELDS}
            if fields:
                # A fresh row: directive_update compares the old goal with the new one.
                directive_update(directive=Directive.objects.get(pk=obj.pk), actor=actor, **fields)
            return
        fields = {name: value for name, value in form.cleaned_data.items() if name in DIRECTIVE_EDITABLE_FIELDS}
        created = directive_create(owner=form.cleaned_data["owner"], actor=actor, **fields)
        # The admin logs and redirects to ``obj``: point it at the row the service made.
        obj.pk = created.pk
        obj._state.adding = False

    @admin.display(description="steps passed", ordering="step_total")
    def steps_progress(self, directive: Directive) -> str:
        return f"{directive.step_done}/{directive.step_total}"

    @admin.display(description="pending approvals", ordering="approvals_pending")
    def pending_approvals(self, directive: Directive) -> int:
        return directive.approvals_pending

    @admin.display(description="pull request")
    def pull_request(self, directive: Directive) -> SafeString | str | None:
        # Only http(s) becomes a link: the URL comes from an agent (no javascript: hrefs).
        if directive.pr_url.startswith(("https://", "http://")):
            return format_html('<a href="{}" rel="noopener noreferrer">{}</a>', directive.pr_url, directive.pr_url)
        return directive.pr_url or None

    @admin.display(description="event log")
    def event_log(self, directive: Directive) -> SafeString:
        count = DirectiveEvent.objects.filter(directive=directive).count()
        url = changelist_url(DirectiveEvent, directive__id__exact=directive.pk)
        return format_html('<a href="{}">All {} events</a>', url, count)

    @admin.action(description="Start selected directives", permissions=["change"])
    def start_directives(self, request: HttpRequest, queryset: QuerySet[Directive]) -> None:
        apply_service(
            self,
            request,
            queryset,
            lambda directive, actor: directive_start(directive=directive, actor=actor),
            verb="start",
            done="started",
        )

    @admin.action(description="Pause selected directives", permissions=["change"])
    def pause_directives(self, request: HttpRequest, queryset: QuerySet[Directive]) -> None:
        apply_service(
            self,
            request,
            queryset,
            lambda directive, actor: directive_pause(directive=directive, actor=actor, reason="Paused in the admin."),
            verb="pause",
            done="paused",
        )

    @admin.action(description="Resume selected directives", permissions=["change"])
    def resume_directives(self, request: HttpRequest, queryset: QuerySet[Directive]) -> None:
        apply_service(
            self,
            request,
            queryset,
            lambda directive, actor: directive_resume(directive=directive, actor=actor),
            verb="resume",
            done="resumed",
        )

    @admin.action(description="Stop selected directives (fails them, cancels their tasks)", permissions=["change"])
    def stop_directives(self, request: HttpRequest, queryset: QuerySet[Directive]) -> None:
        apply_service(
            self,
            request,
            queryset,
            lambda directive, actor: directive_stop(directive=directive, actor=actor, reason="Stopped in the admin."),
            verb="stop",
            done="stopped",
        )


@admin.register(GoalHistory)
class GoalHistoryAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = ("replaced_at", "directive_link", "goal_excerpt")
    list_select_related = ("directive",)
    search_fields = ("directive__title", "previous_goal")
    search_help_text = "Directive title, previous goal, or a directive id."
    uuid_search_fields = ("directive_id",)
    date_hierarchy = "replaced_at"
    fields = ("directive", "previous_goal", "replaced_at")

    directive_link = link_column("directive", ordering="directive__title")

    @admin.display(description="previous goal")
    def goal_excerpt(self, history: GoalHistory) -> str:
        return short(history.previous_goal)


# --------------------------------------------------------------------------- chains and steps


@admin.register(Chain)
class ChainAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = ("name", "directive_link", "generation", "status", "steps_progress", "created_at")
    list_filter = ("status",)
    list_select_related = ("directive",)
    search_fields = ("name", "directive__title")
    search_help_text = "Chain name, directive title, or a chain or directive id."
    uuid_search_fields = ("pk", "directive_id")
    date_hierarchy = "created_at"
    inlines = (StepInline,)
    fields = (
        "id",
        "directive",
        "owner",
        "generation",
        "name",
        "status",
        "steps_progress",
        "description",
        "rationale",
        "created_at",
        "updated_at",
    )

    directive_link = link_column("directive", ordering="directive__title")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Chain]:
        return (
            super()
            .get_queryset(request)
            .annotate(
                step_total=related_count(Step, "chain"),
                step_done=related_count(Step, "chain", status__in=Step.DONE),
            )
        )

    @admin.display(description="steps passed", ordering="step_total")
    def steps_progress(self, chain: Chain) -> str:
        return f"{chain.step_done}/{chain.step_total}"


class StepForm(forms.ModelForm):
    """Validates with the same rules as ``step_update``."""

    class Meta:
        model = Step
        fields = sorted(STEP_EDITABLE_FIELDS)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        step = self.instance
        values = {name: cleaned.get(name, getattr(step, name)) for name in STEP_EDITABLE_FIELDS}
        try:
            step_spec_from_mapping(values, index=1)
        except ValidationError as error:
            self.add_error(None, error.messages)
        name = (cleaned.get("name") or "").strip()
        if (
            name
            and name != step.name
            and Step.objects.filter(directive_id=step.directive_id, generation=step.generation, name=name).exists()
        ):
            self.add_error("name", f"the directive already has a step named '{name}'")
        return cleaned


@admin.register(Step)
class StepAdmin(UUIDSearchMixin, ServiceFormMixin, admin.ModelAdmin):
    form = StepForm
    list_display = (
        "name",
        "directive_link",
        "chain_generation",
        "status",
        "step_type",
        "order_index",
        "dependency_count",
        "rework_count",
        "confidence",
        "execution_task_link",
        "started_at",
        "finished_at",
    )
    list_filter = ("status", "step_type", "confidence_level", "agent")
    list_select_related = ("directive", "chain", "execution_task")
    search_fields = ("name", "description", "directive__title")
    search_help_text = "Step name or description, directive title, or a step, directive or chain id."
    uuid_search_fields = ("pk", "directive_id", "chain_id")
    date_hierarchy = "created_at"
    inlines = (StepDependencyInline, StepDependentInline)
    actions = ("retry_steps", "skip_steps")
    fieldsets = (
        (None, {"fields": ("name", "directive", "chain", "generation", "status", "owner")}),
        ("Work", {"fields": ("step_type", "description", "task_plan", "order_index", "agent", "verifiers")}),
        (
            "Execution",
            {
                "fields": (
                    "execution_task",
                    "execution_contract",
                    "monitoring_task",
                    "monitoring_contract",
                    "started_at",
                    "finished_at",
                )
            },
        ),
        (
            "Evaluation",
            {
                "fields": (
                    "confidence_score",
                    "confidence_level",
                    "last_evaluation",
                    "rework_count",
                    "rework_instructions",
                )
            },
        ),
        ("Chain editor", {"fields": ("editor_x", "editor_y")}),
        ("Record", {"fields": ("id", "created_at", "updated_at")}),
    )

    directive_link = link_column("directive", ordering="directive__title")
    execution_task_link = link_column("execution_task", description="execution task")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Step]:
        return super().get_queryset(request).annotate(dependencies=related_count(StepDependency, "step"))

    def get_readonly_fields(self, request: HttpRequest, obj: Step | None = None) -> Sequence[str]:
        return [name for name in flatten_fieldsets(self.fieldsets) if name not in STEP_EDITABLE_FIELDS]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Steps come from the planner, the API or the chain editor (they need a chain and a DAG check).
        return False

    def has_change_permission(self, request: HttpRequest, obj: Step | None = None) -> bool:
        # step_update refuses steps that have started; show those read-only.
        if obj is not None and obj.status not in STEP_EDITABLE_STATUSES:
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Step | None = None) -> bool:
        return False

    def save_model(self, request: HttpRequest, obj: Step, form: forms.ModelForm, change: bool) -> None:
        fields = {name: form.cleaned_data[name] for name in form.changed_data if name in STEP_EDITABLE_FIELDS}
        if fields:
            step_update(step=Step.objects.get(pk=obj.pk), actor=Actor.for_user(request.user), **fields)

    @admin.display(description="chain", ordering="chain__generation")
    def chain_generation(self, step: Step) -> SafeString | None:
        return admin_link(step.chain, f"gen {step.chain.generation}") if step.chain else None

    @admin.display(description="deps", ordering="dependencies")
    def dependency_count(self, step: Step) -> int:
        return step.dependencies

    @admin.display(description="confidence", ordering="confidence_score")
    def confidence(self, step: Step) -> str | None:
        if step.confidence_score is None:
            return None
        return f"{step.confidence_score:.2f} {step.confidence_level}".strip()

    @admin.action(description="Retry selected failed steps", permissions=["change"])
    def retry_steps(self, request: HttpRequest, queryset: QuerySet[Step]) -> None:
        apply_service(
            self,
            request,
            queryset,
            lambda step, actor: step_retry(step=step, actor=actor),
            verb="retry",
            done="sent back to pending",
        )

    @admin.action(description="Skip selected steps", permissions=["change"])
    def skip_steps(self, request: HttpRequest, queryset: QuerySet[Step]) -> None:
        apply_service(
            self, request, queryset, lambda step, actor: step_skip(step=step, actor=actor), verb="skip", done="skipped"
        )


@admin.register(StepDependency)
class StepDependencyAdmin(ViewOnlyMixin, admin.ModelAdmin):
    list_display = ("step_link", "depends_on_link", "position", "directive")
    list_select_related = ("step__directive", "depends_on")
    search_fields = ("step__name", "depends_on__name", "step__directive__title")
    search_help_text = "Step name, dependency name or directive title."
    fields = ("step", "depends_on", "position", "directive")

    step_link = link_column("step", ordering="step__name")
    depends_on_link = link_column("depends_on", description="depends on", ordering="depends_on__name")

    @admin.display(description="directive", ordering="step__directive__title")
    def directive(self, link: StepDependency) -> SafeString | None:
        return admin_link(link.step.directive)


# --------------------------------------------------------------------------- evaluations and approvals


@admin.register(Evaluation)
class EvaluationAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = (
        "created_at",
        "step_link",
        "directive_link",
        "kind",
        "passed",
        "overall_score",
        "confidence_level",
    )
    list_filter = ("kind", "passed", "confidence_level")
    list_select_related = ("step", "directive")
    search_fields = ("step__name", "directive__title", "summary_feedback")
    search_help_text = "Step name, directive title, feedback, or an evaluation, step or directive id."
    uuid_search_fields = ("pk", "step_id", "directive_id")
    date_hierarchy = "created_at"
    fieldsets = (
        (None, {"fields": ("id", "directive", "chain", "step", "contract", "owner", "kind", "created_at")}),
        ("Verdict", {"fields": ("passed", "overall_score", "confidence_level", "summary_feedback")}),
        ("Details", {"fields": ("criteria_results", "verifier_results", "rework_instructions")}),
    )

    step_link = link_column("step", ordering="step__name")
    directive_link = link_column("directive", ordering="directive__title")


@admin.register(ApprovalRequest)
class ApprovalRequestAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = (
        "created_at",
        "kind",
        "directive_link",
        "step_link",
        "status",
        "responded_by",
        "responded_at",
        "expires_at",
    )
    list_filter = ("status", "kind")
    list_select_related = ("directive", "step", "responded_by")
    search_fields = ("description", "directive__title", "step__name", "response_note")
    search_help_text = "Description, directive title, step name, note, or an approval, directive or step id."
    uuid_search_fields = ("pk", "directive_id", "step_id")
    date_hierarchy = "created_at"
    actions = ("approve_requests", "deny_requests")
    fieldsets = (
        (None, {"fields": ("id", "kind", "status", "directive", "step", "evaluation", "owner", "description")}),
        ("Context", {"fields": ("context",)}),
        ("Response", {"fields": ("response_note", "responded_by", "responded_at", "expires_at")}),
        ("Record", {"fields": ("created_at", "updated_at")}),
    )

    directive_link = link_column("directive", ordering="directive__title")
    step_link = link_column("step", ordering="step__name")

    def has_respond_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("directives.change_approvalrequest")

    @admin.action(description="Approve selected requests", permissions=["respond"])
    def approve_requests(self, request: HttpRequest, queryset: QuerySet[ApprovalRequest]) -> None:
        apply_service(
            self,
            request,
            queryset,
            lambda approval, actor: approval_approve(approval=approval, actor=actor, note="Approved in the admin."),
            verb="approve",
            done="approved",
        )

    @admin.action(description="Deny selected requests (reworks reviewed steps)", permissions=["respond"])
    def deny_requests(self, request: HttpRequest, queryset: QuerySet[ApprovalRequest]) -> None:
        apply_service(
            self,
            request,
            queryset,
            lambda approval, actor: approval_deny(approval=approval, actor=actor, note="Denied in the admin."),
            verb="deny",
            done="denied",
        )


# --------------------------------------------------------------------------- the event log


@admin.register(DirectiveEvent)
class DirectiveEventAdmin(ViewOnlyMixin, UUIDSearchMixin, admin.ModelAdmin):
    list_display = (
        "id",
        "created_at",
        "directive_link",
        "event_type",
        "severity",
        "step_link",
        "actor_type",
        "actor",
        "message_excerpt",
    )
    list_filter = ("severity", "actor_type", "subject_type")
    list_select_related = ("directive", "step")
    search_fields = ("event_type", "message", "actor")
    search_help_text = "Event type, message, actor, or the id of its directive, step, chain or subject."
    uuid_search_fields = ("directive_id", "step_id", "chain_id", "subject_id")
    date_hierarchy = "created_at"
    ordering = ("-id",)
    # The log grows without bound: skip the second COUNT(*) over the whole table.
    show_full_result_count = False
    fields = (
        "id",
        "created_at",
        "directive",
        "chain",
        "step",
        "subject_type",
        "subject_id",
        "event_type",
        "severity",
        "actor_type",
        "actor",
        "message",
        "data",
    )

    directive_link = link_column("directive", ordering="directive__title")
    step_link = link_column("step", ordering="step__name")

    @admin.display(description="message")
    def message_excerpt(self, event: DirectiveEvent) -> str:
        return short(event.message)


# --------------------------------------------------------------------------- orders


@admin.register(Order)
class OrderAdmin(UUIDSearchMixin, ServiceFormMixin, admin.ModelAdmin):
    list_display = ("title", "owner", "priority", "order_type", "status", "directive_link", "created_at")
    list_filter = ("status", "priority", "order_type", ("owner", admin.RelatedOnlyFieldListFilter))
    list_select_related = ("owner", "directive")
    search_fields = ("title", "description", "owner__username", "directive__title")
    search_help_text = "Title, description, owner, directive title, or an order or directive id."
    uuid_search_fields = ("pk", "directive_id")
    date_hierarchy = "created_at"
    autocomplete_fields = ("owner",)

    directive_link = link_column("directive", ordering="directive__title")

    def get_fields(self, request: HttpRequest, obj: Order | None = None) -> Sequence[str]:
        if obj is None:
            return ("owner", "title", "description", "priority", "order_type")
        return (
            "title",
            "description",
            "priority",
            "order_type",
            "owner",
            "status",
            "directive",
            "id",
            "created_at",
            "updated_at",
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Order | None = None) -> Sequence[str]:
        if obj is None:
            return ()
        return ("owner", "status", "directive", "id", "created_at", "updated_at")

    def has_delete_permission(self, request: HttpRequest, obj: Order | None = None) -> bool:
        # Orders are cancelled, not deleted: their events stay meaningful.
        return False

    def save_model(self, request: HttpRequest, obj: Order, form: forms.ModelForm, change: bool) -> None:
        actor = Actor.for_user(request.user)
        if change:
            fields = {name: form.cleaned_data[name] for name in form.changed_data if name in ORDER_EDITABLE_FIELDS}
            if fields:
                order_update(order=Order.objects.get(pk=obj.pk), actor=actor, **fields)
            return
        fields = {name: value for name, value in form.cleaned_data.items() if name in ORDER_EDITABLE_FIELDS}
        created = order_create(owner=form.cleaned_data["owner"], actor=actor, **fields)
        obj.pk = created.pk
        obj._state.adding = False
