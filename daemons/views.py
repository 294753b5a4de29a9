"""Dashboard pages of daemons (the user's worker machines) and API keys."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path, reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.views.decorators.http import require_GET, require_POST

from contracts.models import Task
from contracts.selectors import tasks_visible_to
from daemons.forms import TokenCreateForm
from daemons.models import ApiToken
from daemons.selectors import daemons_visible_to, tokens_visible_to
from daemons.services import NewToken, token_create, token_revoke
from makima.state import Actor


@login_required
@require_GET
def daemon_list(request: HttpRequest) -> HttpResponse:
    running = (
        tasks_visible_to(request.user)
        .filter(status__in=list(Task.ON_DAEMON))
        .select_related("directive", "step")
        .order_by("started_at", "created_at")
    )
    daemons = list(
        daemons_visible_to(request.user).prefetch_related(Prefetch("tasks", queryset=running, to_attr="running_tasks"))
    )
    return render(
        request,
        "daemons/list.html",
        {
            "nav": "daemons",
            "daemons": daemons,
            "server_url": settings.MAKIMA_PUBLIC_URL,
            "connected_count": sum(1 for d in daemons if d.status == d.Status.CONNECTED),
        },
    )


def _render_keys(
    request: HttpRequest, *, form: TokenCreateForm | None = None, new_token: NewToken | None = None, status: int = 200
) -> HttpResponse:
    tokens = tokens_visible_to(request.user).prefetch_related(
        Prefetch("daemons", queryset=daemons_visible_to(request.user), to_attr="used_by")
    )
    return render(
        request,
        "keys/list.html",
        {
            "nav": "keys",
            "tokens": tokens.order_by("-created_at", "-pk"),
            "form": form or TokenCreateForm(),
            "new_token": new_token,
            "now": timezone.now(),
            "server_url": settings.MAKIMA_PUBLIC_URL,
        },
        status=status,
    )


@login_required
@require_GET
def apikey_list(request: HttpRequest) -> HttpResponse:
    return _render_keys(request)


@login_required
@require_POST
def apikey_create(request: HttpRequest) -> HttpResponse:
    """Mint a key and show its plain value in this response only: it is not
    redirected to, kept in the session or in a message, and not cached."""
    form = TokenCreateForm(request.POST)
    if not form.is_valid():
        return _render_keys(request, form=form, status=400)
    new_token = token_create(
        owner=request.user,
        kind=form.cleaned_data["kind"],
        name=form.cleaned_data["name"],
        actor=Actor.for_user(request.user),
    )
    response = _render_keys(request, new_token=new_token)
    add_never_cache_headers(response)
    return response


@login_required
@require_POST
def apikey_revoke(request: HttpRequest, pk: Any) -> HttpResponse:
    token = get_object_or_404(tokens_visible_to(request.user), pk=pk)
    label = token.name or token.prefix
    if token.revoked_at is not None:
        messages.error(request, f"“{label}” was already revoked; nothing changed.")
    else:
        token_revoke(token=token, actor=Actor.for_user(request.user))
        kind = "daemon token" if token.kind == ApiToken.Kind.DAEMON else "API key"
        messages.success(request, f"The {kind} “{label}” is revoked; it stops working at once.")
    return redirect(reverse("apikey-list"))


urlpatterns = [
    path("daemons/", daemon_list, name="daemon-list"),
    path("keys/", apikey_list, name="apikey-list"),
    path("keys/new/", apikey_create, name="apikey-create"),
    path("keys/<uuid:pk>/revoke/", apikey_revoke, name="apikey-revoke"),
]
