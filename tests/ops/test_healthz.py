"""``GET /healthz``: 200 when the database, the channel layer and a django-q2
cluster are all there, else 503 naming what failed, and never a secret.

Failures are real: a Redis URL or a database URL pointing at a closed port,
a socket that accepts and never answers, a schedule no scheduler has moved,
no cluster process; the positive cluster checks run a real ``qcluster``."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.utils import timezone
from django_q.brokers.orm import ORM
from django_q.conf import Conf
from django_q.models import Schedule
from django_q.signing import SignedPackage
from django_q.status import Stat, Status
from prometheus_client.parser import text_string_to_metric_families

from makima import health
from tests.e2e.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
REDIS_DB_URL = "redis://127.0.0.1:6379/11"  # this suite's own Redis database


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    return free_port()


def redis_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def cluster_is_reported_like_a_sentinel() -> None:
    """Make the cluster check pass the way a running cluster makes it pass: the
    schedule that `setup_schedules` creates (its next run is in the future), and
    with the Redis broker the status a sentinel saves every half second."""
    call_command("setup_schedules", stdout=open(os.devnull, "w"))  # noqa: SIM115
    broker = health._broker()
    if not isinstance(broker, ORM):
        status = Status(pid=os.getpid(), cluster_id=uuid.uuid4())
        status.status = Conf.IDLE
        broker.set_stat(Stat.get_key(status.cluster_id), SignedPackage.dumps(status, True), 3)


def redis_layer(url: str) -> dict[str, Any]:
    return {"default": {"BACKEND": "channels_redis.core.RedisChannelLayer", "CONFIG": {"hosts": [url]}}}


# --------------------------------------------------------------------------- in-process


@pytest.mark.django_db
def test_healthz_answers_200_when_the_database_the_channel_layer_and_a_cluster_are_up(client, settings):
    cluster_is_reported_like_a_sentinel()

    response = client.get("/healthz")

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "channel_layer", "cluster"}
    assert all(check["ok"] for check in body["checks"].values())
    assert body["checks"]["channel_layer"]["backend"] == settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".")[-1]
    assert "failing" not in body
    assert response["Cache-Control"].startswith("max-age=0")


@pytest.mark.django_db
def test_healthz_answers_head_requests_and_refuses_posts(client):
    cluster_is_reported_like_a_sentinel()

    assert client.head("/healthz").status_code == 200
    assert client.post("/healthz").status_code == 405


@pytest.mark.django_db
def test_a_down_redis_fails_the_channel_layer_check_and_its_password_is_not_shown(client, settings):
    cluster_is_reported_like_a_sentinel()
    settings.CHANNEL_LAYERS = redis_layer(f"redis://:hunter2-secret@127.0.0.1:{closed_port()}/0")

    started = time.monotonic()
    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["failing"] == ["channel_layer"]
    assert body["checks"]["database"]["ok"] and body["checks"]["cluster"]["ok"]
    assert body["checks"]["channel_layer"] == {"ok": False, "error": "the check raised ConnectionError"}
    assert b"hunter2" not in response.content and b"127.0.0.1" not in response.content
    assert time.monotonic() - started < 5  # a refused connection fails at once, it does not wait out the timeout


@pytest.mark.django_db
def test_a_channel_layer_that_never_answers_fails_after_the_timeout(client, settings):
    """A Redis address that accepts connections and then says nothing (a hung
    server, a half-open path): the check gives up after MAKIMA_HEALTH_TIMEOUT_S."""
    cluster_is_reported_like_a_sentinel()
    settings.MAKIMA_HEALTH_TIMEOUT_S = 0.5
    with socket.create_server(("127.0.0.1", 0)) as silent:
        settings.CHANNEL_LAYERS = redis_layer(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")

        started = time.monotonic()
        response = client.get("/healthz")
        elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert response.json()["failing"] == ["channel_layer"]
    assert response.json()["checks"]["channel_layer"] == {"ok": False, "error": "no answer within 0.5 s"}
    assert 0.5 <= elapsed < 3


@pytest.mark.django_db
def test_healthz_fails_the_cluster_check_when_the_tick_is_not_scheduled(client):
    assert not Schedule.objects.exists()

    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["cluster"]
    assert "setup_schedules" in body["checks"]["cluster"]["error"]


@pytest.mark.django_db
def test_healthz_fails_the_cluster_check_when_no_scheduler_moved_the_tick_schedule(client, settings):
    """What the database looks like when no cluster runs: the schedule's next
    run lies in the past, because no scheduler picked it up and moved it on."""
    cluster_is_reported_like_a_sentinel()
    settings.MAKIMA_HEALTH_CLUSTER_STALE_S = 90
    Schedule.objects.filter(name=health.TICK_SCHEDULE).update(next_run=timezone.now() - timedelta(seconds=95))

    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["failing"] == ["cluster"]
    assert "overdue: no cluster is running the scheduler" in body["checks"]["cluster"]["error"]
    assert body["checks"]["cluster"]["schedule_overdue_s"] >= 95

    # Within the allowance (the scheduler runs about every 30 s) it is healthy.
    Schedule.objects.filter(name=health.TICK_SCHEDULE).update(next_run=timezone.now() - timedelta(seconds=60))
    assert health.check_cluster(broker=ORM(list_key="makima"))["ok"]


def test_the_database_check_fails_for_a_database_on_a_closed_port(django_db_blocker):
    """The check run against a second database alias whose server is not there
    (outside a test transaction: pytest-django would refuse any unlisted alias)."""
    alias = "makima_h6a_unreachable"
    configured = connections.configure_settings(
        {
            "default": dict(connections.settings["default"]),
            alias: {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "makima_h6a_gone",
                "USER": "postgres",
                "PASSWORD": "s3cret-pw",
                "HOST": "127.0.0.1",
                "PORT": str(closed_port()),
            },
        }
    )
    connections.settings[alias] = configured[alias]
    try:
        with django_db_blocker.unblock(), pytest.raises(Exception) as failure:
            health.check_database(using=alias)
        assert type(failure.value).__name__ == "OperationalError"
    finally:
        connections[alias].close()
        del connections.settings[alias]
        with contextlib.suppress(AttributeError):
            delattr(connections._connections, alias)


@pytest.mark.django_db
def test_the_https_redirect_spares_healthz_only(client, settings):
    """A load balancer probes over plain http; everything else still goes to https."""
    cluster_is_reported_like_a_sentinel()
    settings.SECURE_SSL_REDIRECT = True

    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 301


# --------------------------------------------------------------------------- real processes


def _test_database_url() -> str:
    """The test database, for processes started by a test."""
    s = connection.settings_dict
    if connection.vendor == "postgresql":
        return f"postgresql://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
    return f"sqlite:///{s['NAME']}"


def _environment(**overrides: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("REDIS_URL", "DATABASE_URL") and not key.startswith("MAKIMA_")
    }
    env.update({"DJANGO_SETTINGS_MODULE": "makima.settings", "MAKIMA_LOG_LEVEL": "WARNING", **overrides})
    return env


@contextlib.contextmanager
def _process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "w") as out:
        process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield process
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def _daphne(env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A real daphne serving makima; yields its base URL once /healthz answers."""
    port = free_port()
    log = tmp_path / f"daphne-{port}.log"
    args = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "makima.asgi:application"]
    with _process(args, env, log) as server:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"daphne exited:\n{log.read_text()}")
            try:
                _get_health(base)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"daphne did not come up:\n{log.read_text()}") from None
                time.sleep(0.2)
        yield base


