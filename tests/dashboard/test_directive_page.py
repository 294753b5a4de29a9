"""The directive page: header, graph, run grid, events, goal history and their live partials."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from contracts.models import Task
from directives.models import Chain, Directive, DirectiveEvent, Step, StepDependency
from directives.services import directive_update, event_record
from makima.state import SYSTEM, Actor
from tests.factories import make_directive, make_evaluation, make_steps, make_task

pytestmark = pytest.mark.django_db

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
ATTR = '" onmouseover=alert(1) x="'
PARTS = ("header", "dag", "grid", "events", "goals")


@pytest.fixture
def directive(alice, platform):
    directive = make_directive(alice, title="Add a health endpoint", team=platform)
    make_steps(directive, {"name": "Design"}, {"name": "Build", "depends_on": ["Design"]})
    return directive


def page_url(directive: Directive, **query: str) -> str:
    url = reverse("directive-detail", args=[directive.pk])
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return url


def partial_url(directive: Directive, part: str) -> str:
    return reverse("directive-partial", args=[directive.pk, part])


def step(directive: Directive, name: str) -> Step:
    return Step.objects.get(directive=directive, name=name)


# --------------------------------------------------------------------------- access


def test_the_owner_sees_the_directive_page(client_as, alice, directive):
    response = client_as(alice).get(page_url(directive))
    assert response.status_code == 200
    body = response.content.decode()
    assert "Add a health endpoint" in body
    assert 'id="directive-page"' in body
    assert f'data-live-socket="/ws/directives/{directive.pk}/"' in body
    assert "js/live.js" in body
    assert response.context["nav"] == "directives"


def test_a_teammate_sees_a_shared_directive(client_as, carol, directive):
    assert client_as(carol).get(page_url(directive)).status_code == 200


def test_a_stranger_gets_404_for_the_page_and_every_partial(client_as, bob, directive):
    client = client_as(bob)
    assert client.get(page_url(directive)).status_code == 404
    for part in PARTS:
        assert client.get(partial_url(directive, part)).status_code == 404


def test_a_stranger_gets_404_for_a_directive_that_is_not_shared(client_as, carol, alice):
    private = make_directive(alice, title="Private")
    assert client_as(carol).get(page_url(private)).status_code == 404


def test_an_anonymous_visitor_is_sent_to_sign_in(client, directive):
    for url in (page_url(directive), partial_url(directive, "dag")):
        response = client.get(url)
        assert response.status_code == 302
        assert response.url.startswith(reverse("login"))


def test_an_unknown_part_is_404(client_as, alice, directive):
    assert client_as(alice).get(partial_url(directive, "secrets")).status_code == 404


def test_the_page_refuses_post(client_as, alice, directive):
    assert client_as(alice).post(page_url(directive)).status_code == 405


# --------------------------------------------------------------------------- live regions


@pytest.mark.parametrize("part", PARTS)
def test_each_partial_renders_its_own_live_region_as_the_single_root(client_as, alice, directive, part):
    url = partial_url(directive, part)
    response = client_as(alice).get(url, headers={"HX-Request": "true"})
    assert response.status_code == 200
    body = response.content.decode().strip()
    assert body.count(f'id="live-{part}"') == 1
    assert f'data-live-url="{url}' in body
    # One root element: the first tag opens the region and the last closes it.
    assert body.startswith("<")
    first_tag = body.split(">", 1)[0]
    assert f'id="live-{part}"' in first_tag
    tag = first_tag[1:].split()[0]
    assert body.endswith(f"</{tag}>")


def test_the_full_page_includes_every_region_with_its_partial_url(client_as, alice, directive):
    body = client_as(alice).get(page_url(directive)).content.decode()
    for part in PARTS:
        assert f'id="live-{part}" ' in body
        assert f'data-live-url="{partial_url(directive, part)}"' in body
    assert '<aside id="step-panel"' in body
    assert "Select a step in the graph" in body


def test_the_header_shows_progress_cost_and_limit(client_as, alice, directive):
    Directive.objects.filter(pk=directive.pk).update(total_cost_usd="2.5", max_total_cost_usd="10")
    Step.objects.filter(directive=directive, name="Design").update(status=Step.Status.PASSED)
    body = client_as(alice).get(partial_url(directive, "header")).content.decode()
    assert "1 of 2 steps done" in body
    assert "$2.50 of $10.00 limit" in body
    assert "seg-passed" in body and "seg-pending" in body


def test_the_header_links_an_http_pull_request(client_as, alice, directive):
    Directive.objects.filter(pk=directive.pk).update(
        status=Directive.Status.COMPLETED, pr_url="https://github.com/acme/app/pull/7"
    )
    body = client_as(alice).get(partial_url(directive, "header")).content.decode()
    assert '<a href="https://github.com/acme/app/pull/7"' in body


def test_the_header_shows_a_non_http_pr_url_as_plain_text(client_as, alice, directive):
    Directive.objects.filter(pk=directive.pk).update(pr_url="javascript:alert(1)")
    body = client_as(alice).get(partial_url(directive, "header")).content.decode()
    assert "javascript:alert(1)" in body
    assert 'href="javascript:' not in body


def test_the_header_shows_the_pushed_branch_of_a_completed_directive_without_pr(client_as, alice, directive):
    Directive.objects.filter(pk=directive.pk).update(
        status=Directive.Status.COMPLETED, pr_branch="makima/directive-add-a-health-endpoint-1234abcd"
    )
    body = client_as(alice).get(partial_url(directive, "header")).content.decode()
    assert "pushed" in body and "makima/directive-add-a-health-endpoint-1234abcd" in body


# --------------------------------------------------------------------------- graph


def test_the_graph_draws_a_node_per_step_and_an_edge_per_dependency(client_as, alice, directive):
    body = client_as(alice).get(partial_url(directive, "dag")).content.decode()
    design, build = step(directive, "Design"), step(directive, "Build")
    assert body.count('class="dag-node ') == 2
    assert body.count('class="dag-edge"') == 1
    assert 'aria-label="Design: pending"' in body
    panel = reverse("step-panel", args=[directive.pk, build.pk])
    assert f'href="?step={build.pk}" hx-get="{panel}" hx-target="#step-panel"' in body
    assert f'hx-push-url="?step={design.pk}"' in body
    assert "node-pending" in body
    assert "○ pending" in body  # status as text, not colour alone


def test_the_graph_shows_an_empty_state_without_steps(client_as, alice):
    empty = make_directive(alice, title="Nothing planned")
    body = client_as(alice).get(partial_url(empty, "dag")).content.decode()
    assert "No steps yet" in body


def test_the_graph_escapes_step_names(client_as, alice):
    directive = make_directive(alice)
    make_steps(directive, {"name": SCRIPT}, {"name": ATTR, "depends_on": [SCRIPT]}, {"name": "Tom & Jerry"})
    body = client_as(alice).get(partial_url(directive, "dag")).content.decode()
    assert SCRIPT not in body
    assert ATTR not in body
    assert "onmouseover=alert(1) x=" not in body.replace("&quot; onmouseover", "")
    assert "&lt;script&gt;" in body
    assert "Tom &amp; Jerry" in body
    page = client_as(alice).get(page_url(directive)).content.decode()
    assert SCRIPT not in page and ATTR not in page


def test_the_graph_shows_the_current_chain_only(client_as, alice, directive):
    old_chain = Chain.objects.get(directive=directive)
    Chain.objects.filter(pk=old_chain.pk).update(status=Chain.Status.SUPERSEDED)
    new_chain = Chain.objects.create(owner=alice, directive=directive, generation=2, name="Second try")
    Directive.objects.filter(pk=directive.pk).update(current_chain=new_chain)
    Step.objects.create(owner=alice, directive=directive, chain=new_chain, generation=2, name="Redo")
    body = client_as(alice).get(partial_url(directive, "dag")).content.decode()
    assert "Redo" in body
    assert "Design" not in body
    grid = client_as(alice).get(partial_url(directive, "grid")).content.decode()
    assert "Generation 2" in grid and "Generation 1" in grid and "Design" in grid and "Redo" in grid


def test_a_large_graph_renders_compact_and_points_to_the_run_grid(client_as, alice):
    directive = make_directive(alice)
    chain = Chain.objects.create(owner=alice, directive=directive, generation=1, name="Big plan")
    Directive.objects.filter(pk=directive.pk).update(current_chain=chain)
    steps = Step.objects.bulk_create(
        Step(owner=alice, directive=directive, chain=chain, generation=1, name=f"Step {i:03d}", order_index=i // 50)
        for i in range(500)
    )
    StepDependency.objects.bulk_create(
        StepDependency(step=steps[i], depends_on=steps[i - 50], position=0) for i in range(50, 500)
    )
    response = client_as(alice).get(page_url(directive))
    body = response.content.decode()
    assert response.context["dag"]["layout"].compact
    assert "compact view" in body
    assert 'href="#live-grid"' in body
    assert body.count('class="dag-node ') == 500
    # No visible name labels in the compact graph, only tooltips and accessible labels.
    assert 'aria-label="Step 042: pending"' in body
    dag_html = body.split('id="live-dag"', 1)[1].split('id="live-grid"', 1)[0]
    assert ">Step 042</text>" not in dag_html


# --------------------------------------------------------------------------- run grid


def rework_two_attempts(directive: Directive) -> tuple[Step, Task, Task]:
    build = step(directive, "Build")
    now = timezone.now()
    first = make_task(
        directive,
        step=build,
        status=Task.Status.DONE,
        started_at=now - timedelta(minutes=10),
        finished_at=now - timedelta(minutes=7),
    )
    make_evaluation(build, passed=False, overall_score=0.3, rework_instructions="Add the missing test.")
    second = make_task(
        directive, step=build, status=Task.Status.RUNNING, started_at=now - timedelta(minutes=2), attempt=1
    )
    Step.objects.filter(pk=build.pk).update(status=Step.Status.RUNNING, rework_count=1, execution_task=second)
    return build, first, second


def test_the_run_grid_shows_two_attempts_after_a_rework(client_as, alice, directive):
    build, _, _ = rework_two_attempts(directive)
    response = client_as(alice).get(partial_url(directive, "grid"))
    body = response.content.decode()
    assert "Attempt 1" in body and "Attempt 2" in body
    rows = [r for g in response.context["grid"]["generations"] for r in g["rows"]]
    build_row = next(r for r in rows if r["id"] == str(build.pk))
    first_cell, second_cell = build_row["cells"]
    assert (first_cell["task_status"], second_cell["task_status"]) == ("done", "running")
    assert len(first_cell["evaluations"]) == 1
    assert second_cell["evaluations"] == []
    assert "3m 00s" in body  # the first attempt's duration
    assert "✗ not passed · agent 0.30 red" in body


def test_the_run_grid_links_each_step_to_its_panel(client_as, alice, directive):
    build = step(directive, "Build")
    body = client_as(alice).get(partial_url(directive, "grid")).content.decode()
    assert f'hx-get="{reverse("step-panel", args=[directive.pk, build.pk])}"' in body


# --------------------------------------------------------------------------- events


def test_the_timeline_lists_the_newest_events_first_with_severity_as_text(client_as, alice, directive):
    event_record(directive_id=directive.pk, event_type="old_thing", message="first")
    event_record(
        directive_id=directive.pk,
        event_type="new_thing",
        message="second",
        severity=DirectiveEvent.Severity.ERROR,
        actor=Actor.for_user(alice),
    )
    body = client_as(alice).get(partial_url(directive, "events")).content.decode()
    assert body.index("new_thing") < body.index("old_thing")
    assert "[error]" in body
    assert "by user alice" in body


def test_the_timeline_shows_the_latest_hundred_and_a_link_to_older_ones(client_as, alice, directive):
    DirectiveEvent.objects.bulk_create(
        DirectiveEvent(directive=directive, event_type="tick", message=f"event {i}") for i in range(150)
    )
    newest = DirectiveEvent.objects.filter(directive=directive).order_by("-id")
    response = client_as(alice).get(partial_url(directive, "events"))
    shown = response.context["events"]["events"]
    assert len(shown) == 100
    assert shown[0].pk == newest[0].pk
    body = response.content.decode()
    assert "Show older events" in body
    older = f"?before={shown[-1].pk}"
    assert older in body
    response = client_as(alice).get(partial_url(directive, "events") + older)
    page = response.context["events"]["events"]
    assert page[0].pk == shown[-1].pk - 1
    assert f'data-live-url="{partial_url(directive, "events")}{older}"' in response.content.decode()


def test_the_severity_filter_keeps_itself_in_the_live_url(client_as, alice, directive):
    event_record(directive_id=directive.pk, event_type="fine", severity="info")
    event_record(directive_id=directive.pk, event_type="broken", severity="error")
    url = partial_url(directive, "events") + "?severity=error"
    body = client_as(alice).get(url, headers={"HX-Request": "true"}).content.decode()
    assert "broken" in body and "fine" not in body
    assert f'data-live-url="{url}"' in body
    assert 'hx-target="#live-events"' in body
    assert '<option value="error" selected>' in body


def test_an_unknown_severity_shows_every_event(client_as, alice, directive):
    event_record(directive_id=directive.pk, event_type="fine", severity="info")
    body = client_as(alice).get(partial_url(directive, "events") + "?severity=<b>").content.decode()
    assert "fine" in body and "<b>" not in body


def test_the_full_page_accepts_the_timeline_filter(client_as, alice, directive):
    event_record(directive_id=directive.pk, event_type="broken", severity="error")
    event_record(directive_id=directive.pk, event_type="fine", severity="info")
    body = client_as(alice).get(page_url(directive, severity="error")).content.decode()
    events = body.split('id="live-events"', 1)[1]
    assert "broken" in events and "fine" not in events


def test_event_messages_are_escaped(client_as, alice, directive):
    event_record(directive_id=directive.pk, event_type="agent_said", message=IMG, actor=SYSTEM)
    body = client_as(alice).get(page_url(directive)).content.decode()
    assert IMG not in body
    assert "&lt;img src=x onerror=alert(1)&gt;" in body


# --------------------------------------------------------------------------- goals


def test_the_goal_history_lists_previous_goals(client_as, alice, directive):
    directive_update(directive=directive, actor=Actor.for_user(alice), goal=f"Serve /healthz {SCRIPT}")
    body = client_as(alice).get(partial_url(directive, "goals")).content.decode()
    assert "Expose /healthz returning 200 when the service is up." in body
    assert "Serve /healthz &lt;script&gt;" in body
    assert SCRIPT not in body


def test_the_goal_history_has_an_empty_state(client_as, alice, directive):
    body = client_as(alice).get(partial_url(directive, "goals")).content.decode()
    assert "has not been changed" in body


# --------------------------------------------------------------------------- query counts


def big_directive(owner, *, steps: int, events: int = 1000) -> Directive:
    """A directive with ``steps`` steps in layers of 20, two attempts and two
    evaluations per step, and ``events`` events, written with bulk inserts."""
    directive = make_directive(owner, title=f"{steps} steps")
    chain = Chain.objects.create(owner=owner, directive=directive, generation=1, name="Big plan")
    Directive.objects.filter(pk=directive.pk).update(current_chain=chain, status=Directive.Status.ACTIVE)
    rows = Step.objects.bulk_create(
        Step(
            owner=owner,
            directive=directive,
            chain=chain,
            generation=1,
            name=f"Step {i:03d}",
            order_index=i // 20,
            status=Step.Status.PASSED if i < steps // 2 else Step.Status.PENDING,
        )
        for i in range(steps)
    )
    StepDependency.objects.bulk_create(
        StepDependency(step=rows[i], depends_on=rows[i - 20], position=0) for i in range(20, steps)
    )
    now = timezone.now()
    Task.objects.bulk_create(
        Task(
            owner=owner,
            name=s.name,
            kind=Task.Kind.EXECUTION,
            agent="scripted",
            plan="p",
            status=Task.Status.DONE,
            directive=directive,
            step=s,
            started_at=now - timedelta(minutes=5),
            finished_at=now,
        )
        for s in rows
        for _ in range(2)
    )
    from directives.models import Evaluation

    Evaluation.objects.bulk_create(
        Evaluation(
            owner=owner,
            directive=directive,
            chain=chain,
            step=s,
            kind="agent",
            passed=True,
            overall_score=0.9,
            confidence_level="green",
            criteria_results=[{"criterion": "works", "passed": True, "score": 0.9, "evidence": "tests"}],
        )
        for s in rows
        for _ in range(2)
    )
    DirectiveEvent.objects.bulk_create(
        DirectiveEvent(directive=directive, event_type="tick", message=f"event {i}", step=rows[i % steps])
        for i in range(events)
    )
    return directive


def test_the_page_with_200_steps_and_1000_events_stays_within_20_queries(
    client_as, alice, django_assert_max_num_queries
):
    directive = big_directive(alice, steps=200)
    client = client_as(alice)
    with django_assert_max_num_queries(20):
        response = client.get(page_url(directive))
    assert response.status_code == 200
    some_step = Step.objects.filter(directive=directive).first()
    with django_assert_max_num_queries(20):
        response = client.get(page_url(directive, step=str(some_step.pk)))
    assert response.context["panel"]["step"].pk == some_step.pk


@pytest.mark.parametrize("part", PARTS)
def test_each_partial_of_a_200_step_page_stays_within_12_queries(client_as, alice, django_assert_max_num_queries, part):
    directive = big_directive(alice, steps=200)
    client = client_as(alice)
    with django_assert_max_num_queries(12):
        response = client.get(partial_url(directive, part), headers={"HX-Request": "true"})
    assert response.status_code == 200
