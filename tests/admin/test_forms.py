"""Add and change forms save through the services, with the services' rules."""

from __future__ import annotations

import pytest

from directives import admin as directives_admin
from directives.models import Directive, DirectiveEvent, GoalHistory, Order
from directives.services import directive_start, directive_stop, step_transition
from makima.errors import Conflict
from makima.state import SYSTEM
from tests.admin.helpers import add_page, change_page, form_data
from tests.factories import make_directive, make_order, make_steps

pytestmark = pytest.mark.django_db


def test_adding_a_directive_creates_it_through_the_service(staff, alice):
    data = form_data(staff.get(add_page(Directive)), "directive_form")
    data.update(
        owner=str(alice.pk),
        title="Ship the status page",
        goal="A public page that shows uptime.",
        acceptance_criteria='["The page answers 200"]',
        _save="Save",
    )

    response = staff.post(add_page(Directive), data)

    assert response.status_code == 302
    directive = Directive.objects.get(title="Ship the status page")
    assert (directive.owner, directive.status) == (alice, Directive.Status.DRAFT)
    assert directive.acceptance_criteria == [{"id": "AC1", "criterion": "The page answers 200"}]
    event = DirectiveEvent.objects.get(directive=directive, event_type="directive_created")
    assert (event.actor_type, event.actor) == ("user", "root")


def test_editing_the_goal_records_the_history_through_the_service(staff, alice):
    directive = make_directive(alice)
    url = change_page(directive)
    data = form_data(staff.get(url), "directive_form")
    data.update(goal="Expose /healthz and /readyz.", _save="Save")

    response = staff.post(url, data)

    assert response.status_code == 302, response.context["adminform"].form.errors
    directive.refresh_from_db()
    assert directive.goal == "Expose /healthz and /readyz."
    assert directive.goal_updated_at is not None
    assert GoalHistory.objects.get(directive=directive).previous_goal.startswith("Expose /healthz returning 200")
    updated = DirectiveEvent.objects.get(directive=directive, event_type="directive_updated")
    assert updated.actor == "root"
    assert "goal" in updated.data["fields"]
    assert DirectiveEvent.objects.filter(directive=directive, event_type="goal_updated", actor="root").exists()


def test_saving_an_unchanged_directive_writes_no_event(staff, alice):
    directive = make_directive(alice)
    url = change_page(directive)
    data = form_data(staff.get(url), "directive_form")
    events_before = DirectiveEvent.objects.count()

    response = staff.post(url, {**data, "_save": "Save"})

    assert response.status_code == 302
    assert DirectiveEvent.objects.count() == events_before


def test_a_yellow_threshold_above_green_is_refused_on_the_form(staff, alice):
    directive = make_directive(alice)
    url = change_page(directive)
    data = form_data(staff.get(url), "directive_form")
    data.update(confidence_threshold_yellow="0.9", confidence_threshold_green="0.8", _save="Save")

    response = staff.post(url, data)

    assert response.status_code == 200
    assert "must not be above the green threshold" in response.content.decode()
    directive.refresh_from_db()
    assert directive.confidence_threshold_yellow == 0.5


def test_the_status_cannot_be_edited_on_the_form(staff, alice):
    directive = make_directive(alice)
    url = change_page(directive)
    data = form_data(staff.get(url), "directive_form")
    assert "status" not in data

    staff.post(url, {**data, "status": "completed", "_save": "Save"})

    directive.refresh_from_db()
    assert directive.status == Directive.Status.DRAFT


def test_a_stopped_directive_is_shown_read_only(staff, alice):
    directive = make_directive(alice)
    directive_stop(directive=directive, actor=SYSTEM)

    page = staff.get(change_page(directive))

    assert page.status_code == 200
    assert 'name="_save"' not in page.content.decode()
    assert staff.post(change_page(directive), {"title": "Renamed"}).status_code == 403


