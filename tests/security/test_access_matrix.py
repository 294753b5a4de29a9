"""The access matrix: who gets what from every API endpoint, every dashboard
page and both websockets (spec 2 and 5.1).

Subjects: alice (owner, session), carol (alice's teammate: alice's directive
is shared with their team), bob (a stranger), root (staff: the admin is
theirs, the API and dashboard show them only their own), alice's user API
key, alice's daemon token, a task token of alice's directive "mine", and
tokens that must fail: expired, revoked, garbage, none.

Expected: the owner's answer where one may act (200/201/204, or the 409 the
object's state gives); 404 for what one may not see; 403 for a task token
outside its directive and contract, or on what only people do; 401 for
missing, bad, expired or revoked credentials. Every request runs in a
savepoint that is rolled back, so each one sees the same world.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
import time_machine
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.db import connections, transaction
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from contracts.models import Task
from contracts.services import task_transition
from daemons.models import ApiToken
from daemons.services import token_revoke
from makima.asgi import application
from makima.state import SYSTEM
from tests.daemons.conftest import db, hello_message
from tests.factories import make_directive, make_task, make_team, make_token, make_user
from tests.security import World, make_world, replies_until_handled

SESSIONS = ("alice", "carol", "bob", "root")
BEARERS = ("alice_key", "alice_daemon", "task_token", "expired_key", "revoked_key", "garbage")
SUBJECTS = (*SESSIONS, *BEARERS, "anonymous")
UNAUTHENTICATED = ("alice_daemon", "expired_key", "revoked_key", "garbage", "anonymous")


@dataclass(frozen=True)
class Endpoint:
    """One API call. ``owner`` is alice's answer; ``scope`` says where the
    object lives: "mine" (alice's directive shared with the team, the task
    token's), "sibling" (alice's other directive, not shared), "bobs",
    "alice" (alice's objects outside any directive: orders, daemons, tokens),
    "own" (lists and creates: each subject's own)."""

    name: str
    method: str
    url: str
    owner: int
    scope: str
    body: dict[str, Any] | None = None
    people_only: bool = False  # a person's decision: task tokens get 403 even in scope


def endpoints(w: World) -> list[Endpoint]:
    m, s, b = w.mine, w.sibling, w.bobs
    d, step_a, step_b = m.directive.pk, m.steps[0].pk, m.steps[1].pk
    return [
        # directives
        Endpoint("directive list", "get", "/api/v1/directives/", 200, "own"),
        Endpoint("directive create", "post", "/api/v1/directives/", 201, "own", {"title": "T", "goal": "G"}),
        Endpoint("directive detail", "get", f"/api/v1/directives/{d}/", 200, "mine"),
        Endpoint("directive edit", "patch", f"/api/v1/directives/{d}/", 200, "mine", {"title": "Renamed"}),
        Endpoint("directive start", "post", f"/api/v1/directives/{d}/start/", 200, "mine"),
        Endpoint("directive pause", "post", f"/api/v1/directives/{d}/pause/", 409, "mine", {}),
        Endpoint("directive stop", "post", f"/api/v1/directives/{d}/stop/", 200, "mine", {"reason": "enough"}),
        Endpoint("directive archive", "post", f"/api/v1/directives/{d}/archive/", 409, "mine"),
        Endpoint("sibling directive detail", "get", f"/api/v1/directives/{s.directive.pk}/", 200, "sibling"),
        Endpoint("sibling directive stop", "post", f"/api/v1/directives/{s.directive.pk}/stop/", 200, "sibling", {}),
        Endpoint("bob's directive detail", "get", f"/api/v1/directives/{b.directive.pk}/", 404, "bobs"),
        # steps and events
        Endpoint("step list", "get", f"/api/v1/directives/{d}/steps/", 200, "mine"),
        Endpoint("step add", "post", f"/api/v1/directives/{d}/steps/", 201, "mine", {"name": "C", "depends_on": ["A"]}),
        Endpoint("step batch", "post", f"/api/v1/directives/{d}/steps/batch/", 201, "mine", {"steps": [{"name": "D"}]}),
        Endpoint("step detail", "get", f"/api/v1/directives/{d}/steps/{step_a}/", 200, "mine"),
        Endpoint("step edit", "patch", f"/api/v1/directives/{d}/steps/{step_b}/", 200, "mine", {"task_plan": "p"}),
        Endpoint("step remove", "delete", f"/api/v1/directives/{d}/steps/{step_b}/", 204, "mine"),
        Endpoint("step skip", "post", f"/api/v1/directives/{d}/steps/{step_b}/skip/", 200, "mine"),
        Endpoint("step retry", "post", f"/api/v1/directives/{d}/steps/{step_b}/retry/", 409, "mine"),
        Endpoint("step evaluate", "post", f"/api/v1/directives/{d}/steps/{step_b}/evaluate/", 409, "mine"),
        Endpoint("sibling step list", "get", f"/api/v1/directives/{s.directive.pk}/steps/", 200, "sibling"),
        Endpoint(
            "sibling step add", "post", f"/api/v1/directives/{s.directive.pk}/steps/", 201, "sibling", {"name": "X"}
        ),
        Endpoint("bob's step list", "get", f"/api/v1/directives/{b.directive.pk}/steps/", 404, "bobs"),
        Endpoint("event list", "get", f"/api/v1/directives/{d}/events/", 200, "mine"),
        Endpoint("sibling event list", "get", f"/api/v1/directives/{s.directive.pk}/events/", 200, "sibling"),
        # chains, evaluations, approvals
        Endpoint("chain list", "get", "/api/v1/chains/", 200, "own"),
        Endpoint("chain detail", "get", f"/api/v1/chains/{m.chain.pk}/", 200, "mine"),
        Endpoint("sibling chain detail", "get", f"/api/v1/chains/{s.chain.pk}/", 200, "sibling"),
        Endpoint("evaluation list", "get", "/api/v1/evaluations/", 200, "own"),
        Endpoint("evaluation detail", "get", f"/api/v1/evaluations/{m.evaluation.pk}/", 200, "mine"),
        Endpoint("sibling evaluation detail", "get", f"/api/v1/evaluations/{s.evaluation.pk}/", 200, "sibling"),
        Endpoint("approval list", "get", "/api/v1/approvals/", 200, "own"),
        Endpoint("approval detail", "get", f"/api/v1/approvals/{m.approval.pk}/", 200, "mine"),
        Endpoint("approval approve", "post", f"/api/v1/approvals/{m.approval.pk}/approve/", 200, "mine", {}, True),
        Endpoint(
            "approval deny", "post", f"/api/v1/approvals/{m.approval.pk}/deny/", 200, "mine", {"note": "no"}, True
        ),
        Endpoint("bob's approval detail", "get", f"/api/v1/approvals/{b.approval.pk}/", 404, "bobs"),
        # orders (alice's, not linked: hers alone)
        Endpoint("order list", "get", "/api/v1/orders/", 200, "own", people_only=True),
        Endpoint("order create", "post", "/api/v1/orders/", 201, "own", {"title": "O"}, True),
        Endpoint("order detail", "get", f"/api/v1/orders/{m.order.pk}/", 200, "alice", people_only=True),
        Endpoint("order edit", "patch", f"/api/v1/orders/{m.order.pk}/", 200, "alice", {"title": "O2"}, True),
        Endpoint("order link", "post", f"/api/v1/orders/{m.order.pk}/link/", 200, "alice", {"directive": str(d)}, True),
        Endpoint("order cancel", "post", f"/api/v1/orders/{m.order.pk}/cancel/", 200, "alice", people_only=True),
        Endpoint("order delete", "delete", f"/api/v1/orders/{m.order.pk}/", 204, "alice", people_only=True),
        # contracts and files
        Endpoint("contract list", "get", "/api/v1/contracts/", 200, "own"),
        Endpoint("contract detail", "get", f"/api/v1/contracts/{m.contract.pk}/", 200, "mine"),
        Endpoint("sibling contract detail", "get", f"/api/v1/contracts/{s.contract.pk}/", 200, "sibling"),
        Endpoint("bob's contract detail", "get", f"/api/v1/contracts/{b.contract.pk}/", 404, "bobs"),
        Endpoint("file list", "get", f"/api/v1/contracts/{m.contract.pk}/files/", 200, "mine"),
        Endpoint(
            "file create",
            "post",
            f"/api/v1/contracts/{m.contract.pk}/files/",
            201,
            "mine",
            {"name": "n.md", "content": "x"},
        ),
        Endpoint("file detail", "get", f"/api/v1/contracts/{m.contract.pk}/files/{m.file.pk}/", 200, "mine"),
        Endpoint(
            "sibling file create",
            "post",
            f"/api/v1/contracts/{s.contract.pk}/files/",
            201,
            "sibling",
            {"name": "n.md", "content": "x"},
        ),
        Endpoint("bob's file detail", "get", f"/api/v1/contracts/{b.contract.pk}/files/{b.file.pk}/", 404, "bobs"),
        # tasks and their output
        Endpoint("task list", "get", "/api/v1/tasks/", 200, "own"),
        Endpoint("task detail", "get", f"/api/v1/tasks/{m.task.pk}/", 200, "mine"),
        Endpoint("task output", "get", f"/api/v1/tasks/{m.task.pk}/output/", 200, "mine"),
        Endpoint("task complete", "post", f"/api/v1/tasks/{m.task.pk}/complete/", 200, "mine"),
        Endpoint("task answer", "post", f"/api/v1/tasks/{m.task.pk}/message/", 409, "mine", {"message": "yes"}, True),
        Endpoint("sibling task output", "get", f"/api/v1/tasks/{s.task.pk}/output/", 200, "sibling"),
        Endpoint("sibling task complete", "post", f"/api/v1/tasks/{s.task.pk}/complete/", 200, "sibling"),
        Endpoint("bob's task output", "get", f"/api/v1/tasks/{b.task.pk}/output/", 404, "bobs"),
        # daemons and tokens (alice's alone)
        Endpoint("daemon list", "get", "/api/v1/daemons/", 200, "own", people_only=True),
        Endpoint("daemon detail", "get", f"/api/v1/daemons/{m.daemon.pk}/", 200, "alice", people_only=True),
        Endpoint("token list", "get", "/api/v1/tokens/", 200, "own", people_only=True),
        Endpoint("token create", "post", "/api/v1/tokens/", 201, "own", {"name": "k"}, True),
        Endpoint("token detail", "get", f"/api/v1/tokens/{w.spare_token.pk}/", 200, "alice", people_only=True),
        Endpoint("token revoke", "post", f"/api/v1/tokens/{w.spare_token.pk}/revoke/", 200, "alice", people_only=True),
    ]


def expected(subject: str, endpoint: Endpoint) -> int:
    """The answer ``subject`` must get (the rules of spec 2 and 5.1)."""
    if subject in UNAUTHENTICATED:
        return 401
    if subject == "task_token":
        if endpoint.people_only or endpoint.scope in ("alice", "sibling"):
            return 403  # same owner, outside its directive, or a person's decision
        if endpoint.name == "directive create":
            return 403
        return 404 if endpoint.scope == "bobs" else endpoint.owner
    if subject in ("alice", "alice_key"):
        return endpoint.owner
    # carol, bob, root: their own lists and creates work; alice's objects are
    # visible to carol only through the shared directive.
    if endpoint.scope == "own":
        return endpoint.owner
    if subject == "carol" and endpoint.scope == "mine":
        return endpoint.owner
    if endpoint.scope == "bobs":
        return endpoint.owner if subject != "bob" else {404: 200}.get(endpoint.owner, endpoint.owner)
    return 404


@pytest.fixture
def world(db: Any, settings: Any) -> World:
    settings.MAKIMA_API_RATE = settings.MAKIMA_API_TASK_RATE = "0"
    return make_world()


def client_for(subject: str, w: World) -> APIClient:
    client = APIClient()
    if subject in SESSIONS:
        client.force_login(getattr(w, subject))
    elif subject == "garbage":
        client.credentials(HTTP_AUTHORIZATION="Bearer mk_u_" + "A" * 43)
    elif subject != "anonymous":
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {w.keys[subject]}")
    return client


def call(client: APIClient, endpoint: Endpoint) -> Any:
    """The request in a savepoint that is rolled back: every call sees the same world."""
    with transaction.atomic():
        send = getattr(client, endpoint.method)
        if endpoint.body is None:
            response = send(endpoint.url)
        else:
            response = send(endpoint.url, json.dumps(endpoint.body), content_type="application/json")
        transaction.set_rollback(True)
    return response


@pytest.mark.parametrize("subject", SUBJECTS)
def test_the_api_answers_every_subject_as_the_access_rules_say(world, subject):
    client = client_for(subject, world)
    table = endpoints(world)

    actual = {e.name: call(client, e).status_code for e in table}

    assert actual == {e.name: expected(subject, e) for e in table}


@pytest.mark.parametrize("subject", SUBJECTS)
def test_every_refusal_is_a_json_error_that_leaks_nothing(world, subject):
    client = client_for(subject, world)
    for endpoint in endpoints(world):
        response = call(client, endpoint)
        if response.status_code < 400:
            continue
        body = response.json()
        assert isinstance(body.get("detail"), str), (endpoint.name, body)
        if response.status_code in (401, 403, 404):
            # Nothing about the object refused: no title, no owner, no id other than the one asked for.
            text = json.dumps(body)
            assert world.mine.directive.title not in text and "alice" not in text.lower(), (endpoint.name, body)


@pytest.mark.parametrize("subject", ["bob", "root", "task_token", "carol"])
def test_lists_hold_nothing_a_subject_may_not_see(world, subject):
    client = client_for(subject, world)
    m, s, b = world.mine, world.sibling, world.bobs
    # What each subject may see, per list.
    visible = {
        "bob": {"directives": {b.directive.pk}, "contracts": {b.contract.pk}, "tasks": {b.task.pk}},
        "root": {"directives": set(), "contracts": set(), "tasks": set()},
        "task_token": {"directives": {m.directive.pk}, "contracts": {m.contract.pk}, "tasks": {m.task.pk}},
        "carol": {"directives": {m.directive.pk}, "contracts": {m.contract.pk}, "tasks": {m.task.pk}},
    }[subject]
    for name, ids in visible.items():
        rows = client.get(f"/api/v1/{name}/").json()["results"]
        assert {row["id"] for row in rows} == {str(pk) for pk in ids}, name
    chains = {row["id"] for row in client.get("/api/v1/chains/").json()["results"]}
    assert str(s.chain.pk) not in chains


# --------------------------------------------------------------------------- credentials that stop working


def test_a_revoked_api_key_fails_on_the_very_next_request(world):
    client = client_for("alice_key", world)
    token = ApiToken.objects.get(name="alice key")
    assert client.get("/api/v1/directives/").status_code == 200

    token_revoke(token=token, actor=SYSTEM)

    response = client.get("/api/v1/directives/")
    assert (response.status_code, response.json()["detail"]) == (401, "Invalid, expired or revoked token.")


def test_an_api_key_fails_the_moment_it_expires(world):
    new = make_token(world.alice, name="short", expires_at=timezone.now() + timedelta(minutes=5))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {new.plain}")
    assert client.get("/api/v1/directives/").status_code == 200

    with time_machine.travel(new.token.expires_at, tick=False):
        assert client.get("/api/v1/directives/").status_code == 401
    with time_machine.travel(new.token.expires_at - timedelta(seconds=1), tick=False):
        assert client.get("/api/v1/directives/").status_code == 200


@pytest.mark.parametrize("end", [Task.Status.DONE, Task.Status.FAILED, Task.Status.CANCELLED, Task.Status.INTERRUPTED])
def test_a_task_token_fails_the_moment_its_task_ends(world, end):
    client = client_for("task_token", world)
    url = f"/api/v1/directives/{world.mine.directive.pk}/"
    assert client.get(url).status_code == 200

    task_transition(task=world.mine.task, to=end)

    assert client.get(url).status_code == 401


def test_a_task_token_cannot_touch_another_directive_of_its_owner_even_by_naming_it_in_a_body(world):
    client = client_for("task_token", world)
    sibling = world.sibling
    before = sibling.directive.steps.count()

    batch = client.post(
        f"/api/v1/directives/{world.mine.directive.pk}/steps/batch/",
        json.dumps({"steps": [{"name": "Sneak", "depends_on": [str(sibling.steps[0].pk)]}]}),
        content_type="application/json",
    )
    link = client.post(
        f"/api/v1/orders/{world.mine.order.pk}/link/",
        json.dumps({"directive": str(sibling.directive.pk)}),
        content_type="application/json",
    )

    assert batch.status_code == 400  # a step of another directive is not a dependency
    assert link.status_code == 403
    assert sibling.directive.steps.count() == before


def test_a_user_key_is_refused_by_the_daemon_socket_and_a_daemon_token_by_the_api(world):
    daemon_client = client_for("alice_daemon", world)
    response = daemon_client.get("/api/v1/directives/")
    assert (response.status_code, response.json()["detail"]) == (
        401,
        "Daemon tokens only open the daemon websocket; use an API key.",
    )


# --------------------------------------------------------------------------- dashboard pages


def pages(w: World) -> list[tuple[str, str, str]]:
    """(name, url, scope) of every dashboard page that shows an object or a list."""
    m = w.mine
    d = m.directive.pk
    return [
        ("directive list", "/", "own"),
        ("directive page", f"/directives/{d}/", "mine"),
        ("directive edit", f"/directives/{d}/edit/", "mine"),
        ("chain editor", f"/directives/{d}/chain/", "mine"),
        ("step panel", f"/directives/{d}/steps/{m.steps[0].pk}/", "mine"),
        ("task output", f"/tasks/{m.task.pk}/output/", "mine"),
        ("sibling directive page", f"/directives/{w.sibling.directive.pk}/", "sibling"),
        ("bob's directive page", f"/directives/{w.bobs.directive.pk}/", "bobs"),
        ("approvals inbox", "/approvals/", "own"),
        ("orders board", "/orders/", "own"),
        ("order edit", f"/orders/{m.order.pk}/edit/", "alice"),
        ("daemons", "/daemons/", "own"),
        ("api keys", "/keys/", "own"),
    ]


def expected_page(subject: str, scope: str) -> int:
    if subject not in SESSIONS:
        return 302  # to the sign-in page: bearer tokens are for the API, not the dashboard
    if scope == "own":
        return 200
    if scope == "bobs":
        return 200 if subject == "bob" else 404
    if scope == "mine" and subject in ("alice", "carol"):
        return 200
    return 200 if subject == "alice" else 404


@pytest.mark.parametrize("subject", SUBJECTS)
def test_the_dashboard_answers_every_subject_as_the_access_rules_say(world, subject):
    client = Client()
    if subject in SESSIONS:
        client.force_login(getattr(world, subject))
    elif subject not in ("anonymous", "garbage"):
        client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {world.keys[subject]}"
    table = pages(world)

    actual = {name: client.get(url).status_code for name, url, _ in table}

    assert actual == {name: expected_page(subject, scope) for name, _, scope in table}


@pytest.mark.parametrize("subject", ["bob", "carol"])
def test_the_dashboard_shows_no_one_elses_daemons_keys_or_orders(world, subject):
    client = Client()
    client.force_login(getattr(world, subject))
    for url in ("/daemons/", "/keys/", "/orders/", "/approvals/", "/"):
        html = client.get(url).content.decode()
        assert "alice-box" not in html and "alice key" not in html and "Order of Alice" not in html, url
        if subject == "bob":
            assert "Alice&#x27;s" not in html and "Alice's" not in html, url


# --------------------------------------------------------------------------- websockets


@pytest.fixture
async def close_consumer_connections() -> AsyncIterator[None]:
    yield
    await db(connections.close_all)()


@pytest.fixture
async def sockets(close_consumer_connections: None) -> AsyncIterator[Callable[..., Any]]:
    opened: list[WebsocketCommunicator] = []

    async def open_(path: str, headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
        socket = WebsocketCommunicator(application, path, headers=headers)
        opened.append(socket)
        connected, _ = await socket.connect()
        assert connected
        return socket

    yield open_
    for socket in opened:
        await socket.disconnect()


def allowed_origin() -> bytes:
    host = next(
        (h for h in django_settings.ALLOWED_HOSTS if h not in ("*", "testserver") and not h.startswith(".")), None
    )
    return f"http://{host or 'localhost'}".encode()


@db
def socket_world() -> dict[str, Any]:
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    team = make_team("platform", alice, carol)
    directive = make_directive(alice, team=team)
    task = make_task(directive, status=Task.Status.RUNNING)
    cookies = {}
    for user in (alice, bob, carol):
        client = Client()
        client.force_login(user)
        cookies[user.username] = f"sessionid={client.cookies['sessionid'].value}".encode()
    revoked = make_token(alice, kind=ApiToken.Kind.DAEMON)
    token_revoke(token=revoked.token, actor=SYSTEM)
    return {
        "directive": directive,
        "cookies": cookies,
        "daemon_token": make_token(alice, kind=ApiToken.Kind.DAEMON).plain,
        "user_key": make_token(alice).plain,
        "task_token": make_token(alice, kind=ApiToken.Kind.TASK, task=task).plain,
        "expired": make_token(alice, kind=ApiToken.Kind.DAEMON, expires_at=timezone.now()).plain,
        "revoked": revoked.plain,
    }


DAEMON_SOCKET = {
    "daemon_token": None,  # stays open
    "user_key": 4401,
    "task_token": 4401,
    "expired": 4401,
    "revoked": 4401,
    "garbage": 4401,
    "none": 4401,
}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("credential", "close"), DAEMON_SOCKET.items())
async def test_the_daemon_socket_opens_only_for_a_live_daemon_token(sockets, credential, close):
    w = await socket_world()
    plain = {"garbage": "mk_d_" + "A" * 43, "none": None}.get(credential, w.get(credential))
    socket = await sockets("/ws/daemon/", [(b"authorization", f"Bearer {plain}".encode())] if plain else [])

    if close is None:
        await socket.send_json_to(hello_message("box"))
        assert (await socket.receive_json_from(timeout=2))["type"] == "welcome"
    else:
        assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": close}


LIVE_SOCKET = {"alice": None, "carol": None, "bob": 4404, "anonymous": 4401}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("who", "close"), LIVE_SOCKET.items())
async def test_the_live_feed_opens_only_for_someone_who_may_see_the_directive(sockets, who, close):
    w = await socket_world()
    headers = [(b"origin", allowed_origin())]
    if who != "anonymous":
        headers.append((b"cookie", w["cookies"][who]))
    socket = await sockets(f"/ws/directives/{w['directive'].pk}/", headers)

    if close is None:
        assert await socket.receive_nothing(timeout=0.3)  # open and quiet
    else:
        output = await socket.receive_output(timeout=2)
        assert output == {"type": "websocket.close", "code": close}


@pytest.mark.django_db(transaction=True)
async def test_a_bearer_token_does_not_open_the_live_feed(sockets):
    w = await socket_world()
    headers = [(b"origin", allowed_origin()), (b"authorization", f"Bearer {w['user_key']}".encode())]
    socket = await sockets(f"/ws/directives/{w['directive'].pk}/", headers)
    assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 4401}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("said_hello", [True, False], ids=["after-hello", "before-hello"])
