"""The directive page: header, step graph, run grid, events timeline, goal
history and the step panel, each a live region with its own partial URL.

Every live region is rendered by one template whose root element carries
``id`` and ``data-live-url``; the full page includes the same templates, so a
refresh of a partial replaces the element with an identical, fresh one.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.decorators import login_required
from django.db.models import F, Window
from django.db.models.functions import RowNumber
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import path, reverse
from django.utils import timezone
from django.views.decorators.http import require_GET

from contracts.models import Task, TaskOutput
from contracts.selectors import task_output_visible_to, tasks_visible_to
from directives import dag
from directives.models import ApprovalRequest, Chain, Directive, DirectiveEvent, Evaluation, Step, StepDependency
from directives.selectors import (
    approvals_visible_to,
    chains_visible_to,
    directives_visible_to,
    evaluations_visible_to,
    events_visible_to,
    steps_visible_to,
)
from directives.templatetags.dashboard import elapsed, label
from directives.views.common import evaluation_rows, verifier_rows

PARTS = ("header", "dag", "grid", "events", "goals")
EVENTS_PAGE = 100
GOALS_SHOWN = 100
OUTPUT_LINES = 500
# Output keeps polling while the task may still write; interrupted tasks are
# retried as the same task, and the live feed refreshes the panel when they are.
OUTPUT_LIVE = frozenset({Task.Status.PENDING, Task.Status.STARTING, Task.Status.RUNNING, Task.Status.PAUSED})
PROGRESS_ORDER = (
    Step.Status.PASSED,
    Step.Status.SKIPPED,
    Step.Status.RUNNING,
    Step.Status.EVALUATING,
    Step.Status.AWAITING_APPROVAL,
    Step.Status.READY,
    Step.Status.FAILED,
    Step.Status.BLOCKED,
    Step.Status.PENDING,
)
SEVERITIES = tuple(DirectiveEvent.Severity.values)
STEP_FIELDS = (
    "id",
    "directive_id",
    "chain_id",
    "name",
    "status",
    "order_index",
    "generation",
    "rework_count",
    "started_at",
    "finished_at",
    "created_at",
)
_PLACEHOLDER = uuid.UUID(int=0)


def _is_htmx(request: HttpRequest) -> bool:
    return request.headers.get("HX-Request") == "true"


def _http_link(url: str) -> str:
    """``url`` when it is an http(s) address (safe as an ``href``), else ``""``."""
    return url if url.lower().startswith(("http://", "https://")) else ""


def _num(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0")


def _step_panel_url(directive: Directive) -> Callable[[Any], str]:
    """``step_id → step-panel URL`` of this directive, reversing the route once
    rather than once per step."""
    template = reverse("step-panel", args=[directive.pk, _PLACEHOLDER])
    return lambda step_id: template.replace(str(_PLACEHOLDER), str(step_id))


def _grid_cell(attempt: Attempt) -> dict[str, Any]:
    task = attempt.task
    return {
        "task_status": task.status if task else "",
        # A task still at work shows how long it has run so far.
        "duration": elapsed(task.started_at, task.finished_at or timezone.now()) if task else "",
        "evaluations": [
            {
                "passed": e.passed,
                "kind": e.kind,
                "score": f"{e.overall_score:.2f}",
                "confidence": e.confidence_level,
            }
            for e in attempt.evaluations
        ],
    }


# --------------------------------------------------------------------------- page data


@dataclass
class Attempt:
    """One execution task of a step with the evaluations recorded after it."""

    number: int
    task: Task | None
    evaluations: list[Evaluation] = field(default_factory=list)
    evaluators: list[Task] = field(default_factory=list)


def _attempts(tasks: list[Task], evaluations: list[Evaluation], evaluators: list[Task] | None = None) -> list[Attempt]:
    """Execution tasks in creation order, each followed by what was recorded for it:
    an evaluation (or evaluator task) belongs to the last attempt created before it."""
    attempts = [Attempt(number=i, task=task) for i, task in enumerate(tasks, start=1)]

    def owner_of(created_at: Any) -> Attempt:
        chosen = None
        for attempt in attempts:
            if attempt.task is not None and attempt.task.created_at <= created_at:
                chosen = attempt
        if chosen is None:
            # Evaluated without a recorded execution task (or before it): an attempt of its own.
            if not attempts or attempts[0].task is not None:
                attempts.insert(0, Attempt(number=0, task=None))
            chosen = attempts[0]
        return chosen

    for evaluation in evaluations:
        owner_of(evaluation.created_at).evaluations.append(evaluation)
    for evaluator in evaluators or []:
        owner_of(evaluator.created_at).evaluators.append(evaluator)
    return attempts


class PageData:
    """What the directive page shows, loaded on first use with a bounded number
    of queries whatever the number of steps, tasks and events."""

    def __init__(self, request: HttpRequest, directive: Directive) -> None:
        self.request = request
        self.user = request.user
        self.directive = directive

    @cached_property
    def steps(self) -> list[Step]:
        return list(
            steps_visible_to(self.user)
            .filter(directive=self.directive)
            .only(*STEP_FIELDS)
            .order_by("generation", "order_index", "created_at")
        )

    @cached_property
    def dependencies(self) -> dict[Any, list[Any]]:
        deps: dict[Any, list[Any]] = defaultdict(list)
        rows = (
            StepDependency.objects.filter(step__directive=self.directive)
            .order_by("step_id", "position")
            .values_list("step_id", "depends_on_id")
        )
        for step_id, depends_on_id in rows:
            deps[step_id].append(depends_on_id)
        return deps

    @cached_property
    def graph_steps(self) -> list[Step]:
        """The steps of the current chain; while a new chain is being planned
        (no current chain), those of the newest generation."""
        current = self.directive.current_chain_id
        if current is not None:
            return [s for s in self.steps if s.chain_id == current]
        newest = max((s.generation for s in self.steps), default=None)
        return [s for s in self.steps if s.generation == newest]

    @cached_property
    def chains(self) -> dict[Any, Chain]:
        rows = chains_visible_to(self.user).filter(directive=self.directive).only("id", "generation", "name", "status")
        return {c.pk: c for c in rows}

    @cached_property
    def execution_tasks(self) -> dict[Any, list[Task]]:
        by_step: dict[Any, list[Task]] = defaultdict(list)
        rows = (
            tasks_visible_to(self.user)
            .filter(directive=self.directive, kind=Task.Kind.EXECUTION, step__isnull=False)
            .only("id", "step_id", "status", "attempt", "started_at", "finished_at", "created_at")
            .order_by("created_at", "id")
        )
        for task in rows:
            by_step[task.step_id].append(task)
        return by_step

    @cached_property
    def evaluations(self) -> dict[Any, list[Evaluation]]:
        by_step: dict[Any, list[Evaluation]] = defaultdict(list)
        rows = (
            evaluations_visible_to(self.user)
            .filter(directive=self.directive)
            .only("id", "step_id", "kind", "passed", "overall_score", "confidence_level", "created_at")
            .order_by("created_at", "id")
        )
        for evaluation in rows:
            by_step[evaluation.step_id].append(evaluation)
        return by_step

    # ---- regions

    def header(self) -> dict[str, Any]:
        directive = self.directive
        counts: dict[str, int] = defaultdict(int)
        for step in self.graph_steps:
            counts[step.status] += 1
        total = len(self.graph_steps)
        segments = [
            {"status": status, "count": counts[status], "percent": round(100 * counts[status] / total, 2)}
            for status in PROGRESS_ORDER
            if counts.get(status)
        ]
        limit = directive.max_total_cost_usd
        return {
            "total_steps": total,
            "done_steps": sum(counts[s] for s in Step.DONE),
            "segments": segments,
            "cost_percent": min(100, round(100 * directive.total_cost_usd / limit)) if limit else None,
            "pr_link": _http_link(directive.pr_url),
        }

    def dag(self) -> dict[str, Any]:
        steps = self.graph_steps
        by_id = {s.pk: s for s in steps}
        edges = [(dep, s.pk) for s in steps for dep in self.dependencies.get(s.pk, ()) if dep in by_id]
        placed = dag.layout([(s.pk, s.order_index) for s in steps], edges)
        panel = _step_panel_url(self.directive)
        # Plain values, prepared once: a 500-node graph must render quickly. The
        # template still escapes every one of them.
        nodes = []
        for box in placed.nodes:
            step = by_id[box.key]
            nodes.append(
                {
                    "id": str(step.pk),
                    "name": step.name,
                    "status": step.status,
                    "label": label(step.status),
                    "icon": dag.status_icon(step.status),
                    "panel_url": panel(step.pk),
                    "x": _num(box.x),
                    "y": _num(box.y),
                    "width": box.width,
                    "height": box.height,
                    "cx": _num(box.cx),
                    "cy": _num(box.cy),
                    "text_x": _num(box.x + 10),
                    "name_y": _num(box.y + 19),
                    "state_y": _num(box.y + 36),
                }
            )
        return {"layout": placed, "nodes": nodes, "compact_threshold": dag.COMPACT_THRESHOLD}

    def grid(self) -> dict[str, Any]:
        panel = _step_panel_url(self.directive)
        groups: dict[int, list[dict[str, Any]]] = defaultdict(list)
        width = 1
        for step in self.steps:
            attempts = _attempts(self.execution_tasks.get(step.pk, []), self.evaluations.get(step.pk, []))
            width = max(width, len(attempts))
            groups[step.generation].append(
                {
                    "id": str(step.pk),
                    "name": step.name,
                    "status": step.status,
                    "panel_url": panel(step.pk),
                    "cells": [_grid_cell(attempt) for attempt in attempts],
                }
            )
        chains_by_generation = {c.generation: c for c in self.chains.values()}
        generations = [
            {"generation": generation, "chain": chains_by_generation.get(generation), "rows": members}
            for generation, members in sorted(groups.items(), reverse=True)
        ]
        for group in generations:
            for row in group["rows"]:
                row["padding"] = range(width - len(row["cells"]))
        return {
            "generations": generations,
            "attempt_columns": range(1, width + 1),
            "several": len(generations) > 1,
        }

    def events(self, *, severity: str = "", before: int | None = None) -> dict[str, Any]:
        rows = events_visible_to(self.user).filter(directive=self.directive)
        if severity:
            rows = rows.filter(severity=severity)
        if before is not None:
            rows = rows.filter(id__lt=before)
        rows = rows.select_related("step").only(
            "id",
            "created_at",
            "severity",
            "event_type",
            "message",
            "actor_type",
            "actor",
            "step_id",
            "step__id",
            "step__name",
        )
        page = list(rows.order_by("-id")[: EVENTS_PAGE + 1])
        has_older = len(page) > EVENTS_PAGE
        page = page[:EVENTS_PAGE]
        base = reverse("directive-partial", args=[self.directive.pk, "events"])
        page_url = reverse("directive-detail", args=[self.directive.pk])

        def query(**params: Any) -> str:
            kept = {k: v for k, v in params.items() if v not in ("", None)}
            return f"?{urlencode(kept)}" if kept else ""

        return {
            "events": page,
            "severity": severity,
            "severities": SEVERITIES,
            "before": before,
            "live_url": base + query(severity=severity, before=before),
            "older_query": query(severity=severity, before=page[-1].pk) if has_older else "",
            "newest_query": query(severity=severity),
            "partial_url": base,
            "page_url": page_url,
        }

    def goals(self) -> dict[str, Any]:
        history = list(self.directive.goal_history.order_by("-replaced_at", "-id")[:GOALS_SHOWN])
        return {"goal_history": history}


def _get_directive(request: HttpRequest, pk: Any) -> Directive:
    return get_object_or_404(directives_visible_to(request.user).select_related("owner", "team"), pk=pk)


def _events_filter(request: HttpRequest) -> tuple[str, int | None]:
    severity = request.GET.get("severity", "")
    if severity not in SEVERITIES:
        severity = ""
    try:
        before = int(request.GET["before"])
    except (KeyError, ValueError):
        before = None
    return severity, before


def _region_context(data: PageData, part: str, request: HttpRequest) -> dict[str, Any]:
    if part == "events":
        severity, before = _events_filter(request)
        return data.events(severity=severity, before=before)
    return getattr(data, part)()


# --------------------------------------------------------------------------- step panel


def _output_lines(tasks: list[Task]) -> dict[Any, dict[str, Any]]:
    """The last :data:`OUTPUT_LINES` lines of each attempt of each task, in one query."""
    if not tasks:
        return {}
    rows = (
        TaskOutput.objects.filter(task_id__in=[t.pk for t in tasks])
        .annotate(from_end=Window(RowNumber(), partition_by=[F("task_id"), F("attempt")], order_by=F("seq").desc()))
        .filter(from_end__lte=OUTPUT_LINES + 1)
        .only("id", "task_id", "attempt", "seq", "stream", "content")
        .order_by("task_id", "attempt", "seq")
    )
    by_task: dict[Any, list[TaskOutput]] = defaultdict(list)
    for row in rows:
        by_task[row.task_id].append(row)
    return {t.pk: _output_context(t, by_task.get(t.pk, [])) for t in tasks}


def _output_context(task: Task, lines: list[TaskOutput]) -> dict[str, Any]:
    """``lines`` by attempt, then oldest first, at most one more per attempt than
    shown (which means earlier lines were cut). A retried task numbers its lines
    from 1 again on every dispatch (``Task.attempt``): each dispatch's lines are
    shown under their own heading, the current one last, even before it wrote."""
    by_attempt: dict[int, list[TaskOutput]] = defaultdict(list)
    for line in lines:
        by_attempt[line.attempt].append(line)
    by_attempt.setdefault(task.attempt, [])
    groups = [
        {
            "attempt": attempt,
            "current": attempt == task.attempt,
            "lines": rows[-OUTPUT_LINES:],
            "truncated": len(rows) > OUTPUT_LINES,
        }
        for attempt, rows in sorted(by_attempt.items())
    ]
    current = by_attempt[task.attempt][-OUTPUT_LINES:]
    return {
        "task": task,
        "groups": groups,
        "labelled": len(groups) > 1 or task.attempt > 1,
        "limit": OUTPUT_LINES,
        "polling": task.status in OUTPUT_LIVE,
        "attempt": task.attempt,
        "last_seq": current[-1].seq if current else -1,
    }


def _step_panel_context(request: HttpRequest, directive: Directive, step_id: Any) -> dict[str, Any]:
    user = request.user
    step = get_object_or_404(steps_visible_to(user).filter(directive=directive), pk=step_id)
    links = list(
        StepDependency.objects.filter(step=step)
        .select_related("depends_on")
        .order_by("position")
        .only("id", "step_id", "position", "depends_on__id", "depends_on__name", "depends_on__status")
    )
    tasks = list(
        tasks_visible_to(user)
        .filter(step=step, kind__in=[Task.Kind.EXECUTION, Task.Kind.MONITORING])
        .select_related("daemon")
        .defer("plan")
        .order_by("created_at", "id")
    )
    evaluations = list(evaluations_visible_to(user).filter(step=step).order_by("created_at", "id"))
    for evaluation in evaluations:
        evaluation_rows(evaluation)
    outputs = _output_lines(tasks)
    for task in tasks:
        task.verifier_rows = verifier_rows(task.verifier_results)
        task.output_context = outputs[task.pk]
    execution = [t for t in tasks if t.kind == Task.Kind.EXECUTION]
    evaluators = [t for t in tasks if t.kind == Task.Kind.MONITORING]
    approvals = list(
        approvals_visible_to(user)
        .filter(step=step, status=ApprovalRequest.Status.PENDING)
        .only("id", "kind", "description", "created_at", "expires_at")
    )
    cost = sum((t.cost_usd for t in tasks), Decimal(0))
    return {
        "step": step,
        "dependencies": [link.depends_on for link in links],
        "attempts": _attempts(execution, evaluations, evaluators),
        "pending_approvals": approvals,
        "step_cost": cost,
        "now": timezone.now(),
    }


# --------------------------------------------------------------------------- views


def _page(request: HttpRequest, directive: Directive, *, step_id: Any = None, strict: bool = False) -> HttpResponse:
    """The full page; ``strict``: an unknown ``step_id`` is a 404 rather than a closed panel."""
    panel = None
    if step_id is not None:
        try:
            panel = _step_panel_context(request, directive, step_id)
        except Http404:
            # A stale or foreign ?step= leaves the panel closed rather than failing the page.
            if strict:
                raise
    data = PageData(request, directive)
    severity, before = _events_filter(request)
    context: dict[str, Any] = {
        "directive": directive,
        "nav": "directives",
        "header": data.header(),
        "dag": data.dag(),
        "grid": data.grid(),
        "events": data.events(severity=severity, before=before),
        "goals": data.goals(),
        "panel": panel,
    }
    return render(request, "directives/detail.html", context)


@require_GET
@login_required
def directive_detail(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    directive = _get_directive(request, pk)
    step_id = None
    with contextlib.suppress(ValueError):
        step_id = uuid.UUID(request.GET.get("step", ""))
    return _page(request, directive, step_id=step_id)


@require_GET
@login_required
def directive_partial(request: HttpRequest, pk: uuid.UUID, part: str) -> HttpResponse:
    if part not in PARTS:
        raise Http404("unknown part")
    directive = _get_directive(request, pk)
    data = PageData(request, directive)
    context = {"directive": directive, part: _region_context(data, part, request)}
    return render(request, f"directives/live/{part}.html", context)


@require_GET
@login_required
def step_panel(request: HttpRequest, pk: uuid.UUID, step: uuid.UUID) -> HttpResponse:
    directive = _get_directive(request, pk)
    if not _is_htmx(request):
        return _page(request, directive, step_id=step, strict=True)
    context = {"directive": directive, "panel": _step_panel_context(request, directive, step)}
    return render(request, "directives/live/step_panel.html", context)


@require_GET
@login_required
def task_output(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    task = get_object_or_404(tasks_visible_to(request.user).only("id", "name", "status", "attempt"), pk=pk)
    try:
        after: int | None = int(request.GET["after"])
    except (KeyError, ValueError):
        after = None
    # `after` is a seq of the attempt the poller shows; a retry numbers its lines from 1 again.
    shown_attempt = request.GET.get("attempt", str(task.attempt))
    if (
        after is not None
        and task.status in OUTPUT_LIVE
        and shown_attempt == str(task.attempt)
        and not task_output_visible_to(request.user).filter(task=task, attempt=task.attempt, seq__gt=after).exists()
    ):
        return HttpResponse(status=204)  # nothing new: htmx keeps the element and polls again
    return render(request, "directives/live/task_output.html", {"output": _output_lines([task])[task.pk]})


urlpatterns = [
    path("directives/<uuid:pk>/", directive_detail, name="directive-detail"),
    path("directives/<uuid:pk>/live/<str:part>/", directive_partial, name="directive-partial"),
    path("directives/<uuid:pk>/steps/<uuid:step>/", step_panel, name="step-panel"),
    path("tasks/<uuid:pk>/output/", task_output, name="task-output"),
]
