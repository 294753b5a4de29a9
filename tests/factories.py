"""Named actors and small factories shared by every test.

alice owns things, bob is a stranger, carol is in alice's team, root is staff.
Factories create rows through the services where a service exists, so tests
see the same rows production code would make.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group, User
from django.utils import timezone

from contracts.models import Contract, Task
from contracts.services import contract_create
from daemons.models import ApiToken, Daemon, DaemonCommand
from daemons.services import NewToken, command_enqueue, token_create
from directives.models import ApprovalRequest, Chain, Directive, Order, Step, StepDependency
from directives.services import (
    StepSpec,
    approval_request,
    directive_create,
    evaluation_record,
    order_create,
    steps_add,
)
from makima.state import SYSTEM

PASSWORD = "correct horse battery staple"


def make_user(username: str, **fields: Any) -> User:
    return User.objects.create_user(username=username, password=PASSWORD, email=f"{username}@example.com", **fields)


def make_team(name: str, *members: User) -> Group:
    team = Group.objects.create(name=name)
    for member in members:
        member.groups.add(team)
    return team


def make_directive(owner: User, **fields: Any) -> Directive:
    values: dict[str, Any] = {
        "title": "Add a health endpoint",
        "goal": "Expose /healthz returning 200 when the service is up.",
        "acceptance_criteria": ["GET /healthz answers 200"],
        "repository_url": "/srv/repos/demo.git",
    }
    values.update(fields)
    return directive_create(owner=owner, **values)


def make_steps(directive: Directive, *specs: dict[str, Any]) -> list[Step]:
    """``make_steps(d, {"name": "A"}, {"name": "B", "depends_on": ["A"]})``."""
    return steps_add(directive=directive, specs=[StepSpec(**spec) for spec in specs], actor=SYSTEM)


def make_contract(directive: Directive | None, owner: User | None = None, **fields: Any) -> Contract:
    values: dict[str, Any] = {"name": "Execution", "contract_type": Contract.ContractType.EXECUTION}
    values.update(fields)
    return contract_create(owner=owner or directive.owner, directive=directive, **values)


def make_task(
    directive: Directive | None = None, *, owner: User | None = None, step: Step | None = None, **fields: Any
) -> Task:
    owner = owner or directive.owner
    values: dict[str, Any] = {
        "name": step.name if step else "Plan the directive",
        "kind": Task.Kind.EXECUTION if step else Task.Kind.PLANNING,
        "agent": "scripted",
        "plan": "Do the work.",
    }
    values.update(fields)
    return Task.objects.create(owner=owner, directive=directive, step=step, **values)


def make_daemon(owner: User, name: str = "build-box-1", **fields: Any) -> Daemon:
    values: dict[str, Any] = {"hostname": name, "max_concurrent_tasks": 2, "capabilities": ["scripted"]}
    values.update(fields)
    return Daemon.objects.create(owner=owner, name=name, **values)


def make_command(daemon: Daemon, task: Task | None = None) -> DaemonCommand:
    return command_enqueue(
        daemon_id=daemon.pk,
        owner_id=daemon.owner_id,
        task=task,
        command_type=DaemonCommand.CommandType.SPAWN_TASK,
        payload={"task": {"id": str(task.pk) if task else None}},
    )


def make_token(owner: User, kind: str = ApiToken.Kind.USER, **fields: Any) -> NewToken:
    return token_create(owner=owner, kind=kind, name=fields.pop("name", f"{owner.username}'s key"), **fields)


def make_order(owner: User, **fields: Any) -> Order:
    values: dict[str, Any] = {"title": "Fix the login redirect", "priority": Order.Priority.HIGH}
    values.update(fields)
    return order_create(owner=owner, **values)


def make_evaluation(step: Step, **fields: Any):
    values: dict[str, Any] = {"kind": "agent", "passed": True, "overall_score": 0.9}
    values.update(fields)
    return evaluation_record(step=step, **values)


def make_approval(step: Step, **fields: Any) -> ApprovalRequest:
    values: dict[str, Any] = {"kind": ApprovalRequest.Kind.STEP_REVIEW, "description": "Review the step"}
    values.update(fields)
    return approval_request(directive=step.directive, step=step, **values)


def make_steady_directives(owner: User, daemon: Daemon, count: int, *, steps: int = 2) -> list[Directive]:
    """``count`` active directives, each a linear chain of ``steps`` steps whose
    first one runs on ``daemon`` and the rest wait: a tick has nothing to do.
    Written with bulk inserts so that benchmarks can make thousands."""
    now = timezone.now()
    directives = Directive.objects.bulk_create(
        [
            Directive(
                owner=owner, title=f"D{i}", goal="g", status=Directive.Status.ACTIVE, agent="scripted", started_at=now
            )
            for i in range(count)
        ]
    )
    chains = Chain.objects.bulk_create(
        [Chain(owner=owner, directive=d, generation=1, name=f"C{d.title}") for d in directives]
    )
    for directive, chain in zip(directives, chains, strict=True):
        directive.current_chain = chain
    Directive.objects.bulk_update(directives, ["current_chain"])
    rows = [
        Step(
            owner=owner,
            directive=d,
            chain=c,
            name=f"S{n}",
            order_index=0,
            generation=1,
            status=Step.Status.RUNNING if n == 0 else Step.Status.PENDING,
        )
        for d, c in zip(directives, chains, strict=True)
        for n in range(steps)
    ]
    Step.objects.bulk_create(rows)
    StepDependency.objects.bulk_create(
        [StepDependency(step=rows[i], depends_on=rows[i - 1], position=0) for i in range(len(rows)) if i % steps != 0]
    )
    firsts = rows[::steps]
    tasks = Task.objects.bulk_create(
        [
            Task(
                owner=owner,
                name=s.name,
                kind=Task.Kind.EXECUTION,
                agent="scripted",
                plan="p",
                status=Task.Status.RUNNING,
                daemon=daemon,
                directive=s.directive,
                step=s,
            )
            for s in firsts
        ]
    )
    for step, task in zip(firsts, tasks, strict=True):
        step.execution_task = task
    Step.objects.bulk_update(firsts, ["execution_task"])
    return directives
