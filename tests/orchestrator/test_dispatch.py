"""Dispatch to daemons, the execution prompt, worktree continuation, branch
names, and what happens when an execution task fails or is interrupted (spec 4.2, 4.3)."""

from __future__ import annotations

import re

import pytest
from django.conf import settings
from django.test import override_settings

from contracts.models import Contract, Task
from contracts.services import task_dispatch_pending
from daemons.models import Daemon, DaemonCommand
from directives.lifecycle import advance, directive_branch
from directives.models import Directive, DirectiveEvent, Step
from directives.services import directive_record_pr, directive_start, step_skip
from makima.state import SYSTEM, Actor
from tests.factories import make_directive, make_steps
from tests.orchestrator.helpers import (
    evaluate,
    events,
    finish,
    go,
    online,
    pass_step,
    planned,
    reload,
    run,
    spawn_commands,
    step,
    step_named,
    verdict,
)

BRANCH = re.compile(r"^makima/[a-z0-9-]+-[0-9a-f]{8}$")


def hand_authored(owner, *specs, **fields):
    """A draft with hand-authored steps, started (active at once)."""
    fields.setdefault("agent", "scripted")
    directive = make_directive(owner, **fields)
    make_steps(directive, *specs)
    directive_start(directive=directive, actor=Actor.for_user(owner))
    go(directive)
    return reload(directive)


# --------------------------------------------------------------------------- choosing a daemon


def test_dispatch_picks_a_connected_daemon_of_the_owner_that_runs_the_agent_and_has_room(alice, bob):
    online(bob, "bobs-box")  # another owner's
    online(alice, "asleep", status=Daemon.Status.DISCONNECTED)
    online(alice, "draining", status=Daemon.Status.DRAINING)
    online(alice, "claude-only", capabilities=["claude"])
    online(alice, "full", max_concurrent_tasks=0)
    right = online(alice, "right", capabilities=["scripted"], max_concurrent_tasks=1)

    directive = hand_authored(alice, {"name": "A"})

    task = step_named(directive, "A").execution_task
    assert (task.status, task.daemon_id) == (Task.Status.STARTING, right.pk)
    [command] = spawn_commands(task)
    assert (command.daemon_id, command.status) == (right.pk, DaemonCommand.Status.QUEUED)


def test_dispatch_sends_work_to_the_least_loaded_daemon_first(alice):
    busy = online(alice, "busy", max_concurrent_tasks=2)
    idle = online(alice, "idle", max_concurrent_tasks=2)
    other = make_directive(alice, agent="scripted")
    Task.objects.create(
        owner=alice,
        directive=other,
        name="x",
        kind="planning",
        agent="scripted",
        plan="p",
        status="running",
        daemon=busy,
    )

    directive = hand_authored(alice, {"name": "A"}, {"name": "B"}, {"name": "C"})

    daemons = [step_named(directive, n).execution_task.daemon_id for n in "ABC"]
    assert sorted(daemons, key=str) == sorted([idle.pk, idle.pk, busy.pk], key=str)
    assert daemons[0] == idle.pk
    # busy: 1 + 1 = 2, idle: 2 — both full now.
    assert Task.objects.filter(daemon=busy, status__in=Task.ON_DAEMON).count() == 2


def test_the_directives_agent_decides_which_daemons_may_take_its_tasks(alice):
    online(alice, "scripted-only", capabilities=["scripted"])
    directive = hand_authored(alice, {"name": "A"}, agent="claude")

    task = step_named(directive, "A").execution_task
    assert (task.agent, task.status) == ("claude", Task.Status.PENDING)

    claude = online(alice, "claude-box", capabilities=["claude"])
    go(directive)
    assert reload(task).daemon_id == claude.pk


def test_a_steps_agent_overrides_the_directives(alice):
    online(alice, capabilities=["scripted", "claude"])
    directive = hand_authored(alice, {"name": "A", "agent": "claude"}, {"name": "B"})

    assert step_named(directive, "A").execution_task.agent == "claude"
    assert step_named(directive, "B").execution_task.agent == "scripted"