def test_a_refusal_while_saving_becomes_a_message_not_a_server_error(staff, alice, monkeypatch):
    directive = make_directive(alice)
    url = change_page(directive)
    data = form_data(staff.get(url), "directive_form")

    def refuse(**kwargs):
        raise Conflict("a failed directive cannot be edited")

    monkeypatch.setattr(directives_admin, "directive_update", refuse)
    response = staff.post(url, {**data, "title": "Renamed", "_save": "Save"}, follow=True)

    assert response.status_code == 200
    assert "Not saved: a failed directive cannot be edited" in response.content.decode()
    directive.refresh_from_db()
    assert directive.title == "Add a health endpoint"


def test_editing_a_pending_step_goes_through_step_update(staff, alice):
    directive = make_directive(alice)
    step, _ = make_steps(directive, {"name": "Design"}, {"name": "Build", "depends_on": ["Design"]})
    url = change_page(step)
    data = form_data(staff.get(url), "step_form")
    data.update(name="Design the endpoint", task_plan="Write it down first.", _save="Save")

    response = staff.post(url, data)

    assert response.status_code == 302, response.context["adminform"].form.errors
    step.refresh_from_db()
    assert (step.name, step.task_plan) == ("Design the endpoint", "Write it down first.")
    event = DirectiveEvent.objects.get(step=step, event_type="step_updated")
    assert (event.actor, event.data) == ("root", {"fields": ["name", "task_plan"]})
    assert list(step.dependents.values_list("name", flat=True)) == ["Build"]


def test_a_step_cannot_take_the_name_of_another_step(staff, alice):
    directive = make_directive(alice)
    step, _ = make_steps(directive, {"name": "Design"}, {"name": "Build"})
    url = change_page(step)
    data = form_data(staff.get(url), "step_form")

    response = staff.post(url, {**data, "name": "Build", "_save": "Save"})

    assert response.status_code == 200
    assert "the directive already has a step named" in response.content.decode()


def test_malformed_verifiers_are_refused_on_the_step_form(staff, alice):
    directive = make_directive(alice)
    [step] = make_steps(directive, {"name": "Design"})
    url = change_page(step)
    data = form_data(staff.get(url), "step_form")

    response = staff.post(url, {**data, "verifiers": "[1, 2]", "_save": "Save"})

    assert response.status_code == 200
    assert "must be a list of commands" in response.content.decode()


def test_a_running_step_is_shown_read_only(staff, alice):
    directive = make_directive(alice)
    [step] = make_steps(directive, {"name": "Design"})
    directive_start(directive=directive, actor=SYSTEM)
    for status in ("ready", "running"):
        step_transition(step=step, to=status, actor=SYSTEM)

    page = staff.get(change_page(step))

    assert 'name="_save"' not in page.content.decode()
    assert staff.post(change_page(step), {"name": "Renamed"}).status_code == 403
    step.refresh_from_db()
    assert step.name == "Design"


def test_adding_and_editing_an_order_goes_through_the_services(staff, alice):
    data = form_data(staff.get(add_page(Order)), "order_form")
    data.update(owner=str(alice.pk), title="Fix the flaky test", priority="critical", _save="Save")

    assert staff.post(add_page(Order), data).status_code == 302
    order = Order.objects.get(title="Fix the flaky test")
    assert (order.owner, order.priority, order.status) == (alice, "critical", "open")
    assert DirectiveEvent.objects.filter(subject_id=str(order.pk), event_type="order_created", actor="root").exists()

    url = change_page(order)
    data = form_data(staff.get(url), "order_form")
    assert staff.post(url, {**data, "title": "Fix the flaky login test", "_save": "Save"}).status_code == 302
    order.refresh_from_db()
    assert order.title == "Fix the flaky login test"


def test_an_order_title_cannot_be_emptied(staff, alice):
    order = make_order(alice)
    url = change_page(order)
    data = form_data(staff.get(url), "order_form")

    response = staff.post(url, {**data, "title": "", "_save": "Save"})

    assert response.status_code == 200
    order.refresh_from_db()
    assert order.title == "Fix the login redirect"
