"""Every limit is configurable by a ``MAKIMA_*`` variable, has a safe default,
refuses bad values at start-up, and holds: request size (413), frame size
(``too_large`` + 1009), output retention per task, and the REST API's rate per
token (429 with ``Retry-After``), in-process and on a real daphne."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websockets
from django.conf import settings as django_settings
from rest_framework.test import APIClient

from contracts.models import ContractFile, Task, TaskOutput
from contracts.services import task_output_append
from daemons.models import ApiToken
from directives.models import Directive
from makima.api import throttle_cache
from tests.factories import make_contract, make_directive, make_task, make_token
from tests.security import security_stack

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- configuration

LIMITS = {
    # variable: (default, a valid value, an invalid value)
    "MAKIMA_MAX_REQUEST_BYTES": (5 * 1024 * 1024, "2048", "12"),
    "MAKIMA_WS_MAX_BYTES": (1024 * 1024, "4096", "0"),
    "MAKIMA_WS_RATE_PER_S": (50.0, "5", "0"),
    "MAKIMA_WS_RATE_BURST": (200, "10", "0"),
    "MAKIMA_WS_TOKEN_RATE_PER_S": (200.0, "20", "-1"),
    "MAKIMA_WS_TOKEN_RATE_BURST": (1000, "50", "many"),
    "MAKIMA_MAX_CONTRACT_FILE_BYTES": (1024 * 1024, "100", "-1"),
    "MAKIMA_TASK_OUTPUT_MAX_BYTES": (64 * 1024, "100", "0"),
    "MAKIMA_TASK_OUTPUT_MAX_LINES": (10_000, "50", "3"),
    "MAKIMA_MAX_STEPS_PER_BATCH": (500, "10", "0"),
    "MAKIMA_MAX_STEPS_PER_DIRECTIVE": (2000, "10", "zero"),
    "MAKIMA_API_RATE": ("1200/min", "5/s", "lots"),
    "MAKIMA_API_TASK_RATE": ("600/min", "0", "10/fortnight"),
}


def read_setting(name: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKIMA_")}
    env.update(environ)
    code = f"import json, makima.settings as s; print(json.dumps(s.{name}))"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_every_limit_has_its_documented_safe_default():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKIMA_")}
    code = f"import json, makima.settings as s; print(json.dumps({{n: getattr(s, n) for n in {sorted(LIMITS)!r}}}))"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(result.stdout) == {name: default for name, (default, _, _) in LIMITS.items()}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_every_limit_is_read_from_its_environment_variable(name):
    _, valid, _ = LIMITS[name]
    result = read_setting(name, {name: valid})
    assert result.returncode == 0, result.stderr
    assert str(json.loads(result.stdout)) in (valid, str(float(valid)) if valid.isdigit() else valid)


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_a_bad_limit_stops_start_up_with_a_message_naming_the_variable(name):
    _, _, invalid = LIMITS[name]
    result = read_setting(name, {name: invalid})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert name in result.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------- request size


@pytest.fixture
def contract(alice):
    return make_contract(make_directive(alice))


def bearer(plain: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
    return client


@pytest.fixture
def request_limit(settings):
    """``MAKIMA_MAX_REQUEST_BYTES`` = 4096, as settings.py applies it (Django's own body limit)."""
    settings.MAKIMA_MAX_REQUEST_BYTES = settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    return 4096


def test_a_request_body_over_the_limit_is_refused_with_413_and_stores_nothing(request_limit, alice, contract):
    client = bearer(make_token(alice).plain)
    body = json.dumps({"name": "notes.md", "content": "x" * 5000})

    response = client.post(f"/api/v1/contracts/{contract.pk}/files/", body, content_type="application/json")

    assert response.status_code == 413
    assert response.json() == {"detail": "The request body is larger than 4096 bytes (MAKIMA_MAX_REQUEST_BYTES)."}
    assert not ContractFile.objects.filter(contract=contract).exists()


def test_a_request_body_at_the_limit_is_read(request_limit, settings, alice, contract):
    settings.MAKIMA_MAX_CONTRACT_FILE_BYTES = 10_000
    client = bearer(make_token(alice).plain)
    skeleton = json.dumps({"name": "notes.md", "content": ""})
    body = json.dumps({"name": "notes.md", "content": "x" * (4096 - len(skeleton))})
    assert len(body) == 4096

    response = client.post(f"/api/v1/contracts/{contract.pk}/files/", body, content_type="application/json")

    assert response.status_code == 201, response.json()


def test_the_api_takes_json_bodies_only(alice, contract):
    client = bearer(make_token(alice).plain)

    response = client.post(f"/api/v1/contracts/{contract.pk}/files/", {"name": "notes.md", "content": "x"})

    assert response.status_code == 415
    assert "Unsupported media type" in response.json()["detail"]
    assert not ContractFile.objects.exists()


async def post_in_chunks(path: str, token: str, chunks: list[bytes]) -> tuple[int, dict[str, Any]]:
    """POST through the ASGI application the way a chunked upload arrives: no
    Content-Length, the body in several ``http.request`` messages."""
    from asgiref.testing import ApplicationCommunicator

    from makima.asgi import application

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", f"Bearer {token}".encode()),
            (b"content-type", b"application/json"),
            (b"transfer-encoding", b"chunked"),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    app = ApplicationCommunicator(application, scope)
    for index, chunk in enumerate(chunks):
        await app.send_input({"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1})
    start = await app.receive_output(10)
    body = b""
    while True:
        message = await app.receive_output(10)
        body += message.get("body", b"")
        if not message.get("more_body", False):
            break
    await app.wait(10)
    return start["status"], json.loads(body)


@pytest.mark.django_db(transaction=True)
async def test_a_chunked_body_without_content_length_over_the_limit_gets_413_and_stores_nothing(request_limit):
    from asgiref.sync import sync_to_async

    from tests.factories import make_user

    alice = await sync_to_async(make_user)("alice")
    token = (await sync_to_async(make_token)(alice)).plain
    chunk = b'{"title": "Chunked", "goal": "' + b"x" * 2000
    status, body = await post_in_chunks("/api/v1/directives/", token, [chunk, b"x" * 2000, b"x" * 2000, b'"}'])
    assert status == 413
    assert body == {"detail": "The request body is larger than 4096 bytes (MAKIMA_MAX_REQUEST_BYTES)."}
    assert not await sync_to_async(Directive.objects.exists)()


@pytest.mark.django_db(transaction=True)
async def test_a_chunked_body_within_the_limit_reaches_the_api_whole(request_limit):
    from asgiref.sync import sync_to_async

    from tests.factories import make_user

    alice = await sync_to_async(make_user)("alice")
    token = (await sync_to_async(make_token)(alice)).plain
    status, body = await post_in_chunks(
        "/api/v1/directives/", token, [b'{"title": "Chunked", ', b'"goal": "' + b"y" * 3000, b'"}']
    )
    assert status == 201, body
    directive = await sync_to_async(Directive.objects.get)()
    assert (directive.title, directive.goal) == ("Chunked", "y" * 3000)


# --------------------------------------------------------------------------- output retention


def lines(task: Task) -> list[tuple[int, str, str]]:
    return list(TaskOutput.objects.filter(task=task).order_by("seq").values_list("seq", "stream", "content"))


def test_a_task_keeps_its_newest_lines_and_says_how_many_were_dropped(settings, alice):
    settings.MAKIMA_TASK_OUTPUT_MAX_LINES = 10
    task = make_task(make_directive(alice))

    for start in range(1, 26, 5):  # 25 lines in batches of 5, as a daemon sends them
        task_output_append(task=task, items=[{"seq": n, "content": f"line {n}"} for n in range(start, start + 5)])

    kept = lines(task)
    assert len(kept) == 10
    assert kept[0][:2] == (16, "system")
    assert kept[0][2].startswith("[makima] output lines 1–16 were dropped")
    assert "MAKIMA_TASK_OUTPUT_MAX_LINES" in kept[0][2]
    assert [seq for seq, _, _ in kept[1:]] == list(range(17, 26))
    assert [content for _, _, content in kept[1:]] == [f"line {n}" for n in range(17, 26)]


def test_retention_holds_when_old_lines_are_sent_again_after_a_reconnect(settings, alice):
    settings.MAKIMA_TASK_OUTPUT_MAX_LINES = 10
    task = make_task(make_directive(alice))
    task_output_append(task=task, items=[{"seq": n, "content": f"line {n}"} for n in range(1, 31)])
    before = lines(task)

    task_output_append(task=task, items=[{"seq": n, "content": f"line {n}"} for n in range(1, 31)])

    assert lines(task) == before
    assert len(before) == 10


def test_a_reader_following_the_output_is_told_which_lines_it_missed(settings, alice):
    settings.MAKIMA_TASK_OUTPUT_MAX_LINES = 10
    task = make_task(make_directive(alice))
    client = bearer(make_token(alice).plain)
    task_output_append(task=task, items=[{"seq": n, "content": f"line {n}"} for n in range(1, 6)])
    first = client.get(f"/api/v1/tasks/{task.pk}/output/").json()
    assert [item["seq"] for item in first["items"]] == [1, 2, 3, 4, 5]

    task_output_append(task=task, items=[{"seq": n, "content": f"line {n}"} for n in range(6, 21)])
    following = client.get(f"/api/v1/tasks/{task.pk}/output/", {"after_seq": first["next_after_seq"]}).json()

    # Lines 6–11 went before it looked again: the marker in their place says so.
    assert [item["seq"] for item in following["items"]] == list(range(11, 21))
    assert following["items"][0]["stream"] == "system"
    assert "output lines 1–11 were dropped" in following["items"][0]["content"]


def test_a_line_over_the_byte_limit_is_cut_at_that_many_bytes_not_characters(settings, alice):
    settings.MAKIMA_TASK_OUTPUT_MAX_BYTES = 100
    task = make_task(make_directive(alice))

    task_output_append(task=task, items=[{"seq": 1, "content": "€" * 100}])  # 300 bytes

    (_, _, content) = lines(task)[0]
    kept, marker = content.split("\n")
    assert len(kept.encode()) <= 100
    assert kept == "€" * 33
    assert marker == "… [cut]"


# --------------------------------------------------------------------------- rate per token


def test_an_api_key_over_its_rate_gets_429_with_retry_after(settings, alice):
    settings.MAKIMA_API_RATE = "3/min"
    client = bearer(make_token(alice).plain)

    answers = [client.get("/api/v1/directives/") for _ in range(4)]

    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert 0 < int(answers[-1]["Retry-After"]) <= 60
    assert answers[-1].json()["detail"].startswith("Request was throttled.")


def test_each_token_has_its_own_count(settings, alice):
    settings.MAKIMA_API_RATE = "2/min"
    first, second = bearer(make_token(alice).plain), bearer(make_token(alice).plain)
    for _ in range(2):
        assert first.get("/api/v1/directives/").status_code == 200

    assert first.get("/api/v1/directives/").status_code == 429
    assert second.get("/api/v1/directives/").status_code == 200


def test_task_tokens_have_their_own_rate(settings, alice):
    settings.MAKIMA_API_RATE = "100/min"
    settings.MAKIMA_API_TASK_RATE = "2/min"
    directive = make_directive(alice)
    task = make_task(directive, status=Task.Status.RUNNING)
    agent = bearer(make_token(alice, kind=ApiToken.Kind.TASK, task=task).plain)
    url = f"/api/v1/directives/{directive.pk}/"

    assert [agent.get(url).status_code for _ in range(3)] == [200, 200, 429]
    assert bearer(make_token(alice).plain).get(url).status_code == 200


def test_a_rate_of_0_turns_the_limit_off(settings, alice):
    settings.MAKIMA_API_RATE = "0"
    client = bearer(make_token(alice).plain)
    assert all(client.get("/api/v1/directives/").status_code == 200 for _ in range(30))


def test_browser_sessions_are_not_counted(settings, alice):
    settings.MAKIMA_API_RATE = "1/min"
    client = APIClient()
    client.force_login(alice)
    assert [client.get("/api/v1/directives/").status_code for _ in range(3)] == [200, 200, 200]


def test_the_count_is_shared_through_redis_when_it_is_configured(settings, alice):
    if not django_settings.REDIS_URL:
        pytest.skip("REDIS_URL is not set: counts live in the process's own cache")
    settings.MAKIMA_API_RATE = "5/min"
    new = make_token(alice)
    bearer(new.plain).get("/api/v1/directives/")

    history = throttle_cache().get(f"rate:token:{new.token.pk}")

    assert isinstance(history, list)
    assert len(history) == 1


def test_a_failing_count_store_lets_requests_through_rather_than_failing_them(settings, alice, monkeypatch):
    settings.MAKIMA_API_RATE = "1/min"

    class Down:
        def get(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("redis is down")

        set = get

    monkeypatch.setattr("makima.api.throttle_cache", Down)
    client = bearer(make_token(alice).plain)

    assert [client.get("/api/v1/directives/").status_code for _ in range(3)] == [200, 200, 200]


# --------------------------------------------------------------------------- on a real server


def raw_post(url: str, token: str, body: bytes) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


def raw_get(url: str, token: str) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


@pytest.mark.slow
def test_the_limits_hold_on_a_real_server_which_stays_up():
    env = {"MAKIMA_MAX_REQUEST_BYTES": "65536", "MAKIMA_WS_MAX_BYTES": "8192", "MAKIMA_API_RATE": "20/min"}
    with security_stack(env) as stack:
        base = stack.base_url + "/api/v1"
        status, _, directive = raw_post(
            f"{base}/directives/", stack.api_key, json.dumps({"title": "Limits", "goal": "g"}).encode()
        )
        assert status == 201

        # A 1 MiB body to a 64 KiB server: 413 with the JSON error, nothing created.
        big = json.dumps({"title": "Too big", "goal": "x" * 1024 * 1024}).encode()
        status, _, body = raw_post(f"{base}/directives/", stack.api_key, big)
        assert (status, body["detail"]) == (
            413,
            "The request body is larger than 65536 bytes (MAKIMA_MAX_REQUEST_BYTES).",
        )

        # The same body sent chunked, without a Content-Length: 413 too, before it is all stored.
        parsed = urllib.parse.urlsplit(stack.base_url)
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=15)
        chunks = (big[i : i + 16384] for i in range(0, 128 * 1024, 16384))
        headers = {"Authorization": f"Bearer {stack.api_key}", "Content-Type": "application/json"}
        connection.request("POST", "/api/v1/directives/", body=chunks, headers=headers, encode_chunked=True)
        answer = connection.getresponse()
        assert (answer.status, json.loads(answer.read())["detail"]) == (
            413,
            "The request body is larger than 65536 bytes (MAKIMA_MAX_REQUEST_BYTES).",
        )
        connection.close()
        status, _, page = raw_get(f"{base}/directives/", stack.api_key)
        assert [d["title"] for d in page["results"]] == ["Limits"]

        # A frame over the websocket limit: too_large, then close 1009 (protocol.md).
        async def oversized_frame() -> tuple[dict[str, Any], int | None]:
            async with websockets.connect(
                stack.ws_url, additional_headers={"Authorization": f"Bearer {stack.daemon_token}"}
            ) as socket:
                await socket.send(json.dumps({"type": "heartbeat", "running_tasks": [], "pad": "x" * 9000}))
                error = json.loads(await asyncio.wait_for(socket.recv(), 5))
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(socket.recv(), 5)
                return error, closed.value.rcvd.code if closed.value.rcvd else None

        error, code = asyncio.run(oversized_frame())
        assert (error["type"], error["code"], code) == ("error", "too_large", 1009)

        # The rate: 20 a minute for this key; the ones above count.
        answers = [raw_get(f"{base}/directives/", stack.api_key) for _ in range(25)]
        statuses = [status for status, _, _ in answers]
        assert statuses.count(429) >= 5 and 429 in statuses
        first_refusal = statuses.index(429)
        assert set(statuses[first_refusal:]) == {429}
        assert int(answers[first_refusal][1]["Retry-After"]) > 0

        # Still up: another key works at once.
        other = stack.manage("createapikey", "alice", "--name", "other").strip().splitlines()[-1]
        status, _, listing = raw_get(f"{base}/directives/", other)
        assert (status, [d["id"] for d in listing["results"]]) == (200, [directive["id"]])
