"""``POST /api/v1/tasks/{id}/message/``: a person answers a paused task."""

from __future__ import annotations

import pytest

from contracts.models import Task
from contracts.services import TASK_MESSAGE_MAX_CHARS, task_transition
from daemons.models import ApiToken, DaemonCommand
from directives.models import DirectiveEvent
from tests.factories import make_daemon, make_directive, make_task, make_token

pytestmark = pytest.mark.django_db


@pytest.fixture
def paused(alice):
    directive = make_directive(alice)
    task = make_task(directive, daemon=make_daemon(alice), status=Task.Status.RUNNING)
    task_transition(task=task, to=Task.Status.PAUSED, updates={"question": "Which port?"})
    return task


def send(client, task, body):
    return client.post(f"/api/v1/tasks/{task.pk}/message/", body, format="json")


def test_the_owner_answers_a_paused_task_and_gets_the_task_back(api_as, alice, paused):
    response = send(api_as(alice), paused, {"message": "8080"})
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["id"] == str(paused.pk)
    assert body["status"] == "paused"  # until the daemon has delivered the answer
    assert body["question"] == "Which port?"
    command = DaemonCommand.objects.get(task=paused)
    assert (command.command_type, command.payload["message"]) == ("send_message", "8080")
    assert DirectiveEvent.objects.filter(event_type="task_answered", actor="alice").count() == 1


def test_a_user_api_key_may_answer(api, alice, paused):
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {make_token(alice).plain}")
    assert send(api, paused, {"message": "8080"}).status_code == 200
    assert DaemonCommand.objects.filter(task=paused, command_type="send_message").count() == 1


def test_a_teammate_may_answer_a_task_of_a_shared_directive(api_as, alice, carol, platform):
    directive = make_directive(alice, team=platform)
    task = make_task(directive, daemon=make_daemon(alice), status=Task.Status.RUNNING)
    task_transition(task=task, to=Task.Status.PAUSED, updates={"question": "?"})
    assert send(api_as(carol), task, {"message": "yes"}).status_code == 200


def test_a_task_that_is_not_paused_is_409(api_as, alice):
    task = make_task(make_directive(alice), daemon=make_daemon(alice), status=Task.Status.RUNNING)
    response = send(api_as(alice), task, {"message": "8080"})
    assert response.status_code == 409
    assert response.json() == {"detail": "only a paused task can be answered; this one is running"}
    assert not DaemonCommand.objects.exists()


def test_a_second_answer_before_the_first_is_delivered_is_409(api_as, alice, paused):
    client = api_as(alice)
    assert send(client, paused, {"message": "8080"}).status_code == 200
    assert send(client, paused, {"message": "9090"}).status_code == 409
    assert DaemonCommand.objects.filter(task=paused).count() == 1


def test_a_stranger_gets_404(api_as, bob, paused):
    assert send(api_as(bob), paused, {"message": "8080"}).status_code == 404
    assert not DaemonCommand.objects.exists()


def test_without_credentials_it_is_401(api, paused):
    response = send(api, paused, {"message": "8080"})
    assert response.status_code == 401
    assert not DaemonCommand.objects.exists()


def test_a_task_token_may_not_answer(api, alice, paused):
    token = make_token(alice, kind=ApiToken.Kind.TASK, task=paused)
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token.plain}")
    response = send(api, paused, {"message": "8080"})
    assert response.status_code == 403
    assert not DaemonCommand.objects.exists()


@pytest.mark.parametrize(
    "body",
    [{}, {"message": ""}, {"message": "   "}, {"message": 42}, {"message": "x" * (TASK_MESSAGE_MAX_CHARS + 1)}],
)
def test_a_missing_empty_or_oversized_message_is_400(api_as, alice, paused, body):
    response = send(api_as(alice), paused, body)
    assert response.status_code == 400
    assert "message" in response.json()["errors"]
    assert not DaemonCommand.objects.exists()


def test_the_schema_documents_the_message_action(api, db):
    schema = api.get("/api/schema/", {"format": "json"}).json()
    operation = schema["paths"]["/api/v1/tasks/{id}/message/"]["post"]
    request = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert request.endswith("/TaskMessageRequest")
    assert schema["components"]["schemas"]["TaskMessageRequest"]["required"] == ["message"]
    assert {"200", "400", "403", "404", "409"} <= set(operation["responses"])