def test_without_a_daemon_the_task_stays_pending_and_the_step_ready_until_one_connects(alice):
    directive = hand_authored(alice, {"name": "A"})
    a = step_named(directive, "A")
    task = a.execution_task

    assert a.status == Step.Status.READY
    assert task.status == Task.Status.PENDING
    assert spawn_commands() == []

    daemon = online(alice)
    [dispatched] = task_dispatch_pending(owner_ids=[alice.pk])

    assert dispatched.pk == task.pk
    assert (reload(task).status, reload(task).daemon_id) == (Task.Status.STARTING, daemon.pk)
    assert reload(a).status == Step.Status.RUNNING
    assert len(spawn_commands(task)) == 1


def test_a_task_waiting_for_capacity_goes_out_when_another_task_frees_it(alice):
    online(alice, max_concurrent_tasks=1)
    directive = hand_authored(alice, {"name": "A"})
    other = hand_authored(alice, {"name": "B"})
    b = step_named(other, "B")
    assert b.execution_task.status == Task.Status.PENDING

    run(step_named(directive, "A"), Task.Status.FAILED, error="boom")

    assert reload(b).status == Step.Status.RUNNING
    assert reload(b.execution_task).status == Task.Status.STARTING


def test_a_step_becomes_running_only_when_its_task_was_dispatched(alice):
    directive = hand_authored(alice, {"name": "A"})
    a = step_named(directive, "A")
    assert a.status == Step.Status.READY
    assert events(directive, "step_running") == []

    online(alice)
    advance()

    assert reload(a).status == Step.Status.RUNNING
    [running] = events(directive, "step_running")
    assert running.data["task"] == str(a.execution_task_id)


def test_no_step_is_dispatched_twice_when_advance_runs_twice(alice):
    online(alice)
    directive = hand_authored(alice, {"name": "A"}, {"name": "B"})
    go(directive)
    advance()
    go(directive)

    assert Task.objects.filter(directive=directive, kind=Task.Kind.EXECUTION).count() == 2
    assert len(spawn_commands()) == 2


def test_the_spawn_command_follows_the_protocol(alice):
    online(alice)
    directive = hand_authored(alice, {"name": "A"}, verifiers=["pytest -q"])
    a = step_named(directive, "A")
    task = a.execution_task
    [command] = spawn_commands(task)
    payload = command.payload["task"]

    assert payload["id"] == str(task.pk)
    assert (payload["kind"], payload["agent"], payload["plan"]) == ("execution", "scripted", task.plan)
    assert payload["repository_url"] == directive.repository_url
    assert payload["local_path"] is None
    assert (payload["base_branch"], payload["branch"]) == ("main", task.branch)
    assert payload["continue_from"] is None
    assert payload["merge_branches"] == []
    assert payload["completion_action"] == "branch"
    assert payload["verifiers"] == ["pytest -q"]
    assert payload["timeout_s"] == task.timeout_s
    env = payload["env"]
    assert env["MAKIMA_URL"] == settings.MAKIMA_PUBLIC_URL
    assert env["MAKIMA_API_KEY"].startswith("mk_t_")
    assert env["MAKIMA_TASK_ID"] == str(task.pk)
    assert env["MAKIMA_DIRECTIVE_ID"] == str(directive.pk)
    assert env["MAKIMA_CONTRACT_ID"] == str(a.execution_contract_id)
    assert env["MAKIMA_STEP_ID"] == str(a.pk)


def test_each_step_gets_its_own_execution_contract(alice):
    online(alice)
    directive = hand_authored(alice, {"name": "A"})
    a = step_named(directive, "A")
    contract = a.execution_contract

    assert contract.contract_type == Contract.ContractType.EXECUTION
    assert (contract.step_id, contract.directive_id) == (a.pk, directive.pk)
    assert a.execution_task.contract_id == contract.pk
    assert contract.repositories.get().url == directive.repository_url


@pytest.mark.parametrize(
    ("step_verifiers", "directive_verifiers", "mode", "expected"),
    [
        (["make check"], ["pytest"], "both", ["make check"]),
        (None, ["pytest"], "verifiers", ["pytest"]),
        (None, [], "both", "auto"),
        (None, "auto", "both", "auto"),
        (None, ["pytest"], "agent", []),
        (None, ["pytest"], "off", []),
    ],
)
def test_the_verifiers_are_the_steps_else_the_directives_else_auto_detected(
    alice, step_verifiers, directive_verifiers, mode, expected
):
    online(alice)
    directive = hand_authored(
        alice, {"name": "A", "verifiers": step_verifiers}, verifiers=directive_verifiers, evaluation_mode=mode
    )

    assert step_named(directive, "A").execution_task.verifiers == expected


