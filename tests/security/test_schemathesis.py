"""schemathesis over every operation of ``/api/schema/``, authenticated with a
user API key: no answer ≥ 500, and every answer conforms to the schema
(documented status code, content type, headers and body).

The schema is the one the server serves, fetched in-process through Django's
WSGI application, so the test runs on the test database (SQLite or
PostgreSQL) without a server process. Each operation is one pytest test with
a fresh world (:func:`tests.security.make_world`). Every case is sent twice:
once as generated (ids that mostly do not exist: the 404 path) and, when the
operation has path parameters, once with them replaced by ids of alice's
real objects, so that the handlers behind the 404 run too.

The schemathesis phases that run: the coverage phase (boundary and
wrong-type values of every field and parameter, undocumented methods) and
the fuzzing phase (random valid requests). Bounds, so that the run takes
about a minute and a half: ``MAKIMA_SCHEMATHESIS_EXAMPLES`` fuzzing examples
per operation (default 10); of the coverage cases, the first
``MAKIMA_SCHEMATHESIS_COVERAGE`` (25) and then one in
``MAKIMA_SCHEMATHESIS_COVERAGE_STRIDE`` (10). Raise them for a deeper run.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.test import TestCase
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.pytest.lazy import get_all_tests
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.security import World, make_world

# In the test's transaction (rolled back at the end): far faster than committing
# every request; the on-commit work (orchestrator advance, live feed) still runs,
# at the end of each call (see ``send``).
pytestmark = [pytest.mark.slow, pytest.mark.django_db]

EXAMPLES = int(os.environ.get("MAKIMA_SCHEMATHESIS_EXAMPLES", "10"))
COVERAGE = int(os.environ.get("MAKIMA_SCHEMATHESIS_COVERAGE", "25"))
COVERAGE_STRIDE = int(os.environ.get("MAKIMA_SCHEMATHESIS_COVERAGE_STRIDE", "10"))

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
HTTP_METHODS = ("get", "put", "post", "patch", "delete")


def operation_labels() -> list[str]:
    """Every operation of the API (collected cheaply from the generator; the
    test itself runs against the schema that ``/api/schema/`` serves)."""
    paths = SchemaGenerator().get_schema(request=None, public=True)["paths"]
    return [f"{method.upper()} {path}" for path, item in paths.items() for method in item if method in HTTP_METHODS]


@functools.cache
def served_schema() -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_wsgi("/api/schema/?format=json", get_wsgi_application())


@pytest.fixture
def world(settings: Any) -> Iterator[World]:
    settings.MAKIMA_API_RATE = "0"  # thousands of requests with one key: the rate is test_limits' business
    # As Django's test client does: the request signals must not close the
    # test's database connection (and its transaction) between two requests.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield make_world()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


def real_ids(world: World, path: str) -> dict[str, str]:
    """Ids of alice's objects for the path parameters of ``path``."""
    mine = world.mine
    if path.startswith("/api/v1/directives/{directive_pk}/steps/"):
        return {"directive_pk": str(mine.directive.pk), "id": str(mine.steps[1].pk)}
    if path.startswith("/api/v1/directives/"):
        return {"directive_pk": str(mine.directive.pk), "id": str(mine.directive.pk)}
    if path.startswith("/api/v1/contracts/{contract_pk}/files/"):
        return {"contract_pk": str(mine.contract.pk), "id": str(mine.file.pk)}
    by_prefix = {
        "/api/v1/contracts/": mine.contract.pk,
        "/api/v1/chains/": mine.chain.pk,
        "/api/v1/evaluations/": mine.evaluation.pk,
        "/api/v1/approvals/": mine.approval.pk,
        "/api/v1/orders/": mine.order.pk,
        "/api/v1/tasks/": mine.task.pk,
        "/api/v1/daemons/": mine.daemon.pk,
        # Never the key the test authenticates with: revoking it would end the run.
        "/api/v1/tokens/": world.spare_token.pk,
    }
    for prefix, pk in by_prefix.items():
        if path.startswith(prefix):
            return {"id": str(pk)}
    return {}


def sampled_out(case: schemathesis.Case, seen: dict[str, int]) -> bool:
    """Whether to skip a coverage-phase case: the first ``COVERAGE`` of an
    operation are sent, then one in ``COVERAGE_STRIDE``, picked by a stable
    hash of the case, so that every run sends the same ones and the values of
    later fields are reached too (a PATCH of a directive has over a thousand)."""
    if case.meta is None or case.meta.phase.name.value != "coverage":
        return False
    seen["coverage"] = seen.get("coverage", 0) + 1
    if seen["coverage"] <= COVERAGE:
        return False
    fingerprint = repr((case.method, case.path_parameters, case.query, case.headers, case.body)).encode()
    return zlib.crc32(fingerprint) % COVERAGE_STRIDE != 0


def send(case: schemathesis.Case, world: World) -> None:
    with TestCase.captureOnCommitCallbacks(execute=True):
        case.call_and_validate(headers={"Authorization": f"Bearer {world.keys['alice_key']}"}, checks=CHECKS)


def check_case(case: schemathesis.Case, world: World, seen: dict[str, int]) -> None:
    if sampled_out(case, seen):
        return
    send(case, world)
    if case.path_parameters:
        ids = real_ids(world, case.operation.path)
        case.path_parameters = {name: ids.get(name, value) for name, value in case.path_parameters.items()}
        send(case, world)


@pytest.mark.parametrize("label", operation_labels())
def test_every_operation_answers_within_its_schema_and_never_with_a_server_error(label: str, world: World) -> None:
    method, path = label.split(" ", 1)
    schema = served_schema().include(method=method, path=path)
    tests = list(
        get_all_tests(
            schema=schema,
            test_func=check_case,
            settings=settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            ),
            given_kwargs=None,
        )
    )
    assert len(tests) == 1, f"{label}: {len(tests)} operations in the served schema"
    operation, test = tests[0].ok()
    assert operation.label == label
    test(world=world, seen={})


def test_the_run_covers_every_operation_of_the_served_schema(db: Any) -> None:
    served = {op.ok().label for op in served_schema().get_all_operations()}
    assert served == set(operation_labels())
    assert len(served) >= 50
