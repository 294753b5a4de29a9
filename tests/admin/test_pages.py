"""Every admin page opens and shows its data; links lead to related rows."""

from __future__ import annotations

import pytest
from django.db import models
from django.urls import reverse

from contracts.models import Task
from daemons.models import ApiToken
from directives.models import Directive, DirectiveEvent, Order
from tests.admin.helpers import (
    EVERY_MODEL,
    SHOWN,
    add_page,
    build_world,
    change_page,
    changelist,
    model_id,
)
from tests.factories import make_directive

pytestmark = pytest.mark.django_db

ADDABLE = {Directive, Order}


def test_every_model_is_registered_in_the_admin():
    from django.contrib import admin

    assert [model_id(m) for m in EVERY_MODEL if m not in admin.site._registry] == []


@pytest.mark.parametrize("model", EVERY_MODEL, ids=model_id)
def test_every_changelist_renders_with_data(staff, alice, model):
    build_world(alice)

    response = staff.get(changelist(model))

    assert response.status_code == 200
    assert SHOWN[model][0] in response.content.decode()


@pytest.mark.parametrize("model", EVERY_MODEL, ids=model_id)
def test_every_change_page_renders_with_data(staff, alice, model):
    world = build_world(alice)

    response = staff.get(change_page(world.row(model)))

    assert response.status_code == 200
    assert SHOWN[model][1] in response.content.decode()


@pytest.mark.parametrize("model", sorted(ADDABLE, key=model_id), ids=model_id)
def test_the_add_page_opens_for_models_that_allow_add(staff, model):
    assert staff.get(add_page(model)).status_code == 200


@pytest.mark.parametrize("model", [m for m in EVERY_MODEL if m not in ADDABLE], ids=model_id)
def test_models_written_only_by_services_cannot_be_added(staff, model):
    assert staff.get(add_page(model)).status_code == 403


@pytest.mark.parametrize("model", EVERY_MODEL, ids=model_id)
def test_nothing_can_be_deleted_from_the_admin(staff, alice, model):
    world = build_world(alice)
    obj = world.row(model)
    url = reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_delete", args=[obj.pk])

    assert staff.get(url).status_code == 403
    assert "delete_selected" not in staff.get(changelist(model)).content.decode()


@pytest.mark.parametrize("model", EVERY_MODEL, ids=model_id)
def test_a_changelist_search_finds_its_row(staff, alice, bob, model):
    build_world(alice, 0)
    build_world(bob, 1)

    response = staff.get(changelist(model), {"q": SHOWN[model][0]})

    assert response.status_code == 200
    assert response.context["cl"].result_count >= 1


def test_a_search_for_an_id_finds_that_row_and_its_children(staff, alice):
    world = build_world(alice)
    build_world(alice, 1)

    directives = staff.get(changelist(Directive), {"q": str(world.directive.pk)}).context["cl"]
    tasks = staff.get(changelist(Task), {"q": str(world.directive.pk)}).context["cl"]

    assert list(directives.result_list) == [world.directive]
    assert list(tasks.result_list) == [world.task]


def test_staff_see_every_owners_rows(staff, alice, bob):
    make_directive(alice, title="Alice's directive")
    make_directive(bob, title="Bob's directive")

    html = staff.get(changelist(Directive)).content.decode()

    assert "Alice&#x27;s directive" in html
    assert "Bob&#x27;s directive" in html


def test_people_who_are_not_staff_are_sent_to_the_login_page(client, alice):
    client.force_login(alice)

    response = client.get(changelist(Directive))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_a_step_page_links_to_its_directive_chain_and_execution_task(staff, alice):
    world = build_world(alice)

    html = staff.get(change_page(world.design)).content.decode()

    for related in (world.directive, world.chain, world.task, world.contract, world.build):
        assert f'href="{change_page(related)}"' in html


def test_a_task_page_links_to_its_contract_directive_step_and_daemon(staff, alice):
    world = build_world(alice)

    html = staff.get(change_page(world.task)).content.decode()

    for related in (world.contract, world.directive, world.design, world.daemon):
        assert f'href="{change_page(related)}"' in html


def test_changelist_columns_link_to_related_rows(staff, alice):
    world = build_world(alice)

    steps = staff.get(changelist(type(world.design))).content.decode()
    tasks = staff.get(changelist(Task)).content.decode()

    assert f'href="{change_page(world.directive)}"' in steps
    assert f'href="{change_page(world.task)}"' in steps
    for related in (world.daemon, world.directive, world.design):
        assert f'href="{change_page(related)}"' in tasks


def test_the_directive_page_links_to_its_whole_event_log(staff, alice):
    world = build_world(alice)
    count = DirectiveEvent.objects.filter(directive=world.directive).count()

    html = staff.get(change_page(world.directive)).content.decode()

    log = f"{changelist(DirectiveEvent)}?directive__id__exact={world.directive.pk}"
    assert f'<a href="{log}">All {count} events</a>' in html
    response = staff.get(log)
    assert response.status_code == 200
    assert response.context["cl"].result_count == count


def test_token_digests_are_never_shown(staff, alice):
    world = build_world(alice)
    digests = list(ApiToken.objects.values_list("digest", flat=True))

    pages = [
        staff.get(changelist(ApiToken)).content.decode(),
        staff.get(change_page(world.token)).content.decode(),
        staff.get(change_page(world.task_token)).content.decode(),
    ]

    assert digests
    for html in pages:
        assert "digest" not in html.lower()
        for digest in digests:
            assert digest not in html


def test_the_token_list_says_where_tokens_are_minted(staff):
    assert "createapikey" in staff.get(changelist(ApiToken)).content.decode()


def test_audit_rows_are_shown_without_any_save_button(staff, alice):
    world = build_world(alice)
    rows: list[models.Model] = [world.event, world.output, world.token, world.task, world.evaluation]

    for row in rows:
        html = staff.get(change_page(row)).content.decode()
        assert 'name="_save"' not in html, row
        assert staff.post(change_page(row), {}).status_code == 403, row
