"""Every status field, every (from, to) pair: allowed moves go through the
model's transition service and write one event; forbidden ones change nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import models
from django.db.models import F

from contracts.models import Contract, Task
from contracts.services import contract_transition, task_transition
from daemons.models import ApiToken, Daemon, DaemonCommand
from daemons.services import command_transition, daemon_transition, token_authenticate
from directives.models import ApprovalRequest, Chain, Directive, DirectiveEvent, Order, Step
from directives.services import (
    approval_transition,
    chain_create,
    chain_transition,
    directive_transition,
    order_transition,
    step_transition,
)
from makima.state import InvalidTransition, Transitions, cas_transition
from tests.factories import (
    make_approval,
    make_command,
    make_contract,
    make_daemon,
    make_directive,
    make_order,
    make_steps,
    make_task,
    make_token,
)


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # Every test makes alice; the default PBKDF2 hasher would dominate the run time.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@dataclass(frozen=True)
class Subject:
    """One status field: how to make a row and how to move it."""

    name: str
    model: type[models.Model]
    make: Callable[[Any], models.Model]
    move: Callable[[models.Model, str], bool]

    @property
    def transitions(self) -> Transitions:
        return self.model.TRANSITIONS


def _step(owner: Any) -> Step:
    return make_steps(make_directive(owner), {"name": "Build it"})[0]


SUBJECTS = {
    "directive": Subject(
        "directive", Directive, make_directive, lambda row, to: directive_transition(directive=row, to=to)
    ),
    "chain": Subject(
        "chain",
        Chain,
        lambda owner: chain_create(directive=make_directive(owner)),
        lambda row, to: chain_transition(chain=row, to=to),
    ),
    "step": Subject("step", Step, _step, lambda row, to: step_transition(step=row, to=to)),
    "approval": Subject(
        "approval",
        ApprovalRequest,
        lambda owner: make_approval(_step(owner)),
        lambda row, to: approval_transition(approval=row, to=to),
    ),
    "order": Subject("order", Order, make_order, lambda row, to: order_transition(order=row, to=to)),
    "contract": Subject(
        "contract",
        Contract,
        lambda owner: make_contract(make_directive(owner)),
        lambda row, to: contract_transition(contract=row, to=to),
    ),
    "task": Subject(
        "task", Task, lambda owner: make_task(make_directive(owner)), lambda row, to: task_transition(task=row, to=to)
    ),
    "daemon": Subject("daemon", Daemon, make_daemon, lambda row, to: daemon_transition(daemon=row, to=to)),
    "command": Subject(
        "command",
        DaemonCommand,
        lambda owner: make_command(make_daemon(owner)),
        lambda row, to: command_transition(command=row, to=to),
    ),
}


def _pairs(kind: str) -> list[Any]:
    subject = SUBJECTS[kind]
    values = subject.model.Status.values
    pairs = []
    for source in values:
        for target in values:
            if source == target:
                outcome = "same"
            elif subject.transitions.allows(source, target):
                outcome = "allowed"
            else:
                outcome = "forbidden"
            pairs.append(pytest.param(kind, source, target, id=f"{kind}:{source}->{target}:{outcome}"))
    return pairs


ALL_PAIRS = [pair for kind in SUBJECTS for pair in _pairs(kind)]


def _prepare(subject: Subject, owner: Any, status: str) -> models.Model:
    """A row of ``subject`` sitting in ``status`` (set behind the services' back)."""
    row = subject.make(owner)
    subject.model.objects.filter(pk=row.pk).update(status=status)
    row.refresh_from_db()
    return row


def _status_in_db(row: models.Model) -> str:
    return type(row).objects.values_list("status", flat=True).get(pk=row.pk)


@pytest.mark.parametrize("kind", list(SUBJECTS))
def test_every_status_has_a_row_in_the_transitions_table_and_only_names_real_statuses(kind):
    subject = SUBJECTS[kind]
    values = set(subject.model.Status.values)
    assert set(subject.transitions.table) == values
    for source, targets in subject.transitions.table.items():
        assert targets <= values, f"{kind}: {source} names unknown targets {targets - values}"
        assert source not in targets, f"{kind}: {source} lists itself as a transition"


@pytest.mark.parametrize(("kind", "source", "target"), ALL_PAIRS)
def test_each_status_pair_is_allowed_refused_or_a_no_op_as_the_table_says(alice, kind, source, target):
    subject = SUBJECTS[kind]
    row = _prepare(subject, alice, source)
    events_before = DirectiveEvent.objects.count()
    newest_before = DirectiveEvent.objects.order_by("-id").values_list("id", flat=True).first() or 0

    if source == target:
        assert subject.move(row, target) is False
        assert _status_in_db(row) == source
        assert DirectiveEvent.objects.count() == events_before
    elif subject.transitions.allows(source, target):
        assert subject.move(row, target) is True
        assert row.status == target
        assert _status_in_db(row) == target
        new_events = list(DirectiveEvent.objects.filter(id__gt=newest_before))
        assert len(new_events) == 1
        [event] = new_events
        assert event.event_type == f"{kind}_{target}"
        assert event.subject_type == kind
        assert event.subject_id == str(row.pk)
        assert event.data["from"] == source
        assert event.data["to"] == target
    else:
        with pytest.raises(InvalidTransition) as excinfo:
            subject.move(row, target)
        assert (excinfo.value.subject, excinfo.value.current, excinfo.value.target) == (kind, source, target)
        assert f"'{source}'" in str(excinfo.value) and f"'{target}'" in str(excinfo.value)
        assert _status_in_db(row) == source
        assert row.status == source
        assert DirectiveEvent.objects.count() == events_before


def test_an_invalid_transition_is_a_conflict_for_the_api():
    error = InvalidTransition("step", "passed", "running")
    assert error.status_code == 409
    assert str(error) == "step cannot go from 'passed' to 'running'"


# --------------------------------------------------------------------------- rows that moved concurrently


@pytest.fixture
def ready_step(alice) -> Step:
    step = _step(alice)
    Step.objects.filter(pk=step.pk).update(status=Step.Status.READY)
    step.refresh_from_db()
    return step


def test_it_refuses_a_move_that_the_concurrently_reached_state_does_not_allow(ready_step):
    # Another worker started the step after we loaded it; skipping is allowed
    # from ready but not from running.
    Step.objects.filter(pk=ready_step.pk).update(status=Step.Status.RUNNING)
    events_before = DirectiveEvent.objects.count()

    with pytest.raises(InvalidTransition) as excinfo:
        step_transition(step=ready_step, to=Step.Status.SKIPPED)

    assert excinfo.value.current == Step.Status.RUNNING
    assert "changed concurrently" in str(excinfo.value)
    assert ready_step.status == Step.Status.RUNNING
    assert _status_in_db(ready_step) == Step.Status.RUNNING
    assert DirectiveEvent.objects.count() == events_before


def test_it_returns_false_when_another_worker_already_made_the_same_move(ready_step):
    Step.objects.filter(pk=ready_step.pk).update(status=Step.Status.RUNNING)
    events_before = DirectiveEvent.objects.count()

    assert step_transition(step=ready_step, to=Step.Status.RUNNING) is False

    assert ready_step.status == Step.Status.RUNNING
    assert DirectiveEvent.objects.count() == events_before


def test_it_follows_the_table_from_the_concurrently_reached_state(ready_step):
    # Loaded as ready, moved to running behind our back: running → evaluating is
    # not allowed from ready, and the CAS must not pretend the row is still ready.
    Step.objects.filter(pk=ready_step.pk).update(status=Step.Status.RUNNING)

    with pytest.raises(InvalidTransition):
        step_transition(step=ready_step, to=Step.Status.EVALUATING)

    assert _status_in_db(ready_step) == Step.Status.RUNNING


def test_cas_transition_checks_the_expected_state_instead_of_the_instance(ready_step):
    stale = Step.objects.get(pk=ready_step.pk)
    stale.status = Step.Status.PENDING

    assert cas_transition(
        stale, to=Step.Status.RUNNING, transitions=Step.TRANSITIONS, subject="step", expected=Step.Status.READY
    )
    assert _status_in_db(ready_step) == Step.Status.RUNNING


def test_cas_transition_applies_expression_updates_and_reloads_them(alice):
    task = make_task(make_directive(alice))
    daemon = make_daemon(alice)

    assert cas_transition(
        task,
        to=Task.Status.STARTING,
        transitions=Task.TRANSITIONS,
        subject="task",
        updates={"version": F("version") + 1, "daemon": daemon},
    )

    assert task.version == 1
    task.refresh_from_db()
    assert (task.status, task.version, task.daemon_id) == (Task.Status.STARTING, 1, daemon.pk)


def test_cas_transition_of_a_deleted_row_says_it_no_longer_exists(ready_step):
    Step.objects.filter(pk=ready_step.pk).delete()

    with pytest.raises(Step.DoesNotExist):
        cas_transition(ready_step, to=Step.Status.RUNNING, transitions=Step.TRANSITIONS, subject="step")


# --------------------------------------------------------------------------- task tokens


def _task_on_daemon(owner: Any) -> Task:
    task = make_task(make_directive(owner))
    Task.objects.filter(pk=task.pk).update(status=Task.Status.RUNNING)
    task.refresh_from_db()
    return task


@pytest.mark.parametrize("terminal", sorted(Task.FINISHED))
def test_a_task_that_ends_revokes_its_task_tokens(alice, terminal):
    task = _task_on_daemon(alice)
    new = make_token(alice, ApiToken.Kind.TASK, task=task)
    other = make_token(alice, ApiToken.Kind.TASK, task=_task_on_daemon(alice))
    assert token_authenticate(new.plain) is not None

    assert task_transition(task=task, to=terminal) is True

    new.token.refresh_from_db()
    assert new.token.revoked_at is not None
    assert token_authenticate(new.plain) is None
    # Only the ending task's tokens go.
    other.token.refresh_from_db()
    assert other.token.revoked_at is None


def test_a_task_that_keeps_going_keeps_its_task_tokens(alice):
    task = _task_on_daemon(alice)
    new = make_token(alice, ApiToken.Kind.TASK, task=task)

    task_transition(task=task, to=Task.Status.PAUSED)

    new.token.refresh_from_db()
    assert new.token.revoked_at is None
    assert token_authenticate(new.plain) is not None


def test_a_refused_task_transition_does_not_revoke_its_tokens(alice):
    task = make_task(make_directive(alice))
    new = make_token(alice, ApiToken.Kind.TASK, task=task)

    with pytest.raises(InvalidTransition):
        task_transition(task=task, to=Task.Status.DONE)

    new.token.refresh_from_db()
    assert new.token.revoked_at is None


def test_a_claim_with_an_expected_state_lost_to_another_worker_returns_false(ready_step):
    # Another worker moved the step on; a claim "from ready" quietly loses.
    Step.objects.filter(pk=ready_step.pk).update(status=Step.Status.RUNNING)
    events_before = DirectiveEvent.objects.count()

    assert step_transition(step=ready_step, to=Step.Status.SKIPPED, expected=Step.Status.READY) is False

    assert _status_in_db(ready_step) == Step.Status.RUNNING
    assert DirectiveEvent.objects.count() == events_before


def test_a_claim_still_refuses_a_move_the_table_forbids(ready_step):
    with pytest.raises(InvalidTransition):
        step_transition(step=ready_step, to=Step.Status.PASSED, expected=Step.Status.READY)
