"""``/api/v1/contracts/`` and ``/api/v1/contracts/{id}/files/``."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings

from contracts.models import Contract, ContractFile
from contracts.services import contract_file_create, contract_transition
from directives.models import DirectiveEvent
from tests.factories import make_contract, make_directive


@pytest.fixture
def contract(alice):
    return make_contract(
        make_directive(alice),
        repositories=[
            {"name": "demo", "url": "https://git.example.com/demo.git", "is_primary": True},
            {"name": "docs", "local_path": "/srv/docs"},
        ],
    )


def files_url(contract: Contract) -> str:
    return f"/api/v1/contracts/{contract.pk}/files/"


# --------------------------------------------------------------------------- contracts


def test_a_contract_shows_its_repositories(api_as, alice, contract):
    response = api_as(alice).get(f"/api/v1/contracts/{contract.pk}/")
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(contract.pk)
    assert body["directive"] == str(contract.directive_id)
    assert body["contract_type"] == "execution"
    assert body["status"] == "active"
    assert sorted(body["repositories"], key=lambda repo: repo["name"]) == [
        {"name": "demo", "url": "https://git.example.com/demo.git", "local_path": "", "is_primary": True},
        {"name": "docs", "url": "", "local_path": "/srv/docs", "is_primary": False},
    ]


def test_contracts_are_filtered_by_directive_status_and_type(api_as, alice):
    directive = make_directive(alice)
    other = make_directive(alice, title="Other")
    planning = make_contract(directive, name="Planning", contract_type=Contract.ContractType.PLANNING)
    execution = make_contract(directive)
    elsewhere = make_contract(other)
    contract_transition(contract=execution, to=Contract.Status.COMPLETED)
    client = api_as(alice)

    def ids(query: str) -> set[str]:
        response = client.get(f"/api/v1/contracts/{query}")
        assert response.status_code == 200
        return {row["id"] for row in response.json()["results"]}

    assert ids("") == {str(planning.pk), str(execution.pk), str(elsewhere.pk)}
    assert ids(f"?directive={directive.pk}") == {str(planning.pk), str(execution.pk)}
    assert ids("?status=completed") == {str(execution.pk)}
    assert ids("?contract_type=execution") == {str(execution.pk), str(elsewhere.pk)}
    assert ids(f"?directive={other.pk}&status=active") == {str(elsewhere.pk)}


@pytest.mark.parametrize("query", ["?status=sleeping", "?contract_type=party", "?directive=42"])
def test_a_bad_contract_filter_is_refused_with_400(api_as, alice, query):
    response = api_as(alice).get(f"/api/v1/contracts/{query}")
    assert response.status_code == 400
    assert response.json()["errors"]


def test_the_contract_list_costs_the_same_queries_for_3_or_30_contracts(api_as, alice):
    directive = make_directive(alice)
    client = api_as(alice)

    def queries_for(count: int) -> int:
        Contract.objects.all().delete()
        for _ in range(count):
            make_contract(directive, repositories=[{"name": "demo", "url": "/srv/demo.git"}])
        with CaptureQueriesContext(connection) as context:
            response = client.get("/api/v1/contracts/")
        assert len(response.json()["results"]) == count
        return len(context.captured_queries)

    assert queries_for(3) == queries_for(30)


def test_contracts_cannot_be_created_or_deleted_through_the_api(api_as, alice, contract):
    client = api_as(alice)
    assert client.post("/api/v1/contracts/", {"name": "x"}, format="json").status_code == 405
    assert client.delete(f"/api/v1/contracts/{contract.pk}/").status_code == 405


# --------------------------------------------------------------------------- files


def test_files_are_listed_oldest_first_with_sizes_but_without_content(api_as, alice, contract):
    first = contract_file_create(contract=contract, name="chain-plan", content="héllo")  # 6 bytes in UTF-8
    second = contract_file_create(contract=contract, name="notes.md", content="")
    ContractFile.objects.filter(pk=second.pk).update(created_at=first.created_at + timedelta(seconds=1))
    response = api_as(alice).get(files_url(contract))
    assert response.status_code == 200
    rows = response.json()["results"]
    assert [(row["id"], row["name"], row["size"]) for row in rows] == [
        (str(first.pk), "chain-plan", 6),
        (str(second.pk), "notes.md", 0),
    ]
    assert all("content" not in row and "body" not in row for row in rows)
    assert rows[0]["contract"] == str(contract.pk) and rows[0]["created_at"]


def test_files_can_be_looked_up_by_name(api_as, alice, contract):
    plan = contract_file_create(contract=contract, name="chain-plan", content="{}")
    contract_file_create(contract=contract, name="notes.md", content="")
    response = api_as(alice).get(files_url(contract), {"name": "chain-plan"})
    assert [row["id"] for row in response.json()["results"]] == [str(plan.pk)]


def test_a_file_is_created_and_read_back_with_its_content_and_body(api_as, alice, contract):
    client = api_as(alice)
    body = [
        {"type": "markdown", "content": "# Plan"},
        {"type": "code", "content": "print('hi')", "language": "python"},
        {"type": "paragraph", "text": "Done."},
    ]
    response = client.post(
        files_url(contract), {"name": "evaluation-result", "content": "ünïcode\n", "body": body}, format="json"
    )
    assert response.status_code == 201, response.content
    created = response.json()
    assert created["name"] == "evaluation-result"
    assert created["content"] == "ünïcode\n"
    assert created["body"] == body
    assert created["size"] == len("ünïcode\n".encode())

    detail = client.get(f"{files_url(contract)}{created['id']}/")
    assert detail.status_code == 200
    assert detail.json() == created
    event = DirectiveEvent.objects.get(event_type="contract_file_created", subject_id=created["id"])
    assert (event.actor_type, event.actor, event.directive_id) == ("user", "alice", contract.directive_id)


def test_content_and_body_are_optional(api_as, alice, contract):
    response = api_as(alice).post(files_url(contract), {"name": "empty.txt"}, format="json")
    assert response.status_code == 201
    assert (response.json()["content"], response.json()["body"], response.json()["size"]) == ("", None, 0)


def test_whitespace_in_content_is_kept(api_as, alice, contract):
    content = "  indented\n\n"
    response = api_as(alice).post(files_url(contract), {"name": "a.txt", "content": content}, format="json")
    assert response.json()["content"] == content


BAD_FILES = {
    "missing-name": {"content": "x"},
    "empty-name": {"name": "", "content": "x"},
    "parent-path": {"name": "../x", "content": "x"},
    "nested-path": {"name": "a/b", "content": "x"},
    "absolute-path": {"name": "/etc/passwd", "content": "x"},
    "hidden-name": {"name": ".env", "content": "x"},
    "name-with-space": {"name": "my file", "content": "x"},
    "long-name": {"name": "a" * 201, "content": "x"},
    "numeric-name": {"name": 5, "content": "x"},
    "numeric-content": {"name": "a.txt", "content": 123},
    "boolean-content": {"name": "a.txt", "content": True},
    "list-content": {"name": "a.txt", "content": ["x"]},
    "object-content": {"name": "a.txt", "content": {"text": "x"}},
    "null-content": {"name": "a.txt", "content": None},
    "nul-in-content": {"name": "a.txt", "content": "a\x00b"},
    "body-not-a-list": {"name": "a.txt", "body": "text"},
    "body-element-not-an-object": {"name": "a.txt", "body": [1]},
    "body-unknown-type": {"name": "a.txt", "body": [{"type": "video", "content": "x"}]},
    "body-without-text": {"name": "a.txt", "body": [{"type": "code"}]},
    "body-non-text": {"name": "a.txt", "body": [{"type": "paragraph", "text": 7}]},
}


@pytest.mark.parametrize("payload", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_file_is_refused_with_400_and_nothing_is_created(api_as, alice, contract, payload):
    response = api_as(alice).post(files_url(contract), payload, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["detail"]
    assert response.json()["errors"]
    assert not ContractFile.objects.exists()
    assert not DirectiveEvent.objects.filter(event_type="contract_file_created").exists()


@override_settings(MAKIMA_MAX_CONTRACT_FILE_BYTES=8)
def test_content_over_the_size_limit_is_refused_with_400(api_as, alice, contract):
    client = api_as(alice)
    response = client.post(files_url(contract), {"name": "big.txt", "content": "ééééé"}, format="json")  # 10 bytes
    assert response.status_code == 400
    assert "content" in response.json()["errors"]
    assert not ContractFile.objects.exists()
    # Exactly at the limit is fine.
    assert client.post(files_url(contract), {"name": "ok.txt", "content": "éééé"}, format="json").status_code == 201


@pytest.mark.parametrize("raw", ['{"name": "a.txt", ', "[]", '"a.txt"', "not json"])
def test_malformed_json_is_refused_with_400(api_as, alice, contract, raw):
    response = api_as(alice).post(files_url(contract), raw, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["detail"]
    assert not ContractFile.objects.exists()


def test_a_file_cannot_be_added_to_an_archived_contract(api_as, alice, contract):
    contract_transition(contract=contract, to=Contract.Status.ARCHIVED)
    response = api_as(alice).post(files_url(contract), {"name": "late.txt", "content": "x"}, format="json")
    assert response.status_code == 409
    assert not ContractFile.objects.exists()


def test_files_of_an_unknown_contract_are_404(api_as, alice):
    url = "/api/v1/contracts/00000000-0000-0000-0000-000000000000/files/"
    assert api_as(alice).get(url).status_code == 404
    assert api_as(alice).post(url, {"name": "a.txt"}, format="json").status_code == 404


def test_files_cannot_be_changed_or_deleted_through_the_api(api_as, alice, contract):
    file = contract_file_create(contract=contract, name="chain-plan", content="{}")
    url = f"{files_url(contract)}{file.pk}/"
    assert api_as(alice).put(url, {"name": "x", "content": "y"}, format="json").status_code == 405
    assert api_as(alice).delete(url).status_code == 405
    assert ContractFile.objects.get(pk=file.pk).content == "{}"
