"""The chain editor: authoring the steps of a draft directive by hand."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from directives.models import Directive, Step, StepDependency
from directives.services import directive_start
from makima.state import SYSTEM
from tests.factories import make_directive, make_steps

pytestmark = pytest.mark.django_db

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"


def chain_url(directive: Directive) -> str:
    return reverse("directive-chain", args=[directive.pk])


def add_url(directive: Directive) -> str:
    return reverse("chain-step-add", args=[directive.pk])


def edit_url(step: Step) -> str:
    return reverse("chain-step-edit", args=[step.directive_id, step.pk])


def remove_url(step: Step) -> str:
    return reverse("chain-step-remove", args=[step.directive_id, step.pk])


def new_step(**fields: Any) -> dict[str, Any]:
    data = {"name": "Write tests", "description": "", "task_plan": "Add tests.", "step_type": "test", "order_index": 0}
    data.update(fields)
    return {f"new-{k}": v for k, v in data.items()}


def edited(step: Step, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": step.name,
        "description": step.description,
        "task_plan": step.task_plan,
        "step_type": step.step_type,
        "order_index": step.order_index,
        "depends_on": [str(pk) for pk in step.dependency_links.values_list("depends_on_id", flat=True)],
    }
    data.update(fields)
    return {f"step-{step.pk}-{k}": v for k, v in data.items()}


def dependency_names(step: Step) -> list[str]:
    return list(
        StepDependency.objects.filter(step=step).order_by("position").values_list("depends_on__name", flat=True)
    )


def texts(response) -> list[str]:
    return [str(m) for m in get_messages(response.wsgi_request)]


@pytest.fixture
def draft(alice, platform):
    return make_directive(alice, team=platform)


@pytest.fixture
def ab(draft):
    """Steps A and B (B depends on A)."""
    return make_steps(draft, {"name": "A"}, {"name": "B", "depends_on": ["A"]})


# --------------------------------------------------------------------------- permissions


def test_an_anonymous_visitor_is_sent_to_sign_in(client, draft):
    response = client.get(chain_url(draft))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert client.post(add_url(draft), new_step()).status_code == 302
    assert not Step.objects.exists()


def test_the_owner_sees_the_steps_and_their_dependencies(client_as, alice, draft, ab):
    response = client_as(alice).get(chain_url(draft))
    assert response.status_code == 200
    assert [s.name for s in response.context["steps"]] == ["A", "B"]
    html = response.content.decode()
    assert "<strong>B</strong>" in html
    assert response.context["add_form"] is not None


def test_a_teammate_may_author_the_steps_of_a_shared_draft(client_as, carol, draft):
    client = client_as(carol)
    assert client.get(chain_url(draft)).status_code == 200
    assert client.post(add_url(draft), new_step()).status_code == 302
    assert draft.steps.filter(name="Write tests").exists()


def test_a_stranger_gets_404_and_changes_nothing(client_as, bob, draft, ab):
    a, b = ab
    client = client_as(bob)
    assert client.get(chain_url(draft)).status_code == 404
    assert client.post(add_url(draft), new_step()).status_code == 404
    assert client.post(edit_url(a), edited(a, name="Mine")).status_code == 404
    assert client.post(remove_url(b)).status_code == 404
    assert sorted(draft.steps.values_list("name", flat=True)) == ["A", "B"]


def test_changes_need_a_post(client_as, alice, draft, ab):
    assert client_as(alice).get(remove_url(ab[1])).status_code == 405
    assert draft.steps.count() == 2


# --------------------------------------------------------------------------- add / edit / remove


def test_adding_a_step_with_dependencies_keeps_their_order(client_as, alice, draft, ab):
    a, b = ab
    response = client_as(alice).post(
        add_url(draft), new_step(name="C", order_index=1, depends_on=[str(b.pk), str(a.pk)])
    )
    assert response.status_code == 302
    assert response["Location"] == chain_url(draft)
    step = draft.steps.get(name="C")
    assert (step.step_type, step.order_index, step.task_plan) == ("test", 1, "Add tests.")
    assert dependency_names(step) == ["B", "A"]
    assert texts(response) == ["Step “C” added."]


def test_the_first_step_of_a_draft_starts_a_hand_authored_chain(client_as, alice, draft):
    client_as(alice).post(add_url(draft), new_step(name="First"))
    draft.refresh_from_db()
    step = draft.steps.get()
    assert step.chain_id == draft.current_chain_id


def test_editing_a_step_changes_its_fields_and_dependencies(client_as, alice, draft, ab):
    a, b = ab
    c = make_steps(draft, {"name": "C"})[0]
    response = client_as(alice).post(
        edit_url(b), edited(b, name="B2", description="More", depends_on=[str(c.pk), str(a.pk)])
    )
    assert response.status_code == 302
    b.refresh_from_db()
    assert (b.name, b.description) == ("B2", "More")
    assert dependency_names(b) == ["C", "A"]


def test_the_edit_form_lists_current_dependencies_first_in_their_order(client_as, alice, draft):
    a, b, c = make_steps(draft, {"name": "A"}, {"name": "B"}, {"name": "C", "depends_on": ["B", "A"]})
    response = client_as(alice).get(chain_url(draft), {"edit": str(c.pk)})
    form = response.context["edit_form"]
    assert [label for _, label in form.fields["depends_on"].choices] == ["B", "A"]
    assert form.initial["depends_on"] == [str(b.pk), str(a.pk)]
    assert 'id="edit-step"' in response.content.decode()


def test_removing_a_step(client_as, alice, draft, ab):
    response = client_as(alice).post(remove_url(ab[1]))
    assert response.status_code == 302
    assert list(draft.steps.values_list("name", flat=True)) == ["A"]
    assert texts(response) == ["Step “B” removed."]


def test_a_step_others_depend_on_cannot_be_removed(client_as, alice, draft, ab):
    response = client_as(alice).post(remove_url(ab[0]), follow=True)
    assert "step &#x27;A&#x27; cannot be removed while other steps depend on it: &#x27;B&#x27;" in (
        response.content.decode()
    )
    assert draft.steps.count() == 2


# --------------------------------------------------------------------------- refusals


def test_a_cycle_is_refused_with_the_services_message_and_nothing_changes(client_as, alice, draft, ab):
    a, b = ab
    response = client_as(alice).post(edit_url(a), edited(a, name="A renamed", depends_on=[str(b.pk)]))
    assert response.status_code == 200
    form = response.context["edit_form"]
    assert form.errors["depends_on"] in (
        ["dependency cycle: 'A' → 'B' → 'A'"],
        ["dependency cycle: 'B' → 'A' → 'B'"],
    )
    assert "dependency cycle: &#x27;" in response.content.decode()
    a.refresh_from_db()
    assert a.name == "A"
    assert dependency_names(a) == []
    assert dependency_names(b) == ["A"]


def test_an_unknown_dependency_is_refused_and_nothing_is_created(client_as, alice, draft, ab):
    ghost = uuid.uuid4()
    response = client_as(alice).post(add_url(draft), new_step(name="C", depends_on=[str(ghost)]))
    assert response.status_code == 200
    assert response.context["add_form"].non_field_errors() == [f"step 'C': unknown dependency '{ghost}'"]
    assert f"unknown dependency &#x27;{ghost}&#x27;" in response.content.decode()
    assert not draft.steps.filter(name="C").exists()


def test_a_dependency_on_another_directives_step_is_refused(client_as, alice, draft):
    elsewhere = make_steps(make_directive(alice, title="Other"), {"name": "X"})[0]
    response = client_as(alice).post(add_url(draft), new_step(name="C", depends_on=[str(elsewhere.pk)]))
    assert "belongs to another directive" in response.content.decode()
    assert not draft.steps.exists()


def test_a_duplicate_name_is_refused_and_nothing_is_created(client_as, alice, draft, ab):
    response = client_as(alice).post(add_url(draft), new_step(name="A"))
    assert response.context["add_form"].non_field_errors() == [
        "step 'A': the directive already has a step with this name"
    ]
    assert draft.steps.count() == 2


def test_renaming_onto_an_existing_name_is_refused_next_to_the_name(client_as, alice, draft, ab):
    b = ab[1]
    response = client_as(alice).post(edit_url(b), edited(b, name="A"))
    assert response.context["edit_form"].errors["name"] == ["the directive already has a step named 'A'"]
    b.refresh_from_db()
    assert b.name == "B"


def test_an_empty_name_is_refused_next_to_the_field(client_as, alice, draft):
    response = client_as(alice).post(add_url(draft), new_step(name=""))
    assert "name" in response.context["add_form"].errors
    assert not draft.steps.exists()


# --------------------------------------------------------------------------- other statuses


def test_a_started_directive_is_shown_read_only(client_as, alice, draft, ab):
    directive_start(directive=draft, actor=SYSTEM)
    response = client_as(alice).get(chain_url(draft), {"edit": str(ab[0].pk)})
    assert response.context["add_form"] is None
    assert response.context["edit_form"] is None
    html = response.content.decode()
    assert "its steps are shown read-only" in html
    assert "Start directive" not in html
    assert remove_url(ab[1]) not in html


def test_a_started_directive_refuses_changes_with_a_message(client_as, alice, draft, ab):
    directive_start(directive=draft, actor=SYSTEM)
    a, b = ab
    client = client_as(alice)
    for response in (
        client.post(add_url(draft), new_step(name="C")),
        client.post(edit_url(a), edited(a, name="A2")),
        client.post(remove_url(b)),
    ):
        assert response.status_code == 302
        assert texts(response)[-1] == "Steps can be authored here only while the directive is a draft; it is active."
    assert sorted(draft.steps.values_list("name", flat=True)) == ["A", "B"]


def test_a_draft_offers_to_start_through_the_directive_action(client_as, alice, draft, ab):
    html = client_as(alice).get(chain_url(draft)).content.decode()
    assert f'action="{reverse("directive-action", args=[draft.pk, "start"])}"' in html
    assert "Start directive" in html


def test_an_empty_draft_says_how_to_begin(client_as, alice, draft):
    html = client_as(alice).get(chain_url(draft)).content.decode()
    assert "No steps yet." in html
    assert "an agent will plan the steps" in html


# --------------------------------------------------------------------------- escaping and queries


def test_hostile_step_names_and_descriptions_are_escaped(client_as, alice, draft):
    make_steps(draft, {"name": SCRIPT, "description": IMG}, {"name": "After", "depends_on": [SCRIPT]})
    html = client_as(alice).get(chain_url(draft)).content.decode()
    assert SCRIPT not in html
    assert IMG not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_a_hostile_step_name_is_escaped_in_the_success_message(client_as, alice, draft):
    response = client_as(alice).post(add_url(draft), new_step(name=SCRIPT), follow=True)
    html = response.content.decode()
    assert SCRIPT not in html
    assert "Step “&lt;script&gt;alert(1)&lt;/script&gt;” added." in html


def test_the_editor_takes_a_constant_number_of_queries(client_as, alice, draft, django_assert_max_num_queries):
    make_steps(draft, *({"name": f"S{i}", "depends_on": [f"S{i - 1}"] if i else []} for i in range(40)))
    client = client_as(alice)
    with django_assert_max_num_queries(7):
        response = client.get(chain_url(draft))
    assert len(response.context["steps"]) == 40
