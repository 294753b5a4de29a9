"""Agent text is untrusted: the admin shows it escaped everywhere."""

from __future__ import annotations

import pytest

from contracts.models import Task
from contracts.services import task_output_append
from directives.models import Chain, Directive, Step, StepDependency
from directives.services import directive_start, step_transition
from makima.state import SYSTEM
from tests.admin.helpers import change_page, changelist, run_action
from tests.factories import make_directive, make_evaluation, make_steps, make_task

pytestmark = pytest.mark.django_db

SCRIPT = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


@pytest.fixture
def hostile(alice):
    """A directive whose planner named a step (and so its task) with a script tag."""
    directive = make_directive(alice, title="Plain title")
    first, _ = make_steps(directive, {"name": SCRIPT}, {"name": "After it", "depends_on": [SCRIPT]})
    task = make_task(directive, step=first)
    task_output_append(task=task, items=[{"seq": 1, "content": SCRIPT}])
    make_evaluation(first, summary_feedback=SCRIPT)
    return first


def assert_escaped(html: str) -> None:
    assert SCRIPT not in html
    assert ESCAPED in html


@pytest.mark.parametrize("model", [Step, StepDependency, Task], ids=lambda m: m._meta.model_name)
def test_a_script_in_a_step_name_is_escaped_on_changelists(staff, hostile, model):
    assert_escaped(staff.get(changelist(model)).content.decode())


def test_a_script_in_a_step_name_is_escaped_on_its_change_page(staff, hostile):
    assert_escaped(staff.get(change_page(hostile)).content.decode())


def test_agent_text_is_escaped_on_the_pages_that_show_it(staff, hostile):
    task = Task.objects.get(step=hostile)
    pages = [
        change_page(Chain.objects.get(directive=hostile.directive)),  # the steps inline
        change_page(Directive.objects.get(pk=hostile.directive_id)),  # the evaluations inline
        change_page(task),  # its name and the output inline
        change_page(Step.objects.get(name="After it")),  # the dependency inline
        change_page(hostile.last_evaluation),
    ]
    for url in pages:
        assert_escaped(staff.get(url).content.decode())


def test_a_refusal_message_naming_a_hostile_step_is_escaped(staff, hostile):
    directive_start(directive=hostile.directive, actor=SYSTEM)
    for status in ("ready", "running", "evaluating", "passed"):
        step_transition(step=hostile, to=status, actor=SYSTEM)

    response = run_action(staff, Step, "skip_steps", hostile)

    html = response.content.decode()
    assert_escaped(html)
    assert f"Could not skip “{ESCAPED}”" in html