def _get_health(base: str) -> tuple[int, dict[str, Any], bytes]:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw), raw
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw), raw


def _eventually(probe: Callable[[], Any], accept: Callable[[Any], bool], *, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if accept(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {value!r} after {within:g} s")
        time.sleep(0.5)


needs_redis = pytest.mark.skipif(not redis_reachable(), reason="needs a Redis server at 127.0.0.1:6379")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_real_cluster_on_the_orm_broker_brings_an_overdue_tick_schedule_back_to_healthy(tmp_path):
    """No cluster: the schedule stays overdue and the check fails. A real
    ``qcluster`` (ORM broker, as without REDIS_URL) runs its scheduler within
    about 30 s of starting, which moves the schedule on: the check passes."""
    call_command("setup_schedules", stdout=open(os.devnull, "w"))  # noqa: SIM115
    long_ago = timezone.now() - timedelta(minutes=10)
    Schedule.objects.filter(name=health.TICK_SCHEDULE).update(next_run=long_ago)
    orm = ORM(list_key="makima")
    assert not health.check_cluster(broker=orm)["ok"]

    env = _environment(DATABASE_URL=_test_database_url(), MAKIMA_TICK_SECONDS="5")
    with _process([sys.executable, "manage.py", "qcluster"], env, tmp_path / "cluster.log"):
        result = _eventually(
            lambda: health.check_cluster(broker=orm), lambda r: r["ok"], within=60, what="the cluster check"
        )

    assert result["schedule_overdue_s"] < 90
    assert Schedule.objects.get(name=health.TICK_SCHEDULE).next_run > long_ago + timedelta(minutes=9)
    connections.close_all()


@pytest.mark.slow
@needs_redis
@pytest.mark.django_db(transaction=True)
def test_with_redis_healthz_follows_a_real_cluster_starting_and_stopping(tmp_path):
    """daphne and ``qcluster`` on Redis: /healthz fails (cluster) until the
    cluster runs, passes while it runs, and fails again once it stopped."""
    call_command("setup_schedules", stdout=open(os.devnull, "w"))  # noqa: SIM115
    env = _environment(DATABASE_URL=_test_database_url(), REDIS_URL=REDIS_DB_URL, MAKIMA_TICK_SECONDS="5")
    with _daphne(env, tmp_path) as base:
        # A cluster of an earlier test stopped less than 3 s ago may still be listed.
        _, body, _ = _eventually(
            lambda: _get_health(base), lambda r: r[0] == 503, within=10, what="healthz without a cluster"
        )
        assert body["failing"] == ["cluster"]
        assert body["checks"]["cluster"]["clusters"] == 0
        assert body["checks"]["channel_layer"] == {**body["checks"]["channel_layer"], "ok": True}
        assert body["checks"]["channel_layer"]["backend"] == "RedisChannelLayer"

        with _process([sys.executable, "manage.py", "qcluster"], env, tmp_path / "cluster.log"):
            _, body, _ = _eventually(
                lambda: _get_health(base), lambda r: r[0] == 200, within=20, what="healthz with a cluster"
            )
            assert body["status"] == "ok"
            assert body["checks"]["cluster"]["clusters"] >= 1

        _, body, _ = _eventually(
            lambda: _get_health(base), lambda r: r[0] == 503, within=10, what="healthz after the cluster stopped"
        )
        assert body["failing"] == ["cluster"]
    connections.close_all()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_server_whose_redis_is_down_answers_503_naming_the_channel_layer_and_the_cluster(tmp_path):
    """REDIS_URL points at a closed port: the channel layer and the Redis broker
    (hence the cluster status) are unreachable; the database is fine."""
    call_command("setup_schedules", stdout=open(os.devnull, "w"))  # noqa: SIM115
    env = _environment(
        DATABASE_URL=_test_database_url(), REDIS_URL=f"redis://:hunter2-secret@127.0.0.1:{closed_port()}/0"
    )
    with _daphne(env, tmp_path) as base:
        status, body, raw = _get_health(base)
        # The figures come from the database alone: a scrape from this machine still works.
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            families = {f.name for f in text_string_to_metric_families(response.read().decode())}

    assert status == 503
    assert body["failing"] == ["channel_layer", "cluster"]
    assert body["checks"]["database"]["ok"]
    assert b"hunter2" not in raw
    assert {"makima_tasks", "makima_outbox_depth", "makima_dispatch_latency_seconds"} <= families
    connections.close_all()


@pytest.mark.slow
def test_a_server_whose_database_is_down_answers_503_naming_the_database(tmp_path):
    """DATABASE_URL points at a PostgreSQL port nobody listens on."""
    env = _environment(DATABASE_URL=f"postgresql://makima:s3cret-pw@127.0.0.1:{closed_port()}/makima_h6a_gone")
    with _daphne(env, tmp_path) as base:
        status, body, raw = _get_health(base)

    assert status == 503
    # The schedule lives in the database too, so the cluster cannot be judged either.
    assert body["failing"] == ["database", "cluster"]
    assert body["checks"]["database"] == {"ok": False, "error": "the check raised OperationalError"}
    assert body["checks"]["channel_layer"]["ok"]
    assert b"s3cret-pw" not in raw and b"makima:" not in raw
