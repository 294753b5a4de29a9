"""The daemons page: the user's worker machines, their load and running tasks."""

from __future__ import annotations

from datetime import timedelta

from django.urls import reverse
from django.utils import timezone

from contracts.models import Task
from tests.factories import make_daemon, make_directive, make_steps, make_task

XSS = "<script>alert(1)</script><img src=x onerror=alert(1)>"
DAEMONS = reverse("daemon-list")


def test_the_page_lists_the_users_daemons_with_load_and_running_tasks(client_as, alice):
    daemon = make_daemon(
        alice,
        "build-box-1",
        status="connected",
        version="0.3.1",
        hostname="box1.lan",
        max_concurrent_tasks=3,
        capabilities=["claude", "scripted"],
        last_seen_at=timezone.now() - timedelta(seconds=30),
    )
    directive = make_directive(alice, title="Health endpoint")
    step = make_steps(directive, {"name": "Implement"})[0]
    make_task(
        directive,
        step=step,
        name="Implement the endpoint",
        status=Task.Status.RUNNING,
        daemon=daemon,
        started_at=timezone.now(),
    )
    make_task(directive, name="Old planning", status=Task.Status.DONE, daemon=daemon)
    response = client_as(alice).get(DAEMONS)
    assert response.status_code == 200
    assert response.context["nav"] == "daemons"
    html = response.content.decode()
    assert "build-box-1" in html and "box1.lan" in html and "v0.3.1" in html
    assert "connected" in html
    assert "1 / 3" in html
    assert "<code>claude</code>, <code>scripted</code>" in html
    assert "Implement the endpoint" in html and "Old planning" not in html
    assert reverse("directive-detail", args=[directive.pk]) in html
    assert reverse("step-panel", args=[directive.pk, step.pk]) in html
    assert "ago" in html


def test_a_disconnected_daemon_is_shown_as_such(client_as, alice):
    make_daemon(alice, "old-box", status="disconnected")
    html = client_as(alice).get(DAEMONS).content.decode()
    assert "status-disconnected" in html and "0 / 2" in html and "idle" in html and "never" in html


def test_without_daemons_the_page_explains_how_to_start_one(client_as, alice, settings):
    html = client_as(alice).get(DAEMONS).content.decode()
    assert "makima daemon run --server" in html and "--token TOKEN" in html
    assert reverse("apikey-list") in html


def test_a_user_sees_only_their_own_daemons(client_as, alice, bob, carol):
    make_daemon(alice, "alices-box")
    for user in (bob, carol):
        html = client_as(user).get(DAEMONS).content.decode()
        assert "alices-box" not in html
        assert "No daemon has connected yet" in html


def test_anonymous_visitors_are_sent_to_sign_in(client):
    response = client.get(DAEMONS)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_daemon_names_and_task_names_are_escaped(client_as, alice):
    daemon = make_daemon(alice, XSS, status="connected", hostname=XSS, version=XSS, capabilities=[XSS])
    directive = make_directive(alice, title=XSS)
    make_task(directive, name=XSS, status=Task.Status.RUNNING, daemon=daemon)
    html = client_as(alice).get(DAEMONS).content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_the_page_runs_a_constant_number_of_queries(client_as, alice, django_assert_max_num_queries):
    directive = make_directive(alice)
    steps = make_steps(directive, *({"name": f"S{i}"} for i in range(20)))
    for d in range(10):
        daemon = make_daemon(alice, f"box-{d}", status="connected", max_concurrent_tasks=4)
        for step in steps[d * 2 : d * 2 + 2]:
            make_task(directive, step=step, status=Task.Status.RUNNING, daemon=daemon)
    client = client_as(alice)
    with django_assert_max_num_queries(6):
        response = client.get(DAEMONS)
    assert len(response.context["daemons"]) == 10
    assert all(len(d.running_tasks) == 2 and d.running_task_count == 2 for d in response.context["daemons"])
