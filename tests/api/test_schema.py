"""The OpenAPI schema at ``/api/schema/`` and the interactive docs at ``/api/docs/``."""

from __future__ import annotations

import re

import pytest
from django.conf import settings
from django.contrib.staticfiles import finders
from django.urls import include, path
from drf_spectacular.drainage import GENERATOR_STATS
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.validation import validate_schema

OUR_PATHS = {
    "/api/v1/contracts/": {"get"},
    "/api/v1/contracts/{id}/": {"get"},
    "/api/v1/contracts/{contract_pk}/files/": {"get", "post"},
    "/api/v1/contracts/{contract_pk}/files/{id}/": {"get"},
    "/api/v1/tasks/": {"get"},
    "/api/v1/tasks/{id}/": {"get"},
    "/api/v1/tasks/{id}/output/": {"get"},
    "/api/v1/tasks/{id}/complete/": {"post"},
    "/api/v1/daemons/": {"get"},
    "/api/v1/daemons/{id}/": {"get"},
    "/api/v1/tokens/": {"get", "post"},
    "/api/v1/tokens/{id}/": {"get"},
    "/api/v1/tokens/{id}/revoke/": {"post"},
}


@pytest.fixture
def schema(api, db):
    response = api.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def test_the_schema_is_served_and_is_valid_openapi(schema):
    validate_schema(schema)
    assert schema["openapi"].startswith("3.")
    assert schema["info"]["title"] == "makima API"


def test_the_schema_is_served_as_yaml_by_default(api, db):
    response = api.get("/api/schema/")
    assert response.status_code == 200
    assert response.content.startswith(b"openapi: 3.")


def test_the_schema_lists_the_contracts_tasks_daemons_and_tokens_endpoints(schema):
    for url, methods in OUR_PATHS.items():
        assert url in schema["paths"], url
        assert methods <= set(schema["paths"][url]), url


def test_the_schema_lists_the_directives_api_too(schema):
    assert "/api/v1/directives/" in schema["paths"]
    assert "/api/v1/directives/{directive_pk}/steps/batch/" in schema["paths"]


def test_the_schema_describes_bearer_tokens_and_sessions(schema):
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["type"] == "http"
    assert schemes["bearerAuth"]["scheme"] == "bearer"
    assert {"bearerAuth": []} in schema["paths"]["/api/v1/tasks/"]["get"]["security"]


def test_the_schema_documents_the_output_page_and_the_one_time_token(schema):
    output = schema["paths"]["/api/v1/tasks/{id}/output/"]["get"]
    parameters = {p["name"]: p for p in output["parameters"]}
    assert set(parameters) >= {"attempt", "after_seq", "limit"}
    assert not parameters["attempt"].get("required", False)
    assert parameters["attempt"]["schema"]["minimum"] == 1
    assert "current attempt" in parameters["attempt"]["description"]
    page = schema["components"]["schemas"]["TaskOutputPage"]
    assert set(page["properties"]) == {
        "attempt",
        "items",
        "next_after_seq",
        "has_more",
        "task_status",
        "task_attempt",
    }
    created = schema["paths"]["/api/v1/tokens/"]["post"]["responses"]["201"]["content"]["application/json"]
    assert created["schema"]["$ref"].endswith("/TokenCreated")
    assert "token" in schema["components"]["schemas"]["TokenCreated"]["properties"]
    assert "token" not in schema["components"]["schemas"]["Token"]["properties"]
    assert "digest" not in str(schema["components"]["schemas"])


def test_the_contracts_and_daemons_views_generate_the_schema_without_warnings():
    patterns = [
        path("api/v1/", include("contracts.api.urls")),
        path("api/v1/", include("daemons.api.urls")),
    ]
    GENERATOR_STATS.reset()
    with GENERATOR_STATS.silence():
        generated = SchemaGenerator(patterns=patterns).get_schema(request=None, public=True)
    problems = [*GENERATOR_STATS._warn_cache, *GENERATOR_STATS._error_cache]
    GENERATOR_STATS.reset()
    assert problems == []
    validate_schema(generated)
    assert set(OUR_PATHS) <= set(generated["paths"])


def test_the_docs_page_loads_swagger_from_local_static_files_only(api, db):
    response = api.get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(asset.endswith("swagger-ui-bundle.js") for asset in assets)
    assert any(asset.endswith("swagger-ui.css") for asset in assets)
    static_prefix = "/" + settings.STATIC_URL.lstrip("/")
    for asset in assets:
        assert not asset.startswith(("http://", "https://", "//")), asset
        assert asset.startswith(static_prefix), asset
        assert finders.find(asset.removeprefix(static_prefix)), f"{asset} does not resolve to a static file"
    assert not re.search(r"https?://[^\"' ]*(swagger|unpkg|jsdelivr|cdnjs)", html)
    assert 'url: "/api/schema/"' in html
