"""OpenAPI description of makima's API (drf-spectacular): bearer-token
authentication, and the error answers every endpoint can give
(:class:`ApiAutoSchema`, used by every viewset through ``makima.api.TaskTokenScope``)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from rest_framework import serializers


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """``Authorization: Bearer <token>`` with a user API key or a task token."""

    target_class = "daemons.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        scheme = build_bearer_security_scheme_object(header_name="Authorization", token_prefix="Bearer")
        scheme["description"] = "A user API key (mk_u_…) or, for agents, a task token (mk_t_…)."
        return scheme


class ApiErrorSerializer(serializers.Serializer):
    """Every error answer of the API: ``detail`` always, field ``errors`` on 400."""

    detail = serializers.CharField()
    errors = serializers.DictField(required=False, help_text="Field errors; only on 400.")


STANDARD_ERRORS = {
    "400": "Bad input: `detail` names the problem, `errors` holds the field errors.",
    "401": "No credentials, or a token that is unknown, expired or revoked.",
    "403": "Not allowed: a task token outside its directive and contract, or a session request without CSRF token.",
    "404": "No such object among those you can see (or no such page).",
    "413": "The request body is larger than the server accepts (`MAKIMA_MAX_REQUEST_BYTES`).",
    "415": "The body is not JSON: the API takes `Content-Type: application/json` only.",
    "429": "Too many requests with this API token; `Retry-After` says how many seconds to wait.",
}


class ApiAutoSchema(AutoSchema):
    """drf-spectacular's schema plus the error answers every endpoint can give
    (401, 403 and 429 everywhere; 400 where there is input; 404 where there is
    an id or a page; 413 where there is a body), each with the JSON error body,
    so that the schema describes every answer a client can receive."""

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is None:
            return None
        error = {"application/json": {"schema": self.resolve_serializer(ApiErrorSerializer, "response").ref}}
        parameters = operation.get("parameters", [])
        has_body = "requestBody" in operation
        wanted = {"401", "403", "429"}
        if has_body or any(p["in"] == "query" for p in parameters):
            wanted.add("400")
        if any(p["in"] == "path" or p["name"] == "page" for p in parameters):
            wanted.add("404")
        if has_body:
            wanted |= {"413", "415"}
        responses = operation["responses"]
        for code in sorted(wanted - set(responses)):
            responses[code] = {"description": STANDARD_ERRORS[code]}
        for code, response in responses.items():
            if code.startswith("4") and "content" not in response:
                response["content"] = error
        if "429" in responses:
            responses["429"]["headers"] = {
                "Retry-After": {
                    "schema": {"type": "integer"},
                    "required": True,
                    "description": "Seconds to wait before the next request.",
                }
            }
        return operation