# --------------------------------------------------------------------------- the execution prompt


def test_the_execution_prompt_holds_the_directive_the_step_and_its_plan(alice):
    online(alice)
    directive = hand_authored(
        alice,
        {"name": "Add the endpoint", "description": "A /healthz view.", "task_plan": "Edit urls.py and views.py."},
        title="Health checks",
        constraints=["Keep it small"],
    )
    task = step_named(directive, "Add the endpoint").execution_task

    for text in (
        "Health checks",
        directive.goal,
        "Keep it small",
        "Add the endpoint",
        "A /healthz view.",
        "Edit urls.py and views.py.",
        task.branch,
        "makima supervisor complete",
    ):
        assert text in task.plan, text
    assert "Rework" not in task.plan
    assert "merge" not in task.plan.lower()


def test_a_step_with_several_dependencies_is_told_to_merge_the_other_branches_first(alice):
    online(alice)
    directive = hand_authored(alice, {"name": "A"}, {"name": "B"}, {"name": "C", "depends_on": ["B", "A"]})
    a, b = step_named(directive, "A"), step_named(directive, "B")
    pass_step(a)
    pass_step(b)

    task = step_named(directive, "C").execution_task
    assert task.continue_from_task_id == reload(b).execution_task_id
    assert task.merge_branches == [reload(a).execution_task.branch]
    assert "merge the other dependencies' branches first" in task.plan
    assert f"git merge --no-edit {reload(a).execution_task.branch}" in task.plan


def test_a_step_with_one_dependency_gets_no_merge_preamble(alice):
    online(alice)
    directive = hand_authored(alice, {"name": "A"}, {"name": "B", "depends_on": ["A"]})
    pass_step(step_named(directive, "A"))

    task = step_named(directive, "B").execution_task
    assert task.merge_branches == []
    assert "git merge" not in task.plan


# --------------------------------------------------------------------------- worktree continuation


def test_a_step_continues_from_its_first_dependency_and_merges_the_others_in_order(alice):
    online(alice)
    directive = hand_authored(
        alice, {"name": "A"}, {"name": "B"}, {"name": "C"}, {"name": "D", "depends_on": ["C", "A", "B"]}
    )
    for name in "ABC":
        pass_step(step_named(directive, name))

    task = step_named(directive, "D").execution_task
    payload = spawn_commands(task)[0].payload["task"]
    c_task = step_named(directive, "C").execution_task
    assert task.continue_from_task_id == c_task.pk
    assert payload["continue_from"] == {"task_id": str(c_task.pk), "branch": c_task.branch}
    expected = [step_named(directive, n).execution_task.branch for n in "AB"]
    assert task.merge_branches == expected
    assert payload["merge_branches"] == expected


def test_a_skipped_first_dependency_is_passed_over_for_the_next_one(alice):
    online(alice)
    directive = make_directive(alice, agent="scripted")
    a, _, _ = make_steps(directive, {"name": "A"}, {"name": "B"}, {"name": "C", "depends_on": ["A", "B"]})
    step_skip(step=a, actor=SYSTEM)
    directive_start(directive=directive, actor=Actor.for_user(alice))
    go(directive)
    pass_step(step_named(directive, "B"))

    task = step_named(directive, "C").execution_task
    assert task.continue_from_task_id == step_named(directive, "B").execution_task_id
    assert task.merge_branches == []


def test_a_step_without_dependencies_starts_from_the_base_branch_at_first(alice):
    online(alice)
    directive = hand_authored(alice, {"name": "A"}, base_branch="develop")

    task = step_named(directive, "A").execution_task
    assert (task.continue_from_task_id, task.base_branch) == (None, "develop")


def test_a_step_without_dependencies_continues_from_the_last_passed_step(alice):
    online(alice)
    directive = hand_authored(alice, {"name": "A"}, {"name": "B", "order_index": 1}, {"name": "C", "order_index": 2})
    pass_step(step_named(directive, "A"))
    pass_step(step_named(directive, "B"))

    task = step_named(directive, "C").execution_task
    assert task.continue_from_task_id == step_named(directive, "B").execution_task_id


def test_a_step_without_dependencies_starts_from_the_directives_pr_branch_when_it_has_one(alice):
    online(alice)
    directive = hand_authored(alice, {"name": "A"}, {"name": "B", "order_index": 1})
    directive_record_pr(directive=reload(directive), actor=SYSTEM, pr_branch="makima/directive-x-12345678")
    pass_step(step_named(directive, "A"))

    task = step_named(directive, "B").execution_task
    assert (task.base_branch, task.continue_from_task_id) == ("makima/directive-x-12345678", None)


