"""Dashboard forms for directives and their steps.

Forms only parse what a browser sends into the shapes the services take
(``directive_create``/``directive_update``/``steps_add``/``step_update``);
the services validate and decide. :func:`add_service_errors` puts a
service's ``ValidationError`` next to the matching fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django import forms
from django.contrib.auth.models import Group
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db.models import Q

from directives import branches
from directives.models import AgentKind, Directive, Step

LINES_HELP = "One per line."


def split_lines(text: str) -> list[str]:
    """Non-empty, stripped lines of a textarea."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def items_from_lines(
    lines: Sequence[str], *, existing: Iterable[dict[str, Any]], text_key: str, prefix: str
) -> list[dict[str, str]]:
    """Requirements or criteria from textarea lines, keeping the ids of items whose
    text did not change: evaluations and prompts refer to items by id."""
    unused: dict[str, list[str]] = {}
    for item in existing:
        if isinstance(item, dict) and isinstance(item.get(text_key), str) and item.get("id"):
            unused.setdefault(item[text_key].strip(), []).append(str(item["id"]))
    kept = [unused[line].pop(0) if unused.get(line) else None for line in lines]
    taken = {item_id for item_id in kept if item_id}
    items: list[dict[str, str]] = []
    number = 0
    for line, item_id in zip(lines, kept, strict=True):
        if item_id is None:
            number += 1
            while f"{prefix}{number}" in taken:
                number += 1
            item_id = f"{prefix}{number}"
            taken.add(item_id)
        items.append({"id": item_id, text_key: line})
    return items


def item_lines(items: Any, *, text_key: str) -> str:
    """The textarea value for a list of requirements or criteria."""
    lines = []
    for item in items or []:
        lines.append(item.get(text_key, "") if isinstance(item, dict) else str(item))
    return "\n".join(lines)


def add_service_errors(form: forms.Form, exc: ValidationError, *, aliases: dict[str, str] | None = None) -> None:
    """Show a service's ``ValidationError`` on ``form``: keyed messages next to the
    field of that name (or its alias), the rest above the form."""
    if not hasattr(exc, "error_dict"):
        for message in exc.messages:
            form.add_error(None, message)
        return
    for key, messages in exc.message_dict.items():
        name = (aliases or {}).get(key, key)
        field = name if name in form.fields else None
        for message in messages:
            if field is None and name not in ("steps", NON_FIELD_ERRORS):
                message = f"{key}: {message}"
            form.add_error(field, message)


class TextLines(forms.Textarea):
    def __init__(self, rows: int = 4) -> None:
        super().__init__(attrs={"rows": rows})


class DirectiveForm(forms.Form):
    """Every editable field of a directive. ``team`` offers the user's own teams
    and is disabled for anyone but the owner: sharing is the owner's call."""

    title = forms.CharField(max_length=200)
    goal = forms.CharField(widget=TextLines(6))
    requirements = forms.CharField(required=False, widget=TextLines(), help_text=LINES_HELP)
    acceptance_criteria = forms.CharField(
        required=False, widget=TextLines(), help_text=LINES_HELP + " The evaluator checks each step against these."
    )
    constraints = forms.CharField(required=False, widget=TextLines(3), help_text=LINES_HELP)
    repository_url = forms.CharField(
        label="Repository URL", max_length=500, required=False, help_text="A git remote URL or a path on the daemon."
    )
    base_branch = forms.CharField(max_length=200, initial="main")
    local_path = forms.CharField(
        max_length=500, required=False, help_text="Optional: a local checkout the daemon should use."
    )
    team = forms.ModelChoiceField(
        queryset=Group.objects.none(),
        required=False,
        empty_label="Not shared",
        help_text="Members of the team can see and steer this directive.",
    )
    autonomy_level = forms.ChoiceField(
        choices=Directive.Autonomy.choices,
        initial=Directive.Autonomy.GUIDED,
        help_text="Full auto passes yellow evaluations; guided asks you; manual asks for every step.",
    )
    confidence_threshold_green = forms.FloatField(
        label="Green threshold",
        min_value=0.0,
        max_value=1.0,
        initial=0.8,
        widget=forms.NumberInput(attrs={"step": "0.05"}),
        help_text="Scores at or above pass on their own (0–1).",
    )
    confidence_threshold_yellow = forms.FloatField(
        label="Yellow threshold",
        min_value=0.0,
        max_value=1.0,
        initial=0.5,
        widget=forms.NumberInput(attrs={"step": "0.05"}),
        help_text="Scores from here up to green are marginal; below are reworked.",
    )
    max_rework_cycles = forms.IntegerField(min_value=0, initial=3)
    fail_closed = forms.BooleanField(
        required=False, help_text="Rework a step when its evaluation fails to run, instead of passing it."
    )
    evaluation_mode = forms.ChoiceField(choices=Directive.EvaluationMode.choices, initial=Directive.EvaluationMode.BOTH)
    verifiers = forms.CharField(
        required=False,
        widget=TextLines(3),
        help_text='One command per line, "auto" to detect the project\'s tests, or empty for none.',
    )
    agent = forms.ChoiceField(choices=AgentKind.choices, initial=AgentKind.CLAUDE)
    require_plan_approval = forms.BooleanField(required=False, help_text="Ask a person to approve each new plan.")
    max_total_cost_usd = forms.DecimalField(
        label="Cost limit (USD)",
        max_digits=12,
        decimal_places=4,
        min_value=0,
        required=False,
        help_text="Pause when the total cost reaches this. Empty: no limit.",
    )
    max_wall_time_minutes = forms.IntegerField(
        label="Wall-time limit (minutes)", min_value=0, required=False, help_text="Empty: no limit."
    )
    max_chain_regenerations = forms.IntegerField(
        label="Max chain regenerations", min_value=0, required=False, help_text="Empty: no limit."
    )

    LIST_FIELDS = ("requirements", "acceptance_criteria", "constraints", "verifiers")

    def __init__(self, *args: Any, user: Any, directive: Directive | None = None, **kwargs: Any) -> None:
        self.directive = directive
        if directive is not None:
            kwargs.setdefault("initial", self.initial_from(directive))
        super().__init__(*args, **kwargs)
        teams = Q(user=user)
        if directive is not None and directive.team_id:
            teams |= Q(pk=directive.team_id)  # keep the current team even when the owner has left it
        self.fields["team"].queryset = Group.objects.filter(teams).distinct().order_by("name")
        self.can_change_team = directive is None or directive.owner_id == user.pk
        if not self.can_change_team:
            self.fields["team"].disabled = True
            self.fields["team"].help_text = "Only the owner can change who the directive is shared with."

    @staticmethod
    def initial_from(directive: Directive) -> dict[str, Any]:
        initial = {name: getattr(directive, name) for name in DIRECTIVE_FORM_FIELDS if name not in ("team",)}
        initial["team"] = directive.team_id
        initial["requirements"] = item_lines(directive.requirements, text_key="description")
        initial["acceptance_criteria"] = item_lines(directive.acceptance_criteria, text_key="criterion")
        initial["constraints"] = "\n".join(str(c) for c in directive.constraints or [])
        verifiers = directive.verifiers
        initial["verifiers"] = verifiers if isinstance(verifiers, str) else "\n".join(verifiers or [])
        return initial

    def clean_base_branch(self) -> str:
        value = self.cleaned_data["base_branch"].strip()
        if not branches.is_branch_name(value):
            raise ValidationError(branches.RULE)
        return value

    def clean_verifiers(self) -> Any:
        lines = split_lines(self.cleaned_data.get("verifiers", ""))
        if "auto" in lines and len(lines) > 1:
            raise ValidationError('"auto" detects the commands itself: put it alone, or list the commands instead.')
        return "auto" if lines == ["auto"] else lines

    def service_fields(self) -> dict[str, Any]:
        """The cleaned data in the shapes ``directive_create``/``directive_update`` take."""
        data = dict(self.cleaned_data)
        existing = self.directive
        data["requirements"] = items_from_lines(
            split_lines(data["requirements"]),
            existing=existing.requirements if existing else [],
            text_key="description",
            prefix="R",
        )
        data["acceptance_criteria"] = items_from_lines(
            split_lines(data["acceptance_criteria"]),
            existing=existing.acceptance_criteria if existing else [],
            text_key="criterion",
            prefix="AC",
        )
        data["constraints"] = split_lines(data["constraints"])
        if not self.can_change_team:
            data.pop("team")
        return data


