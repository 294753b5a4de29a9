"""Completion: merging the step branches, the pull request, verification (spec 4.4)."""

from __future__ import annotations

from contracts.models import Contract, Task
from contracts.services import task_output_append
from directives.lifecycle import advance, completion_dispatch, directive_branch
from directives.models import Chain, Directive, Order, Step
from directives.services import (
    StepSpec,
    directive_pause,
    directive_resume,
    directive_update,
    order_link,
    step_request_evaluation,
    step_skip,
    steps_add,
)
from makima.state import SYSTEM, Actor
from tests.factories import make_order
from tests.orchestrator.helpers import (
    events,
    finish,
    go,
    online,
    pass_step,
    planned,
    reload,
    spawn_commands,
    step,
    step_named,
    supervisor_complete,
    tasks,
)

GITHUB = "https://github.com/acme/api.git"
PR = "https://github.com/acme/api/pull/42"


def all_passed(owner, **fields):
    online(owner)
    fields.setdefault("evaluation_mode", "off")
    directive = planned(owner, step("A"), step("B"), step("C", "A", "B"), **fields)
    for name in "ABC":
        pass_step(step_named(directive, name))
    return reload(directive)


def completion_task(directive):
    return reload(directive).completion_task


def test_when_every_step_passed_the_chain_completes_and_a_completion_task_starts(alice):
    directive = all_passed(alice)

    assert directive.status == Directive.Status.COMPLETING
    assert directive.current_chain.status == Chain.Status.COMPLETED
    task = directive.completion_task
    assert (task.kind, task.is_supervisor, task.status) == ("completion", True, Task.Status.STARTING)
    assert task.contract.contract_type == Contract.ContractType.COMPLETION
    assert task.branch == directive_branch(directive) == directive.pr_branch
    assert len(spawn_commands(task)) == 1


def test_skipped_steps_count_as_done_for_completion(alice):
    online(alice)
    directive = planned(alice, step("A"), step("B", order_index=1), evaluation_mode="off")
    step_skip(step=step_named(directive, "B"), actor=SYSTEM)
    pass_step(step_named(directive, "A"))

    assert reload(directive).status == Directive.Status.COMPLETING


def test_exactly_one_completion_task_is_created_however_often_the_orchestrator_runs(alice):
    directive = all_passed(alice)

    go(directive)
    advance()
    assert completion_dispatch(directive=directive) is None
    assert completion_dispatch(directive=reload(directive)) is None

    assert len(tasks(directive, Task.Kind.COMPLETION)) == 1
    assert len(events(directive, "directive_completing")) == 1


def test_the_completion_prompt_merges_every_step_branch_and_opens_a_pull_request_on_github(alice):
    directive = all_passed(alice, repository_url=GITHUB)
    task = directive.completion_task
    branches = [step_named(directive, n).execution_task.branch for n in "ABC"]

    assert task.merge_branches == branches
    assert task.completion_action == Task.CompletionAction.PR
    for branch in branches:
        assert f"git merge --no-edit {branch}" in task.plan
    assert f"git push origin {directive.pr_branch}" in task.plan
    assert f"gh pr create --base main --head {directive.pr_branch}" in task.plan
    assert "makima directive update --pr-url" in task.plan
    assert "makima supervisor complete" in task.plan
    assert "already has" not in task.plan
    payload = spawn_commands(task)[0].payload["task"]
    assert (payload["branch"], payload["merge_branches"], payload["completion_action"]) == (
        directive.pr_branch,
        branches,
        "pr",
    )


def test_the_completion_prompt_for_a_remote_without_pull_requests_only_pushes(alice):
    directive = all_passed(alice, repository_url="/srv/repos/demo.git")
    task = directive.completion_task

    assert task.completion_action == Task.CompletionAction.BRANCH
    assert "gh pr create" not in task.plan
    assert "no pull requests" in task.plan
    assert f"git push origin {directive.pr_branch}" in task.plan


