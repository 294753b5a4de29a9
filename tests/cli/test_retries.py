"""Agent commands ride out a short outage of the server (a deploy, a restarted
daphne, a proxy answering 502/503/504 meanwhile) instead of failing at once.

Everything here goes over real sockets: a tiny HTTP server plays the restarting
server (or its proxy), and nothing listens on the port of a server that is down.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from makima.client import ApiError, Client, Unreachable, not_sent
from tests.cli.conftest import run_makima, worker_env


@dataclass
class Answer:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    hang_s: float = 0.0  # wait this long before answering (a read timeout for a quicker client)


def ok(body: Any) -> Answer:
    return Answer(200, body)


def unavailable(status: int, retry_after: str | None = None) -> Answer:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return Answer(status, {"detail": f"unavailable ({status})"}, headers)


class Handler(BaseHTTPRequestHandler):
    server: TinyServer

    def answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = self.server.next_answer(self.command, self.path)
        time.sleep(answer.hang_s)
        body = json.dumps(answer.body).encode()
        try:
            self.send_response(answer.status)
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client gave up waiting
            pass

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class TinyServer(ThreadingHTTPServer):
    """Answers each request with the next of ``answers``; the last one repeats."""

    daemon_threads = True

    def __init__(self, answers: list[Answer], port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.answers = list(answers)
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def next_answer(self, method: str, path: str) -> Answer:
        with self.lock:
            self.seen.append((method, path))
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def serve():
    """``serve(*answers, port=0)``: a running ``TinyServer``, stopped after the test."""
    servers: list[TinyServer] = []

    def start(*answers: Answer, port: int = 0) -> TinyServer:
        server = TinyServer(list(answers), port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def free_port() -> int:
    """A port nothing listens on (yet)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FakeTime:
    """A clock that only moves when the client sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def fake_client(url: str, **kwargs: Any) -> tuple[Client, FakeTime]:
    fake = FakeTime()
    return Client(url, "k", sleep=fake.sleep, clock=fake.clock, **kwargs), fake


# --------------------------------------------------------------------------- the client


def test_it_retries_a_503_until_the_server_answers(serve):
    """With the real clock and sleep: the backoff's first 0.5 s (±25 %), then Retry-After 0 (at least 0.1 s)."""
    server = serve(unavailable(503), unavailable(503, retry_after="0"), ok({"id": "d1"}))
    notices: list[str] = []
    started = time.monotonic()
    answer = Client(server.url, "k", notify=notices.append).get("/directives/d1/")
    elapsed = time.monotonic() - started
    assert answer == {"id": "d1"}
    assert server.seen == [("GET", "/api/v1/directives/d1/")] * 3
    assert notices[0].startswith("server unavailable (503 Service Unavailable), retrying in ")
    assert 0.3 <= float(notices[0].split()[-2]) <= 0.7
    assert notices[1] == "server unavailable (503 Service Unavailable), retrying in 0.1 s"
    assert 0.45 <= elapsed < 2


def test_a_502_is_retried_even_for_a_post(serve):
    server = serve(unavailable(502), unavailable(502), ok({"id": "t1"}))
    client, fake = fake_client(server.url)
    assert client.post("/tasks/t1/complete/") == {"id": "t1"}
    assert server.seen == [("POST", "/api/v1/tasks/t1/complete/")] * 3
    first, second = fake.sleeps
    assert 0.375 <= first <= 0.625
    assert 0.75 <= second <= 1.25


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_a_504_is_not_retried_for_a_request_the_server_may_have_applied(serve, method):
    server = serve(unavailable(504), ok({}))
    client, fake = fake_client(server.url)
    with pytest.raises(ApiError) as raised:
        client.request(method, "/directives/d1/", {"pr_url": "x"})
    assert raised.value.status == 504
    assert len(server.seen) == 1
    assert fake.sleeps == []


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_a_504_is_retried_for_an_idempotent_method(serve, method):
    server = serve(unavailable(504), ok({"done": True}))
    client, _ = fake_client(server.url)
    assert client.request(method, "/directives/d1/steps/s1/") == {"done": True}
    assert [seen[0] for seen in server.seen] == [method, method]


@pytest.mark.parametrize("status", [400, 404, 409, 429])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_4xx_is_never_retried(serve, status, method):
    server = serve(Answer(status, {"detail": "no"}, {"Retry-After": "1"}), ok({}))
    client, fake = fake_client(server.url)
    with pytest.raises(ApiError) as raised:
        client.request(method, "/directives/")
    assert (raised.value.status, raised.value.detail) == (status, "no")
    assert len(server.seen) == 1
    assert fake.sleeps == []


def test_a_read_timeout_is_retried_only_for_an_idempotent_method(serve):
    server = serve(Answer(hang_s=0.6), ok({"id": "d1"}))
    client, _ = fake_client(server.url, timeout=0.3)
    assert client.get("/directives/d1/") == {"id": "d1"}
    assert len(server.seen) == 2

    server = serve(Answer(hang_s=0.6), ok({"id": "t1"}))
    client, fake = fake_client(server.url, timeout=0.3)
    with pytest.raises(Unreachable, match=r"no answer within 0\.3 s"):
        client.post("/tasks/t1/complete/")
    assert len(server.seen) == 1
    assert fake.sleeps == []