async def test_revoking_a_daemon_token_closes_its_open_socket_at_once(sockets, settings, said_hello):
    # The outbox poll (the fallback) is far away: only the revocation itself can close the socket in time.
    settings.MAKIMA_OUTBOX_POLL_S = 60
    w = await socket_world()
    socket = await sockets("/ws/daemon/", [(b"authorization", f"Bearer {w['daemon_token']}".encode())])
    if said_hello:
        await socket.send_json_to(hello_message("box"))
        assert (await socket.receive_json_from(timeout=2))["type"] == "welcome"

    @db
    def revoke() -> None:
        token = ApiToken.objects.get(kind=ApiToken.Kind.DAEMON, revoked_at__isnull=True, expires_at__isnull=True)
        token_revoke(token=token, actor=SYSTEM)

    started = asyncio.get_running_loop().time()
    await revoke()

    assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 4401}
    assert asyncio.get_running_loop().time() - started < 1.0


@pytest.mark.django_db(transaction=True)
async def test_revoking_another_token_leaves_a_socket_open(sockets, settings):
    w = await socket_world()
    socket = await sockets("/ws/daemon/", [(b"authorization", f"Bearer {w['daemon_token']}".encode())])
    await socket.send_json_to(hello_message("box"))
    assert (await socket.receive_json_from(timeout=2))["type"] == "welcome"

    @db
    def revoke_another() -> None:
        other = make_token(w["directive"].owner, kind=ApiToken.Kind.DAEMON)
        token_revoke(token=other.token, actor=SYSTEM)

    await revoke_another()

    assert await socket.receive_nothing(timeout=0.5)
    await socket.send_json_to({"type": "heartbeat", "running_tasks": []})
    assert await replies_until_handled(socket) == []  # still open, still answering


