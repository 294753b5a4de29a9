"""Reconcile: lost daemons, task leases, stale approvals (spec 1, 4.3, protocol
"Liveness and delivery")."""

from __future__ import annotations

from datetime import timedelta

import pytest
import time_machine
from django.test import override_settings
from django.utils import timezone

from contracts.models import Task
from daemons.models import Daemon
from directives.lifecycle import reconcile, tick
from directives.models import ApprovalRequest, Directive, Step
from directives.services import directive_start
from makima.state import Actor
from tests.factories import make_directive, make_steps
from tests.orchestrator.helpers import (
    evaluate,
    go,
    online,
    planned,
    reload,
    run,
    spawn_commands,
    step,
    step_named,
    submit_plan,
    verdict,
)

T0 = timezone.now().replace(microsecond=0)


def at(seconds: float):
    return time_machine.travel(T0 + timedelta(seconds=seconds), tick=False)


def running_on(owner, daemon_name="lost"):
    """A directive whose step A runs on a daemon last heard at T0."""
    with at(0):
        daemon = online(owner, daemon_name)
        directive = make_directive(owner, agent="scripted")
        make_steps(directive, {"name": "A"})
        directive_start(directive=directive, actor=Actor.for_user(owner))
        go(directive)
    task = step_named(directive, "A").execution_task
    assert task.daemon_id == daemon.pk
    return daemon, directive, task


@override_settings(MAKIMA_HEARTBEAT_INTERVAL_S=10)
def test_a_connected_daemon_silent_for_three_heartbeats_is_disconnected(alice):
    daemon, _, task = running_on(alice)

    with at(29):
        reconcile()
    assert reload(daemon).status == Daemon.Status.CONNECTED

    with at(31):
        stats = reconcile()
    assert stats["daemons_lost"] == 1
    assert reload(daemon).status == Daemon.Status.DISCONNECTED
    assert reload(task).status == Task.Status.STARTING  # its lease has not run out


@override_settings(MAKIMA_HEARTBEAT_INTERVAL_S=10, MAKIMA_TASK_LEASE_S=60)
def test_a_lost_daemons_tasks_are_interrupted_only_when_the_lease_ran_out_then_retried(alice):
    _daemon, directive, task = running_on(alice)
    with at(31):
        reconcile()
    with at(31 + 59):
        online(alice, "spare", last_seen_at=timezone.now())
        assert reconcile().get("interrupted", 0) == 0
    assert reload(task).status == Task.Status.STARTING

    with at(31 + 61):
        stats = reconcile()

    assert stats["interrupted"] == 1
    task = reload(task)
    assert task.attempt == 2
    assert task.status == Task.Status.STARTING  # retried on the spare daemon
    assert task.daemon.name == "spare"
    assert len(spawn_commands(task)) == 2
    assert step_named(directive, "A").status == Step.Status.RUNNING


@override_settings(MAKIMA_HEARTBEAT_INTERVAL_S=10, MAKIMA_TASK_LEASE_S=300)
def test_the_lease_follows_makima_task_lease_s(alice):
    _, _, task = running_on(alice)
    with at(31):
        reconcile()
    with at(31 + 299):
        reconcile()
    assert reload(task).status == Task.Status.STARTING
    with at(31 + 301):
        reconcile()
    assert reload(task).status == Task.Status.PENDING  # interrupted, retried, waiting for a daemon
    assert reload(task).attempt == 2


@override_settings(MAKIMA_HEARTBEAT_INTERVAL_S=10, MAKIMA_TASK_LEASE_S=60)
def test_a_daemon_that_reconnects_within_the_lease_keeps_its_tasks(alice):
    daemon, _, task = running_on(alice)
    with at(31):
        reconcile()
    with at(50):
        Daemon.objects.filter(pk=daemon.pk).update(status=Daemon.Status.CONNECTED, last_seen_at=timezone.now())
    with at(200):
        Daemon.objects.filter(pk=daemon.pk).update(last_seen_at=timezone.now())
        reconcile()

    assert reload(task).status == Task.Status.STARTING
    assert reload(task).daemon_id == daemon.pk


@override_settings(MAKIMA_MAX_TASK_ATTEMPTS=1, MAKIMA_HEARTBEAT_INTERVAL_S=10, MAKIMA_TASK_LEASE_S=60)
def test_a_task_lost_with_no_attempts_left_fails_its_step(alice):
    _, directive, task = running_on(alice)
    with at(31):
        reconcile()
    with at(100):
        reconcile()

    assert reload(task).status == Task.Status.INTERRUPTED
    assert step_named(directive, "A").status == Step.Status.FAILED
    assert reload(directive).status == Directive.Status.PAUSED


def test_a_task_whose_daemon_is_gone_is_interrupted_at_once(alice):
    daemon, _, task = running_on(alice)
    Daemon.objects.filter(pk=daemon.pk).delete()

    reconcile()

    assert reload(task).attempt == 2
    assert reload(task).status == Task.Status.PENDING


def test_the_tick_reconciles_then_advances(alice):
    _daemon, _directive, task = running_on(alice)
    with at(31):
        tick()
    with at(95):
        online(alice, "spare", last_seen_at=timezone.now())
        stats = tick()

    assert stats["interrupted"] == 1
    assert reload(task).daemon.name == "spare"


# --------------------------------------------------------------------------- approvals


def test_an_expired_step_approval_is_closed_and_the_step_reworked(alice):
    online(alice)
    directive = planned(alice, step("A"), evaluation_mode="agent", autonomy_level="guided")
    a = evaluate(run(step_named(directive, "A")), verdict(0.6))
    approval = ApprovalRequest.objects.get(step=a)
    ApprovalRequest.objects.filter(pk=approval.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    stats = tick()

    assert stats["approvals_expired"] == 1
    assert reload(approval).status == ApprovalRequest.Status.EXPIRED
    a = reload(a)
    assert a.rework_count == 1
    assert "expired" in a.rework_instructions
    assert a.status == Step.Status.RUNNING


def test_an_approval_that_has_not_expired_is_left_alone(alice):
    online(alice)
    directive = planned(alice, step("A"), evaluation_mode="agent", autonomy_level="guided")
    a = evaluate(run(step_named(directive, "A")), verdict(0.6))
    ApprovalRequest.objects.filter(step=a).update(expires_at=timezone.now() + timedelta(hours=1))

    assert reconcile().get("approvals_expired", 0) == 0
    assert reload(a).status == Step.Status.AWAITING_APPROVAL


def test_an_expired_plan_review_plans_again(alice):
    online(alice)
    directive = make_directive(alice, agent="scripted", require_plan_approval=True)
    directive_start(directive=directive, actor=Actor.for_user(alice))
    go(directive)
    directive = submit_plan(directive, step("A"))
    approval = ApprovalRequest.objects.get(directive=directive, kind="plan_review")
    ApprovalRequest.objects.filter(pk=approval.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    tick()

    directive = reload(directive)
    assert reload(approval).status == ApprovalRequest.Status.EXPIRED
    assert directive.status == Directive.Status.PLANNING
    assert step_named(directive, "A").status == Step.Status.SKIPPED
    assert "expired" in directive.orchestrator_task.plan


@pytest.mark.parametrize("count", [1, 3])
def test_reconcile_is_idempotent(alice, count):
    _, _, task = running_on(alice)
    with at(31):
        for _ in range(count):
            reconcile()
    with at(100):
        for _ in range(count):
            reconcile()

    assert reload(task).attempt == 2