def test_with_an_existing_pull_request_the_new_steps_are_merged_into_its_branch(alice):
    online(alice)
    directive = planned(alice, step("A"), evaluation_mode="off", repository_url=GITHUB)
    pass_step(step_named(directive, "A"))
    first = completion_task(directive)
    finish(first, summary=f"Opened {PR}")
    directive = reload(directive)
    assert (directive.status, directive.pr_url) == (Directive.Status.COMPLETED, PR)

    # The goal changes; the re-plan adds a step; it passes; completion runs again.
    directive_update(directive=directive, actor=Actor.for_user(alice), goal="Also expose /readyz.")
    go(directive)
    planner = reload(directive).orchestrator_task
    steps_add(directive=reload(directive), specs=[StepSpec(name="Readyz")], actor=SYSTEM)
    supervisor_complete(planner)
    finish(planner)
    readyz = step_named(directive, "Readyz")
    assert readyz.execution_task.base_branch == directive.pr_branch  # starts from the PR branch
    pass_step(readyz)

    directive = reload(directive)
    second = directive.completion_task
    assert second.pk != first.pk
    assert "already has a pull request" in second.plan
    assert PR in second.plan
    assert "gh pr create" not in second.plan
    assert second.base_branch == second.branch == directive.pr_branch == first.branch
    assert readyz.execution_task.branch in second.merge_branches


def test_a_pr_url_recorded_through_the_api_completes_the_directive(alice, api_as):
    directive = all_passed(alice, repository_url=GITHUB)
    task = directive.completion_task

    response = api_as(alice).patch(f"/api/v1/directives/{directive.pk}/", {"pr_url": PR}, format="json")
    assert response.status_code == 200, response.content
    supervisor_complete(task)
    finish(task)

    directive = reload(directive)
    assert (directive.status, directive.pr_url) == (Directive.Status.COMPLETED, PR)
    assert tasks(directive, Task.Kind.VERIFICATION) == []
    assert directive.completion_task is None


def test_a_pr_url_found_in_the_task_output_is_recorded(alice):
    directive = all_passed(alice, repository_url=GITHUB)
    task = directive.completion_task
    task_output_append(
        task=task,
        items=[
            {"seq": 1, "stream": "stdout", "content": "Pushed."},
            {"seq": 2, "stream": "stdout", "content": f"Created pull request {PR}\n"},
        ],
    )
    finish(task)

    directive = reload(directive)
    assert (directive.status, directive.pr_url) == (Directive.Status.COMPLETED, PR)
    assert tasks(directive, Task.Kind.VERIFICATION) == []
    [recorded] = events(directive, "pr_recorded")
    assert recorded.data == {"pr_url": PR}


def test_without_a_pr_url_on_github_one_verification_task_looks_for_it(alice):
    directive = all_passed(alice, repository_url=GITHUB)
    finish(directive.completion_task)

    directive = reload(directive)
    assert directive.status == Directive.Status.COMPLETING
    [verification] = tasks(directive, Task.Kind.VERIFICATION)
    assert directive.completion_task_id == verification.pk
    assert verification.status == Task.Status.STARTING
    assert f"gh pr list --head {directive.pr_branch}" in verification.plan
    assert "makima directive update --pr-url" in verification.plan
    go(directive)
    advance()
    assert len(tasks(directive, Task.Kind.VERIFICATION)) == 1


def test_the_verification_task_finding_the_pr_records_it_and_completes(alice):
    directive = all_passed(alice, repository_url=GITHUB)
    finish(directive.completion_task)
    verification = completion_task(directive)
    task_output_append(task=verification, items=[{"seq": 1, "content": PR}])
    finish(verification)

    directive = reload(directive)
    assert (directive.status, directive.pr_url) == (Directive.Status.COMPLETED, PR)


def test_the_directive_is_completed_even_when_verification_finds_no_pr(alice):
    directive = all_passed(alice, repository_url=GITHUB)
    finish(directive.completion_task)
    finish(completion_task(directive), Task.Status.FAILED, error="gh is not installed")

    directive = reload(directive)
    assert directive.status == Directive.Status.COMPLETED
    assert directive.pr_url == ""
    assert directive.pr_branch
    assert len(events(directive, "pr_not_found")) == 1
    assert len(tasks(directive, Task.Kind.VERIFICATION)) == 1


def test_a_verification_task_may_complete_the_directive_itself_through_the_api(alice, api_as):
    directive = all_passed(alice, repository_url=GITHUB)
    order = make_order(alice)
    Order.objects.filter(pk=order.pk).update(status=Order.Status.IN_PROGRESS, directive=directive)
    finish(directive.completion_task)
    verification = completion_task(directive)

    response = api_as(alice).patch(f"/api/v1/directives/{directive.pk}/", {"status": "completed"}, format="json")
    assert response.status_code == 200, response.content
    finish(verification)

    assert reload(directive).status == Directive.Status.COMPLETED
    assert reload(order).status == Order.Status.DONE


