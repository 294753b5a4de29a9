"""REST API plumbing shared by every app: pagination, error responses, the
limits (request size, request rate per token) and task-token scoping.

Every error answer is JSON with a ``detail`` text; a 400 also carries the
field errors under ``errors``.
"""

from __future__ import annotations

import logging
from typing import Any
from weakref import WeakKeyDictionary

from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.parsers import JSONParser
from rest_framework.response import Response
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import exception_handler as drf_exception_handler

from makima.errors import DomainError

logger = logging.getLogger(__name__)

#: Object ids in API routes; anything else is no route at all (a JSON 404, see ``not_found``).
UUID_RE = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


class Pagination(PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        # Page 0 or -1 is "Invalid page." (404): the schema says where pages
        # start, and that a too large page size is cut rather than refused.
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_query_param:
                parameter["schema"]["minimum"] = 1
            elif parameter["name"] == self.page_size_query_param:
                parameter["description"] = (
                    f"Results per page (default {self.page_size}); larger than {self.max_page_size} counts as {self.max_page_size}."
                )
        return parameters


@csrf_exempt  # it changes nothing; without this a POST would get the CSRF failure page (HTML 403)
def not_found(request: Any, path: str = "") -> JsonResponse:
    """Any ``/api/v1/`` path that no route matches (an unknown endpoint, an id
    that is not a UUID): a JSON 404 like every other API error, not Django's
    HTML page."""
    return JsonResponse({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)


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
    if isinstance(exc, RequestDataTooBig):
        # Django's own answer is its HTML 400 page; the API says 413, in JSON.
        exc = RequestTooLarge()
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


# --------------------------------------------------------------------------- limits


class RequestTooLarge(APIException):
    """A body over ``MAKIMA_MAX_REQUEST_BYTES`` (Django's ``DATA_UPLOAD_MAX_MEMORY_SIZE``,
    which Django checks against the declared length before reading anything)."""

    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "too_large"

    def __init__(self) -> None:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        super().__init__(f"The request body is larger than {limit} bytes (MAKIMA_MAX_REQUEST_BYTES).")


def throttle_cache() -> Any:
    """Where request counts live: the ``throttle`` cache (Redis when ``REDIS_URL``
    is set, so every web process counts against one limit; see settings)."""
    return caches["throttle"]


class TokenRateThrottle(SimpleRateThrottle):
    """Requests per API token: each user API key and each task token has its own
    count, against ``MAKIMA_API_RATE`` and ``MAKIMA_API_TASK_RATE`` ("0" turns
    a limit off). Over it: 429 with ``Retry-After``. Browser sessions are not
    counted (the dashboard's pages are not the API), nor are unauthenticated
    requests, which are refused (401) before throttling.

    Keyed by the token's id, a UUID, so counts never mix between tokens (or
    between test databases sharing a Redis). The rate is read per request, and
    counts are kept by :func:`throttle_cache`."""

    def __init__(self) -> None:  # DRF's reads one fixed rate from its own settings
        self.rate: str | None = None

    def allow_request(self, request: Any, view: Any) -> bool:
        self.rate = settings.MAKIMA_API_TASK_RATE if task_token(request) is not None else settings.MAKIMA_API_RATE
        if self.rate == "0":
            return True
        self.num_requests, self.duration = self.parse_rate(self.rate)
        try:
            self.cache = throttle_cache()
            return super().allow_request(request, view)
        except Exception:
            # A limit is protection, not a dependency: with Redis down the API still answers.
            logger.warning("rate limit not checked: its cache failed", exc_info=True)
            return True

    def get_cache_key(self, request: Any, view: Any) -> str | None:
        from daemons.models import ApiToken

        token = getattr(request, "auth", None)
        return f"rate:token:{token.pk}" if isinstance(token, ApiToken) else None


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


class ApiSchema:
    """``view.schema``: :class:`daemons.api.schema.ApiAutoSchema`, a new one per
    access, and a schema given to ``as_view()`` (drf-spectacular's per-action
    ones) kept per view instance, as DRF's ``ViewInspector`` does. Imported
    late: this module is loaded while DRF itself is (``Pagination`` above)."""

    def __init__(self) -> None:
        self.instance_schemas: WeakKeyDictionary[Any, Any] = WeakKeyDictionary()

    def __get__(self, instance: Any, owner: Any) -> Any:
        if instance is not None and instance in self.instance_schemas:
            return self.instance_schemas[instance]
        from daemons.api.schema import ApiAutoSchema

        return ApiAutoSchema().__get__(instance, owner)

    def __set__(self, instance: Any, other: Any) -> None:
        self.instance_schemas[instance] = other
        if other is not None:
            other.view = instance


class TaskTokenScope:
    """Mixin for viewsets: ``scope_directive_field`` names the path from the
    model to its directive id (``"pk"`` for directives themselves, ``None`` for
    models that never belong to a directive and are closed to task tokens)."""

    scope_directive_field: str | None = "directive_id"
    scope_contract_field: str | None = None
    # Every API viewset has this mixin: its schema documents the error answers,
    # its routes take UUIDs only (anything else falls through to not_found), and
    # it reads JSON bodies only: the API is JSON (spec 5.1), and form and
    # multipart parsing (temporary files, a "null" that is a string) is surface
    # that no client needs.
    schema = ApiSchema()
    lookup_value_regex = UUID_RE
    parser_classes = [JSONParser]
    throttle_classes = [TokenRateThrottle]

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
