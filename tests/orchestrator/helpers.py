"""Shared moves for the orchestrator tests: a daemon that is online, a daemon's
report of a finished task, files agents write, and the common walk from a
draft to a planned, running directive.

Services trigger ``advance`` only after their transaction commits, which a
pytest-django test never does; these helpers call ``advance`` themselves.
"""

from __future__ import annotations

import json
from typing import Any

from django.db import models
from django.utils import timezone

from contracts.models import Contract, ContractFile, Task
from contracts.services import contract_file_create, task_supervisor_complete, task_transition
from daemons.models import Daemon, DaemonCommand
from directives.lifecycle import advance, on_task_finished
from directives.models import Directive, DirectiveEvent, Step
from directives.services import directive_start
from makima.state import Actor
from tests.factories import make_daemon, make_directive

AGENT = Actor("agent", "test agent")


def reload(obj: models.Model) -> Any:
    return type(obj)._default_manager.get(pk=obj.pk)


def online(owner: Any, name: str = "build-box-1", **fields: Any) -> Daemon:
    """A connected daemon of ``owner`` that runs both agents tests use."""
    values: dict[str, Any] = {
        "capabilities": ["scripted", "claude"],
        "status": Daemon.Status.CONNECTED,
        "max_concurrent_tasks": 8,
        "connected_at": timezone.now(),
        "last_seen_at": timezone.now(),
    }
    values.update(fields)
    return make_daemon(owner, name, **values)


def go(directive: Directive) -> dict[str, int]:
    """What ``advance_after_commit`` does once a service's transaction commits."""
    return advance(directive_ids=[directive.pk])


def finish(task: Task, status: str = Task.Status.DONE, **fields: Any) -> Task:
    """Simulate the daemon's ``task_finished`` report: store the reported fields,
    end the task, then apply the consequences as the gateway does."""
    task = reload(task)
    assert task.status in Task.ON_DAEMON, f"task '{task.name}' is {task.status}, not on a daemon"
    task_transition(task=task, to=status, updates=fields)
    on_task_finished(task_id=task.pk)
    return reload(task)


def supervisor_complete(task: Task) -> None:
    task_supervisor_complete(task=reload(task), actor=AGENT)


def write_file(contract: Contract | Any, name: str, content: str = "", body: Any = None) -> ContractFile:
    if not isinstance(contract, Contract):
        contract = Contract.objects.get(pk=contract)
    return contract_file_create(contract=contract, name=name, content=content, body=body, actor=AGENT)


def plan_json(*steps: dict[str, Any]) -> str:
    return json.dumps({"steps": list(steps)})


def step(name: str, *depends_on: str, order_index: int = 0, **fields: Any) -> dict[str, Any]:
    """One step of a plan file."""
    return {
        "name": name,
        "description": f"Do {name}.",
        "task_plan": f"Plan for {name}.",
        "depends_on": list(depends_on),
        "order_index": order_index,
        "step_type": "implement",
        **fields,
    }


def planning_task(directive: Directive) -> Task:
    return reload(directive).orchestrator_task


def tasks(directive: Directive, kind: str) -> list[Task]:
    return list(Task.objects.filter(directive=directive, kind=kind).order_by("created_at"))


def events(directive: Directive, event_type: str | None = None) -> list[DirectiveEvent]:
    qs = DirectiveEvent.objects.filter(directive=directive)
    if event_type is not None:
        qs = qs.filter(event_type=event_type)
    return list(qs.order_by("id"))


def spawn_commands(task: Task | None = None) -> list[DaemonCommand]:
    qs = DaemonCommand.objects.filter(command_type=DaemonCommand.CommandType.SPAWN_TASK)
    if task is not None:
        qs = qs.filter(task=task)
    return list(qs.order_by("created_at"))


def step_named(directive: Directive, name: str) -> Step:
    return Step.objects.exclude(chain__status="superseded").get(directive=directive, name=name)


def submit_plan(directive: Directive, *steps: dict[str, Any], complete: bool = True) -> Directive:
    """The planner writes ``chain-plan`` and its task ends ``done``."""
    task = planning_task(directive)
    assert task is not None, "the directive has no planning task"
    write_file(task.contract, "chain-plan", plan_json(*steps))
    if complete:
        supervisor_complete(task)
    finish(task)
    return reload(directive)


def planned(owner: Any, *steps: dict[str, Any], **fields: Any) -> Directive:
    """A directive started, planned by the planner with ``steps``, and active."""
    fields.setdefault("agent", "scripted")
    directive = make_directive(owner, **fields)
    directive_start(directive=directive, actor=Actor.for_user(owner))
    go(directive)
    directive = submit_plan(directive, *(steps or (step("A"),)))
    assert directive.status == Directive.Status.ACTIVE, directive.status
    return directive


def run(step_: Step, status: str = Task.Status.DONE, **fields: Any) -> Step:
    """The step's current execution task ends with ``status``."""
    step_ = reload(step_)
    task = step_.execution_task
    assert task is not None, f"step '{step_.name}' has no execution task"
    fields.setdefault("commit_sha", "abc123")
    if status == Task.Status.DONE:
        supervisor_complete(task)
    finish(task, status, **fields)
    return reload(step_)


def evaluate(step_: Step, result: dict[str, Any] | str | None, status: str = Task.Status.DONE) -> Step:
    """The step's evaluator writes ``evaluation-result`` (unless None) and ends."""
    step_ = reload(step_)
    task = step_.monitoring_task
    assert task is not None, f"step '{step_.name}' has no monitoring task"
    if result is not None:
        write_file(task.contract, "evaluation-result", result if isinstance(result, str) else json.dumps(result))
    if status == Task.Status.DONE:
        supervisor_complete(task)
    finish(task, status)
    return reload(step_)


def verdict(score: float, *, passed: bool = True, level: str | None = None, **extra: Any) -> dict[str, Any]:
    if level is None:
        level = "green" if score >= 0.8 else "yellow" if score >= 0.5 else "red"
    return {
        "passed": passed,
        "overallScore": score,
        "confidenceLevel": level,
        "criteriaResults": [{"criterion": "AC1", "passed": passed, "score": score, "evidence": "looked at it"}],
        "summaryFeedback": "Summary.",
        "reworkInstructions": extra.pop("rework", "Fix the edge cases."),
        **extra,
    }


def pass_step(step_: Step, score: float = 0.95) -> Step:
    """Run a step and have its evaluation come back green."""
    step_ = run(step_)
    if step_.status == Step.Status.EVALUATING:
        step_ = evaluate(step_, verdict(score))
    assert step_.status == Step.Status.PASSED, step_.status
    return step_
