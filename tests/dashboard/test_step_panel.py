"""The step panel: attempts, evaluations, verifier results and live task output."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from contracts.models import Task
from contracts.services import task_output_append
from directives.models import Directive, Step
from tests.factories import make_approval, make_daemon, make_directive, make_evaluation, make_steps, make_task

pytestmark = pytest.mark.django_db

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
HTMX = {"HX-Request": "true"}


@pytest.fixture
def directive(alice, platform):
    directive = make_directive(alice, team=platform)
    make_steps(
        directive,
        {"name": "Design", "description": "Sketch the endpoint.", "task_plan": "Write a design note."},
        {"name": "Build", "depends_on": ["Design"], "description": "Implement /healthz.", "task_plan": "Add a view."},
    )
    return directive


@pytest.fixture
def build(directive) -> Step:
    return Step.objects.get(directive=directive, name="Build")


def panel_url(directive: Directive, step: Step) -> str:
    return reverse("step-panel", args=[directive.pk, step.pk])


def output_url(task: Task) -> str:
    return reverse("task-output", args=[task.pk])


def lines(task: Task, count: int, *, start: int = 0, text: str = "line") -> None:
    task_output_append(task=task, items=[{"seq": n, "content": f"{text} {n}"} for n in range(start, start + count)])


# --------------------------------------------------------------------------- access


def test_the_panel_opens_for_the_owner_and_a_teammate(client_as, alice, carol, directive, build):
    for user in (alice, carol):
        response = client_as(user).get(panel_url(directive, build), headers=HTMX)
        assert response.status_code == 200
        body = response.content.decode().strip()
        assert body.startswith('<aside id="step-panel"')
        assert f'data-live-url="{panel_url(directive, build)}"' in body
        assert "Implement /healthz." in body
        assert "Add a view." in body
        assert "Design (pending)" in body  # its dependency


def test_a_stranger_gets_404_for_the_panel_and_for_task_output(client_as, bob, directive, build):
    task = make_task(directive, step=build)
    client = client_as(bob)
    assert client.get(panel_url(directive, build), headers=HTMX).status_code == 404
    assert client.get(panel_url(directive, build)).status_code == 404
    assert client.get(output_url(task)).status_code == 404


def test_an_anonymous_visitor_is_sent_to_sign_in(client, directive, build):
    task = make_task(directive, step=build)
    for url in (panel_url(directive, build), output_url(task)):
        response = client.get(url)
        assert response.status_code == 302
        assert response.url.startswith(reverse("login"))


def test_a_step_of_another_directive_is_404_in_this_directives_panel(client_as, alice, directive):
    other = make_directive(alice, title="Other")
    (foreign,) = make_steps(other, {"name": "Elsewhere"})
    assert client_as(alice).get(panel_url(directive, foreign), headers=HTMX).status_code == 404


def test_without_htmx_the_panel_url_renders_the_full_page_with_the_step_open(client_as, alice, directive, build):
    response = client_as(alice).get(panel_url(directive, build))
    body = response.content.decode()
    assert 'id="directive-page"' in body
    assert response.context["panel"]["step"].pk == build.pk
    assert f'<aside id="step-panel" class="card step-panel" data-live-url="{panel_url(directive, build)}"' in body


def test_the_full_page_with_a_step_query_opens_its_panel_and_marks_its_node(client_as, alice, directive, build):
    url = reverse("directive-detail", args=[directive.pk]) + f"?step={build.pk}"
    body = client_as(alice).get(url).content.decode()
    assert "Implement /healthz." in body
    assert f'.dag-node[data-step="{build.pk}"]' in body


def test_an_unknown_step_query_leaves_the_panel_closed(client_as, alice, bob, directive):
    foreign = make_steps(make_directive(bob), {"name": "Not yours"})[0]
    for value in ("nonsense", str(foreign.pk)):
        url = reverse("directive-detail", args=[directive.pk]) + f"?step={value}"
        response = client_as(alice).get(url)
        assert response.status_code == 200
        assert "Select a step in the graph" in response.content.decode()
        assert "Not yours" not in response.content.decode()


# --------------------------------------------------------------------------- attempts and evaluations


def test_the_panel_shows_each_attempt_with_its_evaluation_and_verifier_results(client_as, alice, directive, build):
    daemon = make_daemon(alice, name="build-box-7")
    now = timezone.now()
    first = make_task(
        directive,
        step=build,
        status=Task.Status.DONE,
        daemon=daemon,
        branch="makima/build-1234abcd",
        commit_sha="feedfacecafebeef0000111122223333deadbeef",
        cost_usd="0.42",
        started_at=now - timedelta(minutes=6),
        finished_at=now - timedelta(minutes=1),
        verifier_results=[
            {
                "name": "tests",
                "command": "pytest -q",
                "passed": False,
                "exit_code": 1,
                "duration_s": 12.5,
                "output_tail": "1 failed, 3 passed",
            }
        ],
    )
    make_evaluation(
        build,
        kind="composite",
        passed=False,
        overall_score=0.42,
        criteria_results=[
            {"criterion": "GET /healthz answers 200", "passed": True, "score": 0.9, "evidence": "curl says 200"},
            {"criterion": "Has a test", "passed": False, "score": 0.1, "evidence": "no test found"},
        ],
        summary_feedback="Works but untested.",
        rework_instructions="Add a test for /healthz.",
    )
    second = make_task(directive, step=build, status=Task.Status.RUNNING, started_at=now)
    body = client_as(alice).get(panel_url(directive, build), headers=HTMX).content.decode()
    assert "Attempt 1" in body and "Attempt 2" in body
    assert body.index("Attempt 2") < body.index("Attempt 1")  # newest first
    assert "build-box-7" in body
    assert "makima/build-1234abcd" in body
    assert "feedfacecafe" in body
    assert "$0.42" in body
    assert "5m 00s" in body
    # Evaluation: kind, score, confidence, criteria, feedback, rework instructions.
    assert "Evaluation: composite" in body
    assert "score 0.42" in body
    assert "status-red" in body
    assert "GET /healthz answers 200" in body and "curl says 200" in body and "no test found" in body
    assert "Works but untested." in body
    assert "Add a test for /healthz." in body
    # Verifier results of the task.
    assert (
        "pytest -q" in body
        and '<span aria-hidden="true">✗</span> failed' in body
        and "12.5s" in body
        and "1 failed, 3 passed" in body
    )
    assert first.pk != second.pk


def test_the_panel_shows_the_step_cost_and_a_pending_approval(client_as, alice, directive, build):
    make_task(directive, step=build, status=Task.Status.DONE, cost_usd="1.50")
    make_task(directive, step=build, kind=Task.Kind.MONITORING, name="Evaluate Build", cost_usd="0.25")
    make_approval(build, description="Marginal score, please review")
    body = client_as(alice).get(panel_url(directive, build), headers=HTMX).content.decode()
    assert "$1.75" in body
    assert "Marginal score, please review" in body
    assert f'href="{reverse("approval-inbox")}"' in body
    assert "Evaluator task" in body


def test_a_paused_task_shows_its_question(client_as, alice, directive, build):
    make_task(directive, step=build, status=Task.Status.PAUSED, question=f"Which port? {SCRIPT}")
    body = client_as(alice).get(panel_url(directive, build), headers=HTMX).content.decode()
    assert "Which port? &lt;script&gt;" in body
    assert SCRIPT not in body


def test_a_step_without_attempts_says_so(client_as, alice, directive, build):
    body = client_as(alice).get(panel_url(directive, build), headers=HTMX).content.decode()
    assert "No attempts yet." in body


def test_agent_text_in_the_panel_is_escaped(client_as, alice, directive, build):
    task = make_task(
        directive,
        step=build,
        status=Task.Status.FAILED,
        error=IMG,
        summary=IMG,
        verifier_results=[{"name": IMG, "command": SCRIPT, "passed": False, "exit_code": 2, "output_tail": IMG}],
    )
    lines(task, 2, text=IMG)
    make_evaluation(
        build,
        passed=False,
        overall_score=0.1,
        criteria_results=[{"criterion": SCRIPT, "passed": False, "score": 0, "evidence": IMG}],
        verifier_results=[{"name": "x", "command": IMG, "passed": False}],
        summary_feedback=IMG,
        rework_instructions=IMG,
    )
    Step.objects.filter(pk=build.pk).update(rework_instructions=IMG, description=SCRIPT, task_plan=IMG)
    for url, headers in ((panel_url(directive, build), HTMX), (panel_url(directive, build), {})):
        body = client_as(alice).get(url, headers=headers).content.decode()
        assert IMG not in body
        assert SCRIPT not in body
        assert "&lt;img src=x onerror=alert(1)&gt;" in body


def test_malformed_criteria_show_as_text_and_malformed_verifier_items_are_skipped(client_as, alice, directive, build):
    make_task(directive, step=build, status=Task.Status.DONE, verifier_results=["not an object", 3])
    make_evaluation(build, criteria_results=["just text", {"criterion": "Real one", "passed": "yes"}, 7])
    response = client_as(alice).get(panel_url(directive, build), headers=HTMX)
    assert response.status_code == 200
    body = response.content.decode()
    # As in the inbox: what the evaluator wrote is shown, and only `passed: true` passes.
    assert "Real one" in body and "just text" in body and "<td>7</td>" in body
    assert "status-passed" not in body.split('class="criteria')[1].split("</table>")[0]
    assert "not an object" not in body and 'class="verifiers' not in body


# --------------------------------------------------------------------------- output


def test_the_output_of_a_running_task_polls_and_a_finished_one_does_not(client_as, alice, directive, build):
    done = make_task(directive, step=build, status=Task.Status.DONE)
    running = make_task(directive, step=build, status=Task.Status.RUNNING)
    lines(done, 3)
    lines(running, 2)
    body = client_as(alice).get(panel_url(directive, build), headers=HTMX).content.decode()
    running_el = body.split(f'id="output-{running.pk}"', 1)[1].split(">", 1)[0]
    done_el = body.split(f'id="output-{done.pk}"', 1)[1].split(">", 1)[0]
    assert f'hx-get="{output_url(running)}?after=1&amp;attempt=1"' in running_el
    assert 'hx-trigger="every 2s"' in running_el and 'hx-swap="outerHTML"' in running_el
    assert "hx-get" not in done_el and "hx-trigger" not in done_el
    assert "line 2" in body


@pytest.mark.parametrize("status", ["pending", "starting", "running", "paused"])
def test_task_output_polls_while_the_task_is_not_terminal(client_as, alice, directive, build, status):
    task = make_task(directive, step=build, status=status)
    body = client_as(alice).get(output_url(task), headers=HTMX).content.decode()
    assert 'hx-trigger="every 2s"' in body


@pytest.mark.parametrize("status", ["done", "failed", "cancelled", "interrupted"])
def test_task_output_stops_polling_once_the_task_ends(client_as, alice, directive, build, status):
    task = make_task(directive, step=build, status=status)
    lines(task, 1)
    body = client_as(alice).get(output_url(task) + "?after=0", headers=HTMX).content.decode()
    assert "hx-trigger" not in body
    assert f'id="output-{task.pk}"' in body


def test_task_output_answers_204_when_nothing_is_new(client_as, alice, directive, build):
    task = make_task(directive, step=build, status=Task.Status.RUNNING)
    lines(task, 3)
    client = client_as(alice)
    assert client.get(output_url(task) + "?after=2", headers=HTMX).status_code == 204
    lines(task, 1, start=3, text="fresh")
    response = client.get(output_url(task) + "?after=2", headers=HTMX)
    body = response.content.decode()
    assert response.status_code == 200
    assert "fresh 3" in body and "line 0" in body
    assert "?after=3" in body


def test_task_output_shows_the_last_500_lines_with_a_note(client_as, alice, directive, build):
    task = make_task(directive, step=build, status=Task.Status.DONE)
    lines(task, 620)
    body = client_as(alice).get(output_url(task)).content.decode()
    assert "the last 500 lines only" in body
    assert "line 619" in body and "line 120<" in body and "line 119<" not in body
    panel = client_as(alice).get(panel_url(directive, build), headers=HTMX).content.decode()
    assert "the last 500 lines only" in panel and "line 119<" not in panel and "line 120<" in panel


def retried(task: Task, *, status: str = Task.Status.RUNNING) -> Task:
    """Dispatch 1 wrote lines 0–2 and was lost; the retry numbers its lines from 0 again."""
    lines(task, 3, text="first run")
    Task.objects.filter(pk=task.pk).update(attempt=2, status=status)
    task.refresh_from_db()
    lines(task, 2, text="second run")
    return task


def test_a_retried_task_shows_each_dispatchs_own_lines_under_its_heading(client_as, alice, directive, build):
    task = retried(make_task(directive, step=build, status=Task.Status.INTERRUPTED))
    client = client_as(alice)

    for body in (
        client.get(panel_url(directive, build), headers=HTMX).content.decode(),
        client.get(output_url(task), headers=HTMX).content.decode(),
    ):
        output = body.split(f'id="output-{task.pk}"', 1)[1].split("</details>", 1)[0]
        order = [
            "Dispatch 1 (interrupted)",
            "first run 0",
            "first run 2",
            "Dispatch 2<",
            "second run 0",
            "second run 1",
        ]
        positions = [output.index(text) for text in order]
        assert positions == sorted(positions)  # each dispatch's lines under its heading, the current one last
        assert f'hx-get="{output_url(task)}?after=1&amp;attempt=2"' in output  # polls the current dispatch


def test_a_retry_that_has_not_written_yet_says_so_under_its_heading(client_as, alice, directive, build):
    task = make_task(directive, step=build, status=Task.Status.RUNNING)
    lines(task, 2, text="first run")
    Task.objects.filter(pk=task.pk).update(attempt=2, status=Task.Status.PENDING)

    body = client_as(alice).get(output_url(task), headers=HTMX).content.decode()

    assert body.index("first run 1") < body.index("Dispatch 2<") < body.index("No output yet.")
    assert "?after=-1&amp;attempt=2" in body


def test_a_task_dispatched_once_has_no_dispatch_heading(client_as, alice, directive, build):
    task = make_task(directive, step=build, status=Task.Status.RUNNING)
    lines(task, 2)
    body = client_as(alice).get(output_url(task), headers=HTMX).content.decode()
    assert "Dispatch" not in body and "line 1" in body


def test_polling_after_a_retry_shows_the_new_dispatchs_first_lines(client_as, alice, directive, build):
    task = make_task(directive, step=build, status=Task.Status.RUNNING)
    lines(task, 5, text="first run")
    client = client_as(alice)
    assert client.get(output_url(task) + "?after=4&attempt=1", headers=HTMX).status_code == 204

    retried(task)  # its lines 0–1 are below the seq the poller has seen

    response = client.get(output_url(task) + "?after=4&attempt=1", headers=HTMX)
    assert response.status_code == 200
    assert "second run 1" in response.content.decode()
    assert client.get(output_url(task) + "?after=1&attempt=2", headers=HTMX).status_code == 204


def test_each_dispatch_shows_its_last_500_lines(client_as, alice, directive, build):
    task = make_task(directive, step=build, status=Task.Status.RUNNING)
    lines(task, 520, text="first run")
    Task.objects.filter(pk=task.pk).update(attempt=2)
    task.refresh_from_db()
    lines(task, 3, text="second run")
    body = client_as(alice).get(output_url(task)).content.decode()
    assert body.count("the last 500 lines only") == 1
    assert "first run 519" in body and "first run 20<" in body and "first run 19<" not in body
    assert "second run 0" in body and "second run 2" in body


def test_task_output_is_escaped_text(client_as, alice, directive, build):
    task = make_task(directive, step=build, status=Task.Status.RUNNING)
    lines(task, 1, text=IMG)
    body = client_as(alice).get(output_url(task)).content.decode()
    assert IMG not in body
    assert "&lt;img src=x onerror=alert(1)&gt; 0" in body


def test_task_output_of_a_teammates_shared_directive_is_visible(client_as, carol, directive, build):
    task = make_task(directive, step=build, status=Task.Status.RUNNING)
    lines(task, 1)
    assert client_as(carol).get(output_url(task)).status_code == 200


# --------------------------------------------------------------------------- query counts


def test_the_panel_of_a_busy_step_stays_within_a_bounded_number_of_queries(
    client_as, alice, directive, build, django_assert_max_num_queries
):
    daemon = make_daemon(alice)
    for attempt in range(4):
        task = make_task(directive, step=build, status=Task.Status.DONE, daemon=daemon)
        lines(task, 600, text=f"attempt {attempt}")
        # Dispatched twice: the retry's lines are numbered from 0 again.
        Task.objects.filter(pk=task.pk).update(attempt=2)
        task.refresh_from_db()
        lines(task, 600, text=f"attempt {attempt} again")
        make_task(directive, step=build, kind=Task.Kind.MONITORING, name="Evaluate", daemon=daemon)
        make_evaluation(build, passed=False, overall_score=0.3, criteria_results=[{"criterion": "c", "passed": False}])
    make_approval(build)
    client = client_as(alice)
    with django_assert_max_num_queries(10):
        response = client.get(panel_url(directive, build), headers=HTMX)
    assert response.content.decode().count("Attempt ") >= 4
    with django_assert_max_num_queries(6):
        client.get(output_url(task), headers=HTMX)
