"""A populated world for admin pages, and small helpers to drive the admin like a browser."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from html.parser import HTMLParser
from typing import Any

from django.contrib.auth.models import User
from django.db import models
from django.http import HttpResponse
from django.test import Client
from django.urls import reverse

from contracts.models import Contract, ContractFile, ContractRepository, Task, TaskOutput
from contracts.services import contract_file_create, task_output_append
from daemons.models import ApiToken, Daemon, DaemonCommand
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
from directives.services import directive_update, order_link
from makima.state import Actor
from tests.factories import (
    make_approval,
    make_command,
    make_contract,
    make_daemon,
    make_directive,
    make_evaluation,
    make_order,
    make_steps,
    make_task,
    make_token,
)

EVERY_MODEL: list[type[models.Model]] = [
    Directive,
    GoalHistory,
    Chain,
    Step,
    StepDependency,
    Evaluation,
    ApprovalRequest,
    DirectiveEvent,
    Order,
    Contract,
    ContractRepository,
    ContractFile,
    Task,
    TaskOutput,
    Daemon,
    DaemonCommand,
    ApiToken,
]


@dataclass
class World:
    """One directive with one of everything around it; names end in ``index``."""

    directive: Directive
    goal_history: GoalHistory
    chain: Chain
    design: Step
    build: Step
    dependency: StepDependency
    evaluation: Evaluation
    approval: ApprovalRequest
    event: DirectiveEvent
    order: Order
    contract: Contract
    repository: ContractRepository
    file: ContractFile
    daemon: Daemon
    task: Task
    output: TaskOutput
    command: DaemonCommand
    token: ApiToken
    task_token: ApiToken

    def row(self, model: type[models.Model]) -> models.Model:
        """The row of ``model`` whose pages the tests open."""
        special = {Step: self.design, ApiToken: self.token}
        if model in special:
            return special[model]
        return next(value for value in vars(self).values() if type(value) is model)


def build_world(owner: User, index: int = 0) -> World:
    actor = Actor.for_user(owner)
    directive = make_directive(owner, title=f"Directive {index}")
    directive_update(directive=directive, actor=actor, goal=f"Revised goal {index}")
    design, build = make_steps(
        directive, {"name": f"Design {index}"}, {"name": f"Build {index}", "depends_on": [f"Design {index}"]}
    )
    evaluation = make_evaluation(design, summary_feedback=f"Feedback {index}")
    approval = make_approval(build, description=f"Review {index}")
    order = make_order(owner, title=f"Order {index}")
    order_link(order=order, directive=directive, actor=actor)
    contract = make_contract(
        directive,
        name=f"Contract {index}",
        step=design,
        repositories=[{"name": f"repo-{index}", "url": f"https://example.com/r{index}.git", "is_primary": True}],
    )
    file = contract_file_create(contract=contract, name=f"notes-{index}.md", content=f"File content {index}")
    daemon = make_daemon(owner, name=f"box-{index}")
    task = make_task(
        directive, step=design, contract=contract, daemon=daemon, name=f"Task {index}", cost_usd=Decimal("0.25")
    )
    task_output_append(
        task=task,
        items=[{"seq": 1, "content": f"output line {index}"}, {"seq": 2, "stream": "stderr", "content": "warn"}],
    )
    # What dispatch would record on the step (no service sets it outside the orchestrator).
    Step.objects.filter(pk=design.pk).update(execution_task=task, execution_contract=contract)
    design.refresh_from_db()
    return World(
        directive=directive,
        goal_history=GoalHistory.objects.get(directive=directive),
        chain=Chain.objects.get(directive=directive),
        design=design,
        build=build,
        dependency=StepDependency.objects.get(step=build),
        evaluation=evaluation,
        approval=approval,
        event=DirectiveEvent.objects.get(directive=directive, event_type="directive_created"),
        order=order,
        contract=contract,
        repository=ContractRepository.objects.get(contract=contract),
        file=file,
        daemon=daemon,
        task=task,
        output=TaskOutput.objects.get(task=task, seq=1),
        command=make_command(daemon, task),
        token=make_token(owner, name=f"key {index}").token,
        task_token=make_token(owner, kind=ApiToken.Kind.TASK, task=task, name=f"task key {index}").token,
    )


# What each changelist and change page must show for ``build_world(owner, 0)``.
SHOWN: dict[type[models.Model], tuple[str, str]] = {
    # model: (on the changelist, on the change page)
    Directive: ("Directive 0", "Revised goal 0"),
    GoalHistory: ("Directive 0", "Expose /healthz returning 200 when the service is up."),
    Chain: ("Hand-authored plan", "Design 0"),
    Step: ("Design 0", "Build 0"),
    StepDependency: ("Build 0", "Design 0"),
    Evaluation: ("Design 0", "Feedback 0"),
    ApprovalRequest: ("Build 0", "Review 0"),
    DirectiveEvent: ("directive_created", "Directive 0"),
    Order: ("Order 0", "Directive 0"),
    Contract: ("Contract 0", "notes-0.md"),
    ContractRepository: ("repo-0", "https://example.com/r0.git"),
    ContractFile: ("notes-0.md", "File content 0"),
    Task: ("Task 0", "output line 0"),
    TaskOutput: ("output line 0", "Task 0"),
    Daemon: ("box-0", "scripted"),
    DaemonCommand: ("box-0", "spawn_task"),
    ApiToken: ("key 0", "mk_u_"),
}


def model_id(model: type[models.Model]) -> str:
    return f"{model._meta.app_label}.{model._meta.model_name}"


def changelist(model: type[models.Model]) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


def change_page(obj: models.Model) -> str:
    return reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])


def add_page(model: type[models.Model]) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_add")


def run_action(client: Client, model: type[models.Model], action: str, *objects: models.Model) -> HttpResponse:
    """Select ``objects`` on the changelist and run ``action``, as the action bar does."""
    return client.post(
        changelist(model),
        {"action": action, "_selected_action": [str(obj.pk) for obj in objects]},
        follow=True,
    )


class _FormReader(HTMLParser):
    """Collects what a browser would submit from one ``<form id=…>``."""

    def __init__(self, form_id: str) -> None:
        super().__init__(convert_charrefs=True)
        self.form_id = form_id
        self.inside = False
        self.data: dict[str, list[str]] = {}
        self._textarea: str | None = None
        self._text: list[str] = []
        self._select: str | None = None
        self._options: list[tuple[str, bool]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form" and attributes.get("id") == self.form_id:
            self.inside = True
        if not self.inside:
            return
        name = attributes.get("name")
        if tag == "input" and name:
            kind = attributes.get("type") or "text"
            if kind in ("submit", "button", "image", "reset", "file"):
                return
            if kind in ("checkbox", "radio") and "checked" not in attributes:
                return
            self.data.setdefault(name, []).append(attributes.get("value") or ("on" if kind == "checkbox" else ""))
        elif tag == "textarea" and name:
            self._textarea, self._text = name, []
        elif tag == "select" and name:
            self._select, self._options = name, []
        elif tag == "option" and self._select:
            self._options.append((attributes.get("value") or "", "selected" in attributes))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False
        elif tag == "textarea" and self._textarea:
            # Browsers drop the newline that Django's widget puts after <textarea>.
            self.data.setdefault(self._textarea, []).append("".join(self._text).removeprefix("\n"))
            self._textarea = None
        elif tag == "select" and self._select:
            chosen = [value for value, selected in self._options if selected]
            if not chosen and self._options:
                chosen = [self._options[0][0]]
            if chosen:
                self.data.setdefault(self._select, []).extend(chosen)
            self._select = None

    def handle_data(self, data: str) -> None:
        if self._textarea:
            self._text.append(data)


def form_data(response: HttpResponse, form_id: str) -> dict[str, Any]:
    """The fields of ``<form id=form_id>`` on an admin page, ready to post back."""
    reader = _FormReader(form_id)
    reader.feed(response.content.decode())
    assert reader.data, f"no form #{form_id} on the page"
    return {name: values if len(values) > 1 else values[0] for name, values in reader.data.items()}
