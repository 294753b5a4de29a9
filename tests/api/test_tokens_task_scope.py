"""A task token (an agent's credentials) acts only within its own directive and contract."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from contracts.models import Contract, ContractFile, Task
from contracts.services import contract_file_create, task_output_append, task_transition
from daemons.models import ApiToken
from directives.models import DirectiveEvent
from tests.factories import make_contract, make_daemon, make_directive, make_task, make_token


def bearer(value: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {value}")
    return client


def unit(directive: Any, owner: Any = None) -> dict[str, Any]:
    """A contract with a file and a task with output, as the orchestrator makes them."""
    contract = make_contract(directive, owner=owner)
    file = contract_file_create(contract=contract, name="chain-plan", content="{}")
    task = make_task(directive, owner=owner, contract=contract)
    task_output_append(task=task, items=[{"seq": 1, "content": "hello"}])
    return {"contract": contract.pk, "file": file.pk, "task": task.pk}


@pytest.fixture
def scene(alice, bob):
    directive = make_directive(alice)
    own = unit(directive)
    task = Task.objects.get(pk=own["task"])
    return {
        "own": own,
        "task": task,
        # Another unit of work of the same directive (e.g. the planner's contract).
        "sibling": unit(directive),
        "other_directive": unit(make_directive(alice, title="Another directive")),
        "bobs": unit(make_directive(bob)),
        "client": bearer(make_token(alice, kind=ApiToken.Kind.TASK, task=task).plain),
    }


# (method, url template, body, status within scope)
ENDPOINTS = {
    "contract-detail": ("get", "/api/v1/contracts/{contract}/", None, 200),
    "files-list": ("get", "/api/v1/contracts/{contract}/files/", None, 200),
    "file-create": ("post", "/api/v1/contracts/{contract}/files/", {"name": "notes.md", "content": "hi"}, 201),
    "file-detail": ("get", "/api/v1/contracts/{contract}/files/{file}/", None, 200),
    "task-detail": ("get", "/api/v1/tasks/{task}/", None, 200),
    "task-output": ("get", "/api/v1/tasks/{task}/output/", None, 200),
    "task-complete": ("post", "/api/v1/tasks/{task}/complete/", None, 200),
}


def call(client: APIClient, endpoint: str, objects: dict[str, Any]) -> Any:
    method, template, body, _ = ENDPOINTS[endpoint]
    return getattr(client, method)(template.format(**objects), body, format="json")


def untouched(objects: dict[str, Any]) -> bool:
    return (
        ContractFile.objects.filter(contract_id=objects["contract"]).count() == 1
        and Contract.objects.get(pk=objects["contract"]).status == Contract.Status.ACTIVE
        and Task.objects.get(pk=objects["task"]).supervisor_completed_at is None
    )


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_task_token_can_work_on_its_own_contract_and_task(scene, endpoint):
    response = call(scene["client"], endpoint, scene["own"])
    assert response.status_code == ENDPOINTS[endpoint][3], response.content


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_task_token_can_work_within_its_own_directive(scene, endpoint):
    assert call(scene["client"], endpoint, scene["sibling"]).status_code == ENDPOINTS[endpoint][3]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_task_token_gets_403_on_another_directive_of_the_same_owner(scene, endpoint):
    response = call(scene["client"], endpoint, scene["other_directive"])
    assert response.status_code == 403
    assert response.json()["detail"]
    assert untouched(scene["other_directive"])


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_task_token_gets_404_on_another_owners_objects(scene, endpoint):
    assert call(scene["client"], endpoint, scene["bobs"]).status_code == 404
    assert untouched(scene["bobs"])


def test_a_task_tokens_lists_hold_its_own_directive_only(scene):
    client = scene["client"]
    contracts = {row["id"] for row in client.get("/api/v1/contracts/").json()["results"]}
    tasks = {row["id"] for row in client.get("/api/v1/tasks/").json()["results"]}
    assert contracts == {str(scene["own"]["contract"]), str(scene["sibling"]["contract"])}
    assert tasks == {str(scene["own"]["task"]), str(scene["sibling"]["task"])}


def test_a_file_written_with_a_task_token_is_recorded_as_the_agents(scene):
    response = call(scene["client"], "file-create", scene["own"])
    event = DirectiveEvent.objects.get(event_type="contract_file_created", subject_id=response.json()["id"])
    assert event.actor_type == "agent"
    assert event.actor == f"task:{scene['task'].pk}"


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/api/v1/daemons/"),
        ("get", "/api/v1/daemons/{daemon}/"),
        ("get", "/api/v1/tokens/"),
        ("post", "/api/v1/tokens/"),
        ("get", "/api/v1/tokens/{token}/"),
        ("post", "/api/v1/tokens/{token}/revoke/"),
    ],
)
def test_a_task_token_gets_403_on_daemons_and_tokens(scene, alice, method, url):
    key = make_token(alice).token
    url = url.format(daemon=make_daemon(alice).pk, token=key.pk)
    response = getattr(scene["client"], method)(url, {"name": "escalate", "kind": "user"}, format="json")
    assert response.status_code == 403
    assert ApiToken.objects.filter(kind=ApiToken.Kind.USER).count() == 1
    key.refresh_from_db()
    assert key.revoked_at is None


@pytest.mark.parametrize("end", [Task.Status.DONE, Task.Status.FAILED, Task.Status.CANCELLED])
def test_a_task_token_stops_working_when_its_task_ends(scene, end):
    task = scene["task"]
    assert call(scene["client"], "task-detail", scene["own"]).status_code == 200
    for status in (Task.Status.STARTING, Task.Status.RUNNING, end):
        task_transition(task=task, to=status)
    for endpoint in ENDPOINTS:
        assert call(scene["client"], endpoint, scene["own"]).status_code == 401


def test_a_task_token_of_a_contract_without_directive_reaches_only_that_contract(alice):
    contract = unit(None, owner=alice)
    other = unit(None, owner=alice)
    client = bearer(make_token(alice, kind=ApiToken.Kind.TASK, task=Task.objects.get(pk=contract["task"])).plain)
    for endpoint in ENDPOINTS:
        assert call(client, endpoint, contract).status_code == ENDPOINTS[endpoint][3]
        assert call(client, endpoint, other).status_code == 403
    assert [row["id"] for row in client.get("/api/v1/contracts/").json()["results"]] == [str(contract["contract"])]
    assert [row["id"] for row in client.get("/api/v1/tasks/").json()["results"]] == [str(contract["task"])]


def test_a_task_token_without_a_contract_cannot_reach_contractless_tasks_of_another_directive(alice):
    planning = make_task(make_directive(alice))
    elsewhere = make_task(make_directive(alice, title="Another directive"))
    client = bearer(make_token(alice, kind=ApiToken.Kind.TASK, task=planning).plain)
    assert client.get(f"/api/v1/tasks/{planning.pk}/").status_code == 200
    assert client.get(f"/api/v1/tasks/{elsewhere.pk}/").status_code == 403
    assert client.post(f"/api/v1/tasks/{elsewhere.pk}/complete/").status_code == 403
    assert [row["id"] for row in client.get("/api/v1/tasks/").json()["results"]] == [str(planning.pk)]