def test_a_remote_without_pull_requests_completes_with_the_pushed_branch_and_no_verification(alice):
    directive = all_passed(alice, repository_url="/srv/repos/demo.git")
    finish(directive.completion_task)

    directive = reload(directive)
    assert directive.status == Directive.Status.COMPLETED
    assert directive.pr_url == ""
    assert directive.pr_branch == directive_branch(directive)
    assert directive.pr_branch.startswith("makima/directive-")
    assert tasks(directive, Task.Kind.VERIFICATION) == []


def test_a_local_path_repository_completes_the_same_way(alice):
    directive = all_passed(alice, repository_url="", local_path="/home/alice/src/demo")
    task = directive.completion_task
    assert spawn_commands(task)[0].payload["task"]["local_path"] == "/home/alice/src/demo"
    finish(task)

    directive = reload(directive)
    assert (directive.status, directive.pr_url) == (Directive.Status.COMPLETED, "")
    assert tasks(directive, Task.Kind.VERIFICATION) == []


def test_a_failed_completion_task_pauses_the_directive(alice):
    directive = all_passed(alice)
    finish(directive.completion_task, Task.Status.FAILED, error="merge conflict in urls.py")

    directive = reload(directive)
    assert directive.status == Directive.Status.PAUSED
    assert "merge conflict in urls.py" in events(directive, "completion_failed")[0].message


def test_orders_in_progress_are_done_when_the_directive_completes(alice):
    online(alice)
    directive = planned(alice, step("A"), evaluation_mode="off")
    order = make_order(alice, title="Add /readyz")
    order_link(order=order, directive=directive, actor=Actor.for_user(alice))
    go(directive)
    pickup = reload(directive).orchestrator_task
    steps_add(
        directive=reload(directive), specs=[StepSpec(name="Readyz", description=f"Order {order.pk}")], actor=SYSTEM
    )
    finish(pickup)
    assert reload(order).status == Order.Status.IN_PROGRESS

    pass_step(step_named(directive, "A"))
    pass_step(step_named(directive, "Readyz"))
    finish(completion_task(directive))

    assert reload(directive).status == Directive.Status.COMPLETED
    assert reload(order).status == Order.Status.DONE


def test_a_step_evaluated_again_keeps_the_directive_from_completing(alice):
    online(alice)
    directive = planned(alice, step("A"), step("B", order_index=1), evaluation_mode="agent")
    a = pass_step(step_named(directive, "A"))
    step_request_evaluation(step=a, actor=Actor.for_user(alice))
    go(directive)
    pass_step(step_named(directive, "B"))

    assert reload(a).status == Step.Status.EVALUATING
    assert reload(directive).status == Directive.Status.ACTIVE
    assert tasks(directive, Task.Kind.COMPLETION) == []


def test_a_completion_that_finishes_while_the_directive_is_paused_is_applied_on_resume(alice):
    directive = all_passed(alice, repository_url=GITHUB)
    task = directive.completion_task
    directive_pause(directive=directive, actor=Actor.for_user(alice))  # running tasks finish

    finish(task, summary=f"Opened {PR}")

    directive = reload(directive)
    assert (directive.status, directive.completion_task_id, directive.pr_url) == ("paused", task.pk, "")
    directive_resume(directive=directive, actor=Actor.for_user(alice))
    go(directive)

    directive = reload(directive)
    assert (directive.status, directive.pr_url) == (Directive.Status.COMPLETED, PR)
    assert tasks(directive, Task.Kind.COMPLETION) == [task]  # its work was not redone


def test_a_directive_resumed_while_its_completion_runs_waits_for_that_task(alice):
    directive = all_passed(alice, repository_url=GITHUB)
    task = directive.completion_task
    directive_pause(directive=directive, actor=Actor.for_user(alice))
    directive_resume(directive=directive, actor=Actor.for_user(alice))
    go(directive)

    directive = reload(directive)
    assert (directive.status, directive.completion_task_id) == (Directive.Status.COMPLETING, task.pk)
    assert tasks(directive, Task.Kind.COMPLETION) == [task]
    finish(task, summary=f"Opened {PR}")
    assert reload(directive).status == Directive.Status.COMPLETED


def test_a_completion_that_failed_while_paused_starts_over_on_resume(alice):
    directive = all_passed(alice, repository_url=GITHUB)
    first = directive.completion_task
    directive_pause(directive=directive, actor=Actor.for_user(alice))
    finish(first, Task.Status.FAILED, error="merge conflict")
    directive_resume(directive=directive, actor=Actor.for_user(alice))
    go(directive)

    directive = reload(directive)
    assert directive.status == Directive.Status.COMPLETING
    assert directive.completion_task not in (None, first)
    assert len(tasks(directive, Task.Kind.COMPLETION)) == 2
