"""Admin pages cost a fixed number of queries, however many rows they show."""

from __future__ import annotations

import pytest
from django.db import connection, models
from django.test import Client
from django.test.utils import CaptureQueriesContext

from contracts.models import Task, TaskOutput
from contracts.services import task_output_append
from directives.models import DirectiveEvent
from directives.services import event_record
from tests.admin.helpers import EVERY_MODEL, build_world, change_page, changelist, model_id

pytestmark = pytest.mark.django_db


def queries_for(client: Client, url: str) -> tuple[int, object]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200
    return len(captured), response


@pytest.mark.parametrize("model", EVERY_MODEL, ids=model_id)
def test_changelist_queries_do_not_grow_with_the_number_of_rows(staff, alice, bob, model):
    url = changelist(model)
    for index in range(2):
        build_world(alice if index % 2 else bob, index)
    staff.get(url)  # the first request fills per-process caches (content types, the session)
    few, response = queries_for(staff, url)
    rows_few = response.context["cl"].result_count

    for index in range(2, 20):
        build_world(alice if index % 2 else bob, index)
    many, response = queries_for(staff, url)

    assert response.context["cl"].result_count >= 10 * rows_few
    assert many == few, f"{model_id(model)}: {few} queries for {rows_few} rows, {many} for 10× as many"


def test_the_directive_page_shows_only_the_newest_events_and_links_to_the_rest(staff, alice):
    world = build_world(alice)
    for n in range(60):
        event_record(directive_id=world.directive.pk, event_type=f"filler_{n}")
    total = DirectiveEvent.objects.filter(directive=world.directive).count()

    response = staff.get(change_page(world.directive))

    events = next(f for f in response.context["inline_admin_formsets"] if f.formset.model is DirectiveEvent)
    shown = [form.instance.pk for form in events.formset.forms]
    newest = list(
        DirectiveEvent.objects.filter(directive=world.directive).order_by("-id").values_list("id", flat=True)[:50]
    )
    assert shown == newest
    html = response.content.decode()
    assert f"Showing 50 of {total}." in html
    assert f"View all {total} directive events" in html
    assert f"?directive__id__exact={world.directive.pk}" in html


def test_the_task_page_shows_the_tail_of_its_output_oldest_line_first(staff, alice):
    world = build_world(alice)
    task_output_append(task=world.task, items=[{"seq": seq, "content": f"line {seq}"} for seq in range(3, 251)])

    response = staff.get(change_page(world.task))

    output = next(f for f in response.context["inline_admin_formsets"] if f.formset.model is TaskOutput)
    assert [form.instance.seq for form in output.formset.forms] == list(range(51, 251))
    html = response.content.decode()
    assert "line 250" in html
    assert "line 50<" not in html
    assert f"?task__id__exact={world.task.pk}" in html


def test_the_task_pages_output_shows_which_attempt_wrote_each_line(staff, alice):
    world = build_world(alice)  # attempt 1 wrote lines 1 and 2
    Task.objects.filter(pk=world.task.pk).update(attempt=2)
    world.task.refresh_from_db()
    task_output_append(task=world.task, items=[{"seq": seq, "content": f"retry line {seq}"} for seq in (1, 2)])

    response = staff.get(change_page(world.task))

    output = next(f for f in response.context["inline_admin_formsets"] if f.formset.model is TaskOutput)
    assert [(form.instance.attempt, form.instance.seq) for form in output.formset.forms] == [
        (1, 1),
        (1, 2),
        (2, 1),
        (2, 2),
    ]
    assert "attempt" in [field["label"].lower() for field in output.fields()]
    assert "retry line 2" in response.content.decode()


def test_change_pages_with_long_histories_cost_no_more_queries_than_short_ones(staff, alice):
    short_world = build_world(alice, 0)
    long_world = build_world(alice, 1)
    for n in range(300):
        event_record(directive_id=long_world.directive.pk, event_type=f"filler_{n}")
    task_output_append(task=long_world.task, items=[{"seq": seq, "content": "x"} for seq in range(3, 303)])
    staff.get(change_page(short_world.directive))  # fill per-process caches

    pairs: list[tuple[models.Model, models.Model]] = [
        (short_world.directive, long_world.directive),
        (short_world.task, long_world.task),
    ]
    for short_row, long_row in pairs:
        few, _ = queries_for(staff, change_page(short_row))
        lots, _ = queries_for(staff, change_page(long_row))
        # Only the COUNT(*) behind the "view all" link is added once an inline is cut short.
        assert lots - few in (0, 1), f"{model_id(type(short_row))}: {few} → {lots} queries"
