"""REST API plumbing shared by every app: pagination and error responses.

Every error answer is JSON with a ``detail`` text; a 400 also carries the
field errors under ``errors``.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from makima.errors import DomainError


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


def _first_message(errors: Any) -> str:
    if isinstance(errors, dict):
        for key, value in errors.items():
            message = _first_message(value)
            if message:
                return message if key in ("non_field_errors", "__all__", "detail") else f"{key}: {message}"
    elif isinstance(errors, list | tuple):
        for value in errors:
            message = _first_message(value)
            if message:
                return message
    elif errors:
        return str(errors)
    return ""


def django_validation_detail(exc: DjangoValidationError) -> Any:
    if hasattr(exc, "error_dict"):
        return {key: [str(m) for e in errors for m in e.messages] for key, errors in exc.error_dict.items()}
    return {"non_field_errors": [str(m) for m in exc.messages]}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DjangoValidationError):
        exc = ValidationError(django_validation_detail(exc))
    if isinstance(exc, DomainError):
        return Response({"detail": str(exc)}, status=exc.status_code)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, ValidationError):
        errors = response.data
        response.data = {"detail": _first_message(errors) or "Invalid input.", "errors": errors}
        response.status_code = status.HTTP_400_BAD_REQUEST
    return response


# --------------------------------------------------------------------------- scoping
#
# A request is made by a user (session or user API key) or by an agent holding
# a task token. Querysets always start from the owning app's selector for the
# user; a task token further narrows what it may touch to its own directive
# (and, for objects without a directive, its own contract). Objects of another
# owner are 404; objects of the same owner outside a task token's scope are 403.


def task_token(request: Any) -> Any:
    """The task ``ApiToken`` behind a request, or ``None`` for users."""
    from daemons.models import ApiToken

    token = getattr(request, "auth", None)
    if isinstance(token, ApiToken) and token.kind == ApiToken.Kind.TASK:
        return token
    return None


def actor_for(request: Any) -> Any:
    """The event-log actor of a request: the agent for task tokens, else the user."""
    from makima.state import Actor

    token = task_token(request)
    if token is not None:
        return Actor("agent", f"task:{token.task_id}", request.user)
    return Actor.for_user(request.user)


class TaskTokenScope:
    """Mixin for viewsets: ``scope_directive_field`` names the path from the
    model to its directive id (``"pk"`` for directives themselves, ``None`` for
    models that never belong to a directive and are closed to task tokens)."""

    scope_directive_field: str | None = "directive_id"
    scope_contract_field: str | None = None

    def check_task_token_scope(self, obj: Any) -> None:
        from makima.errors import OutOfScope

        token = task_token(self.request)
        if token is None:
            return
        if self.scope_directive_field is None:
            raise OutOfScope("A task token cannot act on this kind of object.")
        directive_id = _follow(obj, self.scope_directive_field)
        if directive_id is not None and directive_id == token.directive_id:
            return
        # A token without a contract must not match objects without one (None == None).
        if (
            self.scope_contract_field
            and token.contract_id is not None
            and _follow(obj, self.scope_contract_field) == token.contract_id
        ):
            return
        raise OutOfScope("This task token may only act on its own directive and contract.")

    def check_object_permissions(self, request: Any, obj: Any) -> None:
        super().check_object_permissions(request, obj)
        self.check_task_token_scope(obj)


def _follow(obj: Any, path: str) -> Any:
    for part in path.split("__"):
        if obj is None:
            return None
        obj = getattr(obj, part)
    return obj
