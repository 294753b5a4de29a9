from __future__ import annotations

from directives.models import Step
from tests.factories import make_directive, make_steps


def test_a_diamond_plan_can_be_authored(alice):
    directive = make_directive(alice)
    _a, _b, _c, d = make_steps(
        directive,
        {"name": "A"},
        {"name": "B", "depends_on": ["A"]},
        {"name": "C", "depends_on": ["A"]},
        {"name": "D", "depends_on": ["C", "B"]},
    )
    assert [s.name for s in d.depends_on.order_by("dependent_links__position")] == ["C", "B"]
    assert Step.objects.filter(directive=directive).count() == 4
