"""Bad input and access tests: schemathesis over the REST API, websocket
fuzzing, the access matrix, hostile agent data and the configurable limits.

:func:`make_world` builds one small world of every kind of object, shared by
the modules of this package: alice's directive (shared with the "platform"
team, so carol sees it) with steps, a chain, an evaluation, an approval,
events, a contract with a file, a task with output and a live task token,
an order, a daemon and a spare token to revoke; a second directive of
alice's (for task-token scope) and bob's directive (a stranger's), and the
bearer tokens of every subject. :func:`security_stack` runs a real server on
a database of this package's own; :func:`replies_until_handled` reads a daemon
socket's answers without guessing how long the server takes.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth.models import Group, User
from django.utils import timezone

from contracts.models import Contract, ContractFile, Task
from contracts.services import contract_file_create, task_output_append
from daemons.models import ApiToken, Daemon
from daemons.services import token_revoke
from directives.models import ApprovalRequest, Chain, Directive, Evaluation, Order, Step
from makima.state import SYSTEM
from tests.e2e.stack import Stack, database_url, running_stack
from tests.factories import (
    make_approval,
    make_contract,
    make_daemon,
    make_directive,
    make_evaluation,
    make_order,
    make_steps,
    make_task,
    make_token,
    make_user,
)


@dataclass
class Unit:
    """One directive with one of everything hanging off it."""

    directive: Directive
    steps: list[Step]
    chain: Chain
    evaluation: Evaluation
    approval: ApprovalRequest
    contract: Contract
    file: ContractFile
    task: Task
    order: Order
    daemon: Daemon


@dataclass
class World:
    alice: User
    bob: User
    carol: User
    root: User
    team: Group
    mine: Unit  # alice's, shared with the team
    sibling: Unit  # alice's too, another directive (outside the task token's scope)
    bobs: Unit
    keys: dict[str, str] = field(default_factory=dict)  # subject → plain bearer token
    spare_token: ApiToken | None = None  # a token of alice's that tests may revoke


def make_unit(owner: User, *, title: str, team: Group | None = None, daemon_name: str = "box") -> Unit:
    directive = make_directive(owner, title=title, team=team)
    steps = make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]})
    steps = list(Step.objects.filter(pk__in=[s.pk for s in steps]).order_by("created_at"))
    evaluation = make_evaluation(steps[0], summary_feedback="fine")
    approval = make_approval(steps[0])
    contract = make_contract(directive, step=steps[0])
    file = contract_file_create(contract=contract, name="chain-plan", content='{"steps": []}')
    task = make_task(directive, step=steps[0], contract=contract, status=Task.Status.RUNNING)
    task_output_append(task=task, items=[{"seq": 1, "stream": "stdout", "content": "hello"}])
    order = make_order(owner, title=f"Order of {title}")
    daemon = make_daemon(owner, name=daemon_name)
    directive.refresh_from_db()
    chain = Chain.objects.get(pk=directive.current_chain_id) if directive.current_chain_id else steps[0].chain
    return Unit(
        directive=directive,
        steps=steps,
        chain=chain,
        evaluation=evaluation,
        approval=approval,
        contract=contract,
        file=file,
        task=task,
        order=order,
        daemon=daemon,
    )


def make_world() -> World:
    alice = make_user("alice")
    bob = make_user("bob")
    carol = make_user("carol")
    root = make_user("root", is_staff=True, is_superuser=True)
    team = Group.objects.create(name="platform")
    alice.groups.add(team)
    carol.groups.add(team)
    world = World(
        alice=alice,
        bob=bob,
        carol=carol,
        root=root,
        team=team,
        mine=make_unit(alice, title="Alice's directive", team=team, daemon_name="alice-box"),
        sibling=make_unit(alice, title="Alice's other directive", daemon_name="alice-box-2"),
        bobs=make_unit(bob, title="Bob's directive", daemon_name="bob-box"),
    )
    world.keys["alice_key"] = make_token(alice, name="alice key").plain
    world.keys["carol_key"] = make_token(carol, name="carol key").plain
    world.keys["bob_key"] = make_token(bob, name="bob key").plain
    world.keys["root_key"] = make_token(root, name="root key").plain
    world.keys["alice_daemon"] = make_token(alice, kind=ApiToken.Kind.DAEMON, name="alice daemon").plain
    world.keys["task_token"] = make_token(alice, kind=ApiToken.Kind.TASK, task=world.mine.task).plain
    world.keys["expired_key"] = make_token(alice, name="expired", expires_at=timezone.now()).plain
    revoked = make_token(alice, name="revoked")
    token_revoke(token=revoked.token, actor=SYSTEM)
    world.keys["revoked_key"] = revoked.plain
    world.spare_token = make_token(alice, name="spare").token
    return world


@contextlib.contextmanager
def security_stack(extra_env: dict[str, str]) -> Iterator[Stack]:
    """A real server (``running_stack``) on a database of this package's own
    (``makima_h6d_…`` on PostgreSQL, dropped afterwards)."""
    with database_url("makima_h6d_") as url, running_stack(extra_env=extra_env, database=url) as stack:
        yield stack


async def replies_until_handled(socket: Any, *, timeout: float = 10) -> list[dict[str, Any]]:
    """Everything the daemon socket answered to what was sent before this call.

    A socket handles its frames in order, so a sentinel frame of an unknown
    type is answered (``unknown_type``, or ``rate_limited``, with its ``ref``)
    only after everything before it: no guessing how long the server takes."""
    marker = f"sync-{uuid.uuid4().hex}"
    await socket.send_json_to({"type": "makima_test_sync", "id": marker})
    replies = []
    while True:
        reply = await socket.receive_json_from(timeout=timeout)
        if reply.get("ref") == marker:
            return replies
        replies.append(reply)