def test_a_refused_connection_is_retried_for_any_method_within_the_budget():
    client, fake = fake_client(f"http://127.0.0.1:{free_port()}", retry_for=20)
    with pytest.raises(Unreachable, match="Connection refused"):
        client.post("/tasks/t1/complete/")
    # 0.5 s doubling up to 5 s, each ±25 % but never past 5 s, the last cut to what the budget has left
    for sleep, base in zip(fake.sleeps, [0.5, 1, 2, 4], strict=False):
        assert 0.75 * base <= sleep <= min(1.25 * base, 5)
    assert all(0 < sleep <= 5 for sleep in fake.sleeps)
    assert 6 <= len(fake.sleeps) <= 9
    assert sum(fake.sleeps) == pytest.approx(20)


def test_a_retry_after_is_honoured_up_to_the_budget(serve):
    server = serve(unavailable(503, retry_after="2"), unavailable(503, retry_after="30"))
    client, fake = fake_client(server.url, retry_for=10)
    with pytest.raises(ApiError) as raised:
        client.get("/directives/")
    assert raised.value.status == 503
    assert fake.sleeps == [2, 8]
    assert len(server.seen) == 3


def test_a_budget_of_0_never_retries(serve):
    server = serve(unavailable(503), ok({}))
    client, fake = fake_client(server.url, retry_for=0)
    with pytest.raises(ApiError):
        client.get("/directives/")
    assert len(server.seen) == 1
    assert fake.sleeps == []


def test_only_a_temporary_dns_failure_counts_as_an_outage():
    assert not_sent(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    assert not not_sent(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))


# --------------------------------------------------------------------------- the command line


def task_env(url: str, **values: str) -> dict[str, str]:
    return worker_env(MAKIMA_URL=url, MAKIMA_API_KEY="mk_t_task", MAKIMA_TASK_ID="t1", **values)


def timed(*args: str, env: dict[str, str]) -> tuple[Any, float]:
    started = time.monotonic()
    result = run_makima(*args, env=env)
    return result, time.monotonic() - started


def test_a_command_waits_for_a_server_that_is_starting(serve):
    port = free_port()
    late = threading.Timer(1.0, serve, args=(ok({"id": "t1"}),), kwargs={"port": port})
    late.start()
    try:
        result, elapsed = timed("supervisor", "complete", env=task_env(f"http://127.0.0.1:{port}"))
    finally:
        late.cancel()
    assert result.returncode == 0, result.stderr
    assert result.stdout == "task t1 marked as delivered\n"
    lines = result.stderr.splitlines()
    assert lines
    assert all(
        line.startswith("makima: server unavailable ([Errno 111] Connection refused), retrying in ") for line in lines
    )
    assert 1 <= elapsed < 5


def test_retry_notices_go_to_stderr_and_the_json_to_stdout(serve):
    server = serve(unavailable(503, retry_after="0"), unavailable(503, retry_after="0"), ok({"id": "t1"}))
    result = run_makima("supervisor", "complete", "--json", "--retry-for", "5", env=task_env(server.url))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"id": "t1"}
    assert result.stderr.splitlines() == ["makima: server unavailable (503 Service Unavailable), retrying in 0.1 s"] * 2
    assert server.seen == [("POST", "/api/v1/tasks/t1/complete/")] * 3


def test_with_retry_for_0_a_command_fails_at_once():
    result, elapsed = timed(
        "--retry-for", "0", "supervisor", "complete", env=task_env(f"http://127.0.0.1:{free_port()}")
    )
    assert result.returncode == 3
    assert "retrying" not in result.stderr
    assert result.stderr.startswith("makima: cannot reach makima at ")
    assert elapsed < 3


def test_after_its_budget_a_command_fails_as_unreachable():
    env = task_env(f"http://127.0.0.1:{free_port()}", MAKIMA_RETRY_FOR="1")
    result, elapsed = timed("supervisor", "complete", env=env)
    assert result.returncode == 3
    *retries, last = result.stderr.splitlines()
    assert retries and all("retrying in" in line for line in retries)
    assert last.startswith("makima: cannot reach makima at ")
    assert 0.9 <= elapsed < 5


def test_after_its_budget_a_503_is_a_refusal(serve):
    server = serve(unavailable(503))
    result = run_makima("supervisor", "complete", env=task_env(server.url, MAKIMA_RETRY_FOR="0.3"))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == "makima: the server answered 503: unavailable (503)"
    assert len(server.seen) >= 2


def test_a_bad_retry_budget_is_a_usage_error():
    result = run_makima("supervisor", "complete", env=task_env("http://127.0.0.1:9", MAKIMA_RETRY_FOR="soon"))
    assert result.returncode == 2
    assert result.stderr == "makima: MAKIMA_RETRY_FOR must be a number of seconds (0 or more), not 'soon'\n"
