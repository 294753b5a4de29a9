"""Forms of the orders board. They only parse input: orders change through
``directives.services.order_*``."""

from __future__ import annotations

from typing import Any

from django import forms

from directives.models import Directive, Order
from directives.selectors import directives_visible_to


class OrderForm(forms.Form):
    title = forms.CharField(max_length=200)
    description = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 6}),
        help_text="What the planner needs to know to turn this into steps.",
    )
    priority = forms.ChoiceField(choices=Order.Priority.choices, initial=Order.Priority.MEDIUM)
    order_type = forms.ChoiceField(label="Type", choices=Order.OrderType.choices, initial=Order.OrderType.FEATURE)

    def clean_title(self) -> str:
        title = self.cleaned_data["title"].strip()
        if not title:
            raise forms.ValidationError("Give the order a title.")
        return title

    @classmethod
    def for_order(cls, order: Order) -> OrderForm:
        return cls(
            initial={
                "title": order.title,
                "description": order.description,
                "priority": order.priority,
                "order_type": order.order_type,
            }
        )


def linkable_directives(user: Any) -> Any:
    """Directives the user may see that can still take orders."""
    return (
        directives_visible_to(user)
        .exclude(status__in=Directive.TERMINAL)
        .only("id", "title", "status")
        .order_by("title", "pk")
    )


class DirectiveChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: Directive) -> str:
        return f"{obj.title} ({obj.get_status_display()})"


class OrderLinkForm(forms.Form):
    directive = DirectiveChoiceField(
        queryset=Directive.objects.none(),
        empty_label="Choose a directive…",
        error_messages={"invalid_choice": "Choose one of your directives that is not finished."},
    )

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["directive"].queryset = linkable_directives(user)