@pytest.mark.django_db(transaction=True)
async def test_a_daemon_token_that_expires_on_an_open_socket_fails_at_its_next_message(sockets, settings):
    settings.MAKIMA_OUTBOX_POLL_S = 60
    w = await socket_world()

    @db
    def short_lived() -> str:
        return make_token(
            w["directive"].owner, kind=ApiToken.Kind.DAEMON, expires_at=timezone.now() + timedelta(seconds=1)
        ).plain

    socket = await sockets("/ws/daemon/", [(b"authorization", f"Bearer {await short_lived()}".encode())])
    await socket.send_json_to(hello_message("box"))
    assert (await socket.receive_json_from(timeout=2))["type"] == "welcome"

    await asyncio.sleep(1.1)
    await socket.send_json_to({"type": "heartbeat", "running_tasks": []})

    assert await socket.receive_output(timeout=2) == {"type": "websocket.close", "code": 4401}


@pytest.mark.django_db(transaction=True)
async def test_a_silent_socket_whose_token_expired_is_closed_by_the_outbox_poll(sockets, settings):
    settings.MAKIMA_OUTBOX_POLL_S = 0.1
    w = await socket_world()

    @db
    def short_lived() -> str:
        return make_token(
            w["directive"].owner, kind=ApiToken.Kind.DAEMON, expires_at=timezone.now() + timedelta(seconds=1)
        ).plain

    socket = await sockets("/ws/daemon/", [(b"authorization", f"Bearer {await short_lived()}".encode())])
    await socket.send_json_to(hello_message("box"))
    assert (await socket.receive_json_from(timeout=2))["type"] == "welcome"

    assert await socket.receive_output(timeout=3) == {"type": "websocket.close", "code": 4401}