def test_a_reworked_step_continues_from_its_own_previous_attempt(alice):
    online(alice)
    directive = planned(alice, step("A"), autonomy_level="guided", evaluation_mode="agent")
    a = run(step_named(directive, "A"))
    first = a.execution_task
    evaluate(a, verdict(0.2, passed=False, rework="Handle the empty body."))

    a = step_named(directive, "A")
    second = a.execution_task
    assert second.pk != first.pk
    assert second.name == "A (rework 1)"
    assert second.continue_from_task_id == first.pk
    assert second.merge_branches == []
    assert spawn_commands(second)[0].payload["task"]["continue_from"] == {
        "task_id": str(first.pk),
        "branch": first.branch,
    }


# --------------------------------------------------------------------------- branch names


def test_task_branches_are_makima_slash_slug_dash_first_8_hex_of_the_task_id(alice):
    online(alice)
    directive = hand_authored(alice, {"name": "Add the /healthz endpoint!"})
    task = step_named(directive, "Add the /healthz endpoint!").execution_task

    assert task.branch == f"makima/add-the-healthz-endpoint-{task.pk.hex[:8]}"
    assert BRANCH.match(task.branch)
    assert task.branch in task.plan


def test_every_kind_of_task_gets_a_branch_carrying_its_own_id(alice):
    online(alice)
    directive = planned(alice, step("A"), evaluation_mode="agent")
    run(step_named(directive, "A"))
    for task in Task.objects.filter(directive=directive):
        assert BRANCH.match(task.branch), task.branch
        assert task.branch.endswith(task.pk.hex[:8]), task.kind


def test_the_directive_branch_is_makima_slash_directive_dash_slug_dash_8_hex(alice):
    directive = make_directive(alice, title="Add Health Checks")

    assert directive_branch(directive) == f"makima/directive-add-health-checks-{directive.pk.hex[:8]}"


# --------------------------------------------------------------------------- execution failures


def test_an_execution_task_that_fails_fails_its_step(alice):
    online(alice)
    directive = hand_authored(alice, {"name": "A"}, {"name": "B"})
    a = run(step_named(directive, "A"), Task.Status.FAILED, error="tests do not compile", exit_code=2)

    assert a.status == Step.Status.FAILED
    [failed] = events(directive, "step_failed")
    assert failed.severity == DirectiveEvent.Severity.ERROR
    assert "tests do not compile" in failed.message
    assert reload(directive).status == Directive.Status.ACTIVE  # B still runs


@override_settings(MAKIMA_MAX_TASK_ATTEMPTS=3)
def test_an_interrupted_execution_task_is_re_dispatched_up_to_the_attempt_limit_then_its_step_fails(alice):
    first = online(alice, "first")
    directive = hand_authored(alice, {"name": "A"})
    a = step_named(directive, "A")
    task = a.execution_task
    assert task.daemon_id == first.pk

    for attempt in (2, 3):
        Daemon.objects.filter(pk=reload(task).daemon_id).update(status=Daemon.Status.DISCONNECTED)
        online(alice, f"box-{attempt}")
        task = finish(task, Task.Status.INTERRUPTED, error="daemon lost")
        assert (task.status, task.attempt) == (Task.Status.STARTING, attempt)
        assert reload(a).status == Step.Status.RUNNING
        assert reload(a).execution_task_id == task.pk  # the same task, another daemon
        assert len(spawn_commands(task)) == attempt

    finish(task, Task.Status.INTERRUPTED, error="daemon lost")

    a = reload(a)
    assert a.status == Step.Status.FAILED
    assert "interrupted 3 times" in events(directive, "step_failed")[0].message


def test_an_interrupted_task_waits_ready_for_a_daemon_when_none_is_left(alice):
    daemon = online(alice)
    directive = hand_authored(alice, {"name": "A"})
    a = step_named(directive, "A")
    Daemon.objects.filter(pk=daemon.pk).update(status=Daemon.Status.DISCONNECTED)

    task = finish(a.execution_task, Task.Status.INTERRUPTED)

    assert (task.status, task.attempt, task.daemon_id) == (Task.Status.PENDING, 2, None)
    assert reload(a).status == Step.Status.READY
