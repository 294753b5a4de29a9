"""Who may use which contracts, files and tasks endpoint.

alice owns a private directive and one shared with her team "platform"; carol
is in that team, bob is a stranger. Every endpoint is tried by everyone.
"""

from __future__ import annotations

from typing import Any

import pytest

from contracts.models import Contract, ContractFile, Task
from contracts.services import contract_file_create, task_output_append
from tests.factories import make_contract, make_directive, make_task

# (method, url template, body, status for someone allowed)
ENDPOINTS = {
    "contracts-list": ("get", "/api/v1/contracts/", None, 200),
    "contract-detail": ("get", "/api/v1/contracts/{contract}/", None, 200),
    "files-list": ("get", "/api/v1/contracts/{contract}/files/", None, 200),
    "file-create": ("post", "/api/v1/contracts/{contract}/files/", {"name": "notes.md", "content": "hi"}, 201),
    "file-detail": ("get", "/api/v1/contracts/{contract}/files/{file}/", None, 200),
    "tasks-list": ("get", "/api/v1/tasks/", None, 200),
    "task-detail": ("get", "/api/v1/tasks/{task}/", None, 200),
    "task-output": ("get", "/api/v1/tasks/{task}/output/", None, 200),
    "task-complete": ("post", "/api/v1/tasks/{task}/complete/", None, 200),
}
LISTS = ["contracts-list", "tasks-list"]
OBJECT_ENDPOINTS = [name for name in ENDPOINTS if name not in LISTS]


def _objects(directive: Any) -> dict[str, Any]:
    contract = make_contract(directive)
    file = contract_file_create(contract=contract, name="chain-plan", content="{}")
    task = make_task(directive, contract=contract)
    task_output_append(task=task, items=[{"seq": 1, "content": "hello"}])
    return {"contract": contract.pk, "file": file.pk, "task": task.pk}


@pytest.fixture
def world(alice, platform):
    return {
        "private": _objects(make_directive(alice, title="Private")),
        "shared": _objects(make_directive(alice, title="Shared", team=platform)),
    }


def call(client: Any, endpoint: str, objects: dict[str, Any]) -> Any:
    method, template, body, _ = ENDPOINTS[endpoint]
    return getattr(client, method)(template.format(**objects), body, format="json")


def ids_in(response: Any) -> set[str]:
    return {row["id"] for row in response.json()["results"]}


def nothing_changed(objects: dict[str, Any]) -> bool:
    contract = Contract.objects.get(pk=objects["contract"])
    task = Task.objects.get(pk=objects["task"])
    return (
        ContractFile.objects.filter(contract=contract).count() == 1
        and contract.status == Contract.Status.ACTIVE
        and task.supervisor_completed_at is None
    )


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_anonymous_requests_are_refused_with_401(api, world, endpoint):
    response = call(api, endpoint, world["private"])
    assert response.status_code == 401
    assert "detail" in response.json()
    assert nothing_changed(world["private"])


@pytest.mark.parametrize("scope", ["private", "shared"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_owner_can_use_every_endpoint(api_as, alice, world, endpoint, scope):
    response = call(api_as(alice), endpoint, world[scope])
    assert response.status_code == ENDPOINTS[endpoint][3], response.content


@pytest.mark.parametrize("endpoint", OBJECT_ENDPOINTS)
def test_a_stranger_gets_404_for_alices_objects_and_changes_nothing(api_as, bob, world, endpoint):
    for objects in world.values():
        response = call(api_as(bob), endpoint, objects)
        assert response.status_code == 404, response.content
        assert nothing_changed(objects)


@pytest.mark.parametrize("endpoint", LISTS)
def test_alices_objects_are_absent_from_a_strangers_lists(api_as, bob, world, endpoint):
    response = call(api_as(bob), endpoint, {})
    assert response.status_code == 200
    assert response.json()["results"] == []


@pytest.mark.parametrize("endpoint", OBJECT_ENDPOINTS)
def test_a_team_member_can_use_the_objects_of_a_shared_directive(api_as, carol, world, endpoint):
    response = call(api_as(carol), endpoint, world["shared"])
    assert response.status_code == ENDPOINTS[endpoint][3], response.content


@pytest.mark.parametrize("endpoint", OBJECT_ENDPOINTS)
def test_a_team_member_gets_404_for_alices_private_directive(api_as, carol, world, endpoint):
    response = call(api_as(carol), endpoint, world["private"])
    assert response.status_code == 404
    assert nothing_changed(world["private"])


@pytest.mark.parametrize(("endpoint", "kind"), [("contracts-list", "contract"), ("tasks-list", "task")])
def test_a_team_members_lists_hold_the_shared_directive_only(api_as, carol, world, endpoint, kind):
    response = call(api_as(carol), endpoint, {})
    assert response.status_code == 200
    assert ids_in(response) == {str(world["shared"][kind])}


@pytest.mark.parametrize(("endpoint", "kind"), [("contracts-list", "contract"), ("tasks-list", "task")])
def test_the_owners_lists_hold_private_and_shared_objects(api_as, alice, world, endpoint, kind):
    response = call(api_as(alice), endpoint, {})
    assert ids_in(response) == {str(world["private"][kind]), str(world["shared"][kind])}


def test_a_team_member_sees_the_files_of_a_shared_contract(api_as, carol, world):
    response = call(api_as(carol), "files-list", world["shared"])
    assert [row["id"] for row in response.json()["results"]] == [str(world["shared"]["file"])]


def test_a_file_is_not_found_through_another_contract(api_as, alice, world):
    objects = {"contract": world["shared"]["contract"], "file": world["private"]["file"]}
    assert call(api_as(alice), "file-detail", objects).status_code == 404


@pytest.mark.parametrize("endpoint", ["contract-detail", "files-list", "task-detail"])
def test_a_malformed_id_is_404(api_as, alice, endpoint):
    objects = {"contract": "not-a-uuid", "task": "not-a-uuid", "file": "not-a-uuid"}
    assert call(api_as(alice), endpoint, objects).status_code == 404
