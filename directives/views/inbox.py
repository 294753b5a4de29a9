"""The approvals inbox: pending approvals across every directive the user may see,
answered through the same services as the API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import F, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render
from django.urls import path, reverse
from django.views.decorators.http import require_GET, require_POST

from directives.models import ApprovalRequest
from directives.selectors import approvals_visible_to
from directives.services import approval_approve, approval_deny
from directives.views.common import evaluation_rows, redirect_back, refusal_text
from makima.errors import DomainError
from makima.state import Actor

PAGE_SIZE = 25
TABS = ("pending", "answered")
NOTE_MAX_LENGTH = 20_000


class ApprovalAnswerForm(forms.Form):
    """The reviewer's note. Denying needs one: it becomes the rework instructions
    of a step, or the planner's brief for the next plan."""

    note = forms.CharField(required=False, max_length=NOTE_MAX_LENGTH, widget=forms.Textarea(attrs={"rows": 3}))

    def __init__(self, *args: Any, deny: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deny = deny

    def clean_note(self) -> str:
        note = self.cleaned_data["note"].strip()
        if self.deny and not note:
            raise ValidationError("Say what should change: the note becomes the instructions for the rework.")
        return note


def _inbox_queryset(user: Any, tab: str) -> QuerySet[ApprovalRequest]:
    queryset = approvals_visible_to(user).select_related(
        "directive", "step", "evaluation", "step__last_evaluation", "responded_by"
    )
    if tab == "pending":
        return queryset.filter(status=ApprovalRequest.Status.PENDING).order_by("-created_at", "-pk")
    return queryset.exclude(status=ApprovalRequest.Status.PENDING).order_by(
        F("responded_at").desc(nulls_last=True), "-updated_at", "-pk"
    )


def _tab(request: HttpRequest) -> str:
    tab = request.GET.get("status", "pending")
    return tab if tab in TABS else "pending"


def _render_inbox(
    request: HttpRequest,
    *,
    tab: str = "pending",
    failed: ApprovalRequest | None = None,
    failed_form: ApprovalAnswerForm | None = None,
    status: int = 200,
) -> HttpResponse:
    page = Paginator(_inbox_queryset(request.user, tab), PAGE_SIZE).get_page(request.GET.get("page"))
    approvals = list(page.object_list)
    for approval in approvals:
        # The evaluation that asked for the review; older requests only have the step's latest one.
        approval.shown_evaluation = approval.evaluation or (approval.step.last_evaluation if approval.step else None)
        if approval.shown_evaluation is not None:
            evaluation_rows(approval.shown_evaluation)
        approval.failed_form = failed_form if failed is not None and failed.pk == approval.pk else None
    return render(
        request,
        "approvals/inbox.html",
        {
            "nav": "approvals",
            "tab": tab,
            "page": page,
            "approvals": approvals,
            "note_max_length": NOTE_MAX_LENGTH,
        },
        status=status,
    )


@login_required
@require_GET
def approval_inbox(request: HttpRequest) -> HttpResponse:
    return _render_inbox(request, tab=_tab(request))


def _answer(
    request: HttpRequest,
    pk: Any,
    *,
    service: Callable[..., ApprovalRequest],
    deny: bool,
) -> HttpResponse:
    approval = get_object_or_404(approvals_visible_to(request.user).select_related("responded_by"), pk=pk)
    was_pending = approval.status == ApprovalRequest.Status.PENDING
    form = ApprovalAnswerForm(request.POST, deny=deny and was_pending)
    if not form.is_valid():
        messages.error(request, " ".join(form.errors.get("note", [])) or "The note is not valid.")
        return _render_inbox(request, failed=approval, failed_form=form, status=400)
    try:
        service(approval=approval, actor=Actor.for_user(request.user), note=form.cleaned_data["note"])
    except (DomainError, ValidationError) as exc:
        answered = _answered(approval) if approval.status != ApprovalRequest.Status.PENDING else "Nothing changed."
        messages.error(request, f"{refusal_text(exc)}. {answered}")
        return redirect_back(request, reverse("approval-inbox"))
    if not was_pending or approval.responded_at is None:
        # The guarded transition was a no-op: it was (or just got) answered the same way.
        if was_pending:
            approval.refresh_from_db()
        messages.error(request, _answered(approval))
    elif deny:
        messages.success(request, f"Denied: {approval}. It goes back with your note.")
    else:
        messages.success(request, f"Approved: {approval}.")
    return redirect_back(request, reverse("approval-inbox"))


def _answered(approval: ApprovalRequest) -> str:
    who = f" by {approval.responded_by.get_username()}" if approval.responded_by else ""
    return f"This approval was already {approval.status}{who}; nothing changed."


@login_required
@require_POST
def approval_approve_view(request: HttpRequest, pk: Any) -> HttpResponse:
    return _answer(request, pk, service=approval_approve, deny=False)


@login_required
@require_POST
def approval_deny_view(request: HttpRequest, pk: Any) -> HttpResponse:
    return _answer(request, pk, service=approval_deny, deny=True)


@login_required
@require_GET
def approval_badge(request: HttpRequest) -> HttpResponse:
    """The navigation bar's pending-approvals badge alone: live pages refresh it
    with their other regions, so a step that starts waiting shows at once."""
    return render(request, "includes/approvals_badge.html")


urlpatterns = [
    path("approvals/", approval_inbox, name="approval-inbox"),
    path("approvals/badge/", approval_badge, name="approval-badge"),
    path("approvals/<uuid:pk>/approve/", approval_approve_view, name="approval-approve"),
    path("approvals/<uuid:pk>/deny/", approval_deny_view, name="approval-deny"),
]