DIRECTIVE_FORM_FIELDS = tuple(DirectiveForm.base_fields)


class StepDependenciesField(forms.MultipleChoiceField):
    """Steps this one depends on, as ids. Any value is accepted here: the service
    resolves them and refuses unknown ones, with the same message as the API."""

    widget = forms.CheckboxSelectMultiple

    def valid_value(self, value: Any) -> bool:
        return True


class StepForm(forms.Form):
    """Add or edit one step of a hand-authored chain."""

    name = forms.CharField(max_length=200)
    description = forms.CharField(required=False, widget=TextLines(3))
    task_plan = forms.CharField(
        required=False, widget=TextLines(5), help_text="What the agent should do: the heart of its prompt."
    )
    step_type = forms.ChoiceField(choices=Step.StepType.choices, initial=Step.StepType.TASK)
    order_index = forms.IntegerField(
        label="Phase (order index)",
        min_value=0,
        initial=0,
        help_text="A step waits for every step of a lower phase as well as for its dependencies.",
    )
    depends_on = StepDependenciesField(
        required=False,
        help_text="The step continues from the first one's work (in this list's order) and merges the others.",
    )

    def __init__(self, *args: Any, steps: Sequence[Step], step: Step | None = None, **kwargs: Any) -> None:
        self.step = step
        current: list[str] = []
        if step is not None:
            current = [str(link.depends_on_id) for link in step.dependency_links.all()]
            kwargs.setdefault(
                "initial",
                {
                    "name": step.name,
                    "description": step.description,
                    "task_plan": step.task_plan,
                    "step_type": step.step_type,
                    "order_index": step.order_index,
                    "depends_on": current,
                },
            )
        kwargs.setdefault("prefix", f"step-{step.pk}" if step is not None else "new")
        super().__init__(*args, **kwargs)
        # The current dependencies first, in their order, so that an edit keeps it.
        others = [s for s in steps if step is None or (s.pk != step.pk and str(s.pk) not in current)]
        by_id = {str(s.pk): s for s in steps}
        ordered = [by_id[pk] for pk in current if pk in by_id] + others
        self.fields["depends_on"].choices = [(str(s.pk), s.name) for s in ordered]

    def service_fields(self) -> dict[str, Any]:
        """Keyword arguments for ``StepSpec`` and ``step_update``."""
        data = dict(self.cleaned_data)
        data["depends_on"] = list(data.get("depends_on") or [])
        return data


class DirectiveFilterForm(forms.Form):
    """The directive list's filters (GET)."""

    status = forms.ChoiceField(choices=[("", "Any status"), *Directive.Status.choices], required=False)
    team = forms.ModelChoiceField(queryset=Group.objects.none(), required=False, empty_label="Any team")

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["team"].queryset = user.groups.order_by("name")
