"""What every dashboard view module shares: how a service's refusal reads, and
where a form post goes back to."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponseRedirect
from django.utils.http import url_has_allowed_host_and_scheme


def refusal_text(exc: Exception) -> str:
    """The service's own words for why it refused (field errors keep their field's name)."""
    if isinstance(exc, ValidationError):
        if hasattr(exc, "error_dict"):
            return "; ".join(f"{field}: {m}" for field, errors in exc.message_dict.items() for m in errors)
        return " ".join(exc.messages)
    return str(exc)


def redirect_back(request: HttpRequest, fallback: str) -> HttpResponseRedirect:
    """Redirect to the form's ``next`` when it stays on this site (another page
    may embed the form), else to ``fallback``."""
    target = request.POST.get("next", "")
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return HttpResponseRedirect(target)
    return HttpResponseRedirect(fallback)
