"""Settings come from the environment through typed readers that fail loudly."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from makima.env import database_from_url, env_bool, env_float, env_int, env_list, env_str, env_url

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- the readers


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", " On "])
def test_env_bool_reads_true(value):
    assert env_bool("FLAG", False, environ={"FLAG": value}) is True


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "", "False"])
def test_env_bool_reads_false(value):
    assert env_bool("FLAG", True, environ={"FLAG": value}) is False


def test_env_bool_uses_the_default_when_unset():
    assert env_bool("FLAG", True, environ={}) is True
    assert env_bool("FLAG", False, environ={}) is False


def test_env_bool_refuses_anything_else_and_names_the_variable():
    with pytest.raises(ImproperlyConfigured, match=r"^FLAG must be a boolean .*'maybe'"):
        env_bool("FLAG", True, environ={"FLAG": "maybe"})


def test_env_int_reads_whole_numbers_and_defaults_when_unset_or_blank():
    assert env_int("N", 5, environ={"N": " 42 "}) == 42
    assert env_int("N", 5, environ={}) == 5
    assert env_int("N", 5, environ={"N": "  "}) == 5


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "N must be a whole number, got 'abc'"),
        ("1.5", "N must be a whole number"),
        ("0", "N must be at least 1"),
    ],
)
def test_env_int_refuses_bad_values_and_names_the_variable(value, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        env_int("N", 5, minimum=1, environ={"N": value})


def test_env_int_enforces_its_maximum():
    with pytest.raises(ImproperlyConfigured, match="N must be at most 10, got 11"):
        env_int("N", 5, maximum=10, environ={"N": "11"})
    assert env_int("N", 5, maximum=10, environ={"N": "10"}) == 10


def test_env_float_reads_numbers_and_refuses_bad_ones():
    assert env_float("W", 0.5, environ={"W": "0.25"}) == 0.25
    assert env_float("W", 0.5, environ={}) == 0.5
    with pytest.raises(ImproperlyConfigured, match="W must be a number, got 'half'"):
        env_float("W", 0.5, environ={"W": "half"})
    with pytest.raises(ImproperlyConfigured, match=r"W must be at least 0\.0"):
        env_float("W", 0.5, minimum=0.0, environ={"W": "-1"})


def test_env_list_splits_on_commas_and_drops_blanks():
    assert env_list("HOSTS", ["d"], environ={"HOSTS": " a.example.com, ,b.example.com ,"}) == [
        "a.example.com",
        "b.example.com",
    ]
    assert env_list("HOSTS", ["d"], environ={"HOSTS": ""}) == []
    default = ["d"]
    result = env_list("HOSTS", default, environ={})
    assert result == ["d"] and result is not default


def test_env_str_reads_the_value_or_the_default():
    assert env_str("NAME", "x", environ={"NAME": "value"}) == "value"
    assert env_str("NAME", "x", environ={"NAME": ""}) == ""
    assert env_str("NAME", "x", environ={}) == "x"


def test_env_url_accepts_its_schemes_and_names_the_variable_otherwise():
    assert env_url("REDIS_URL", "", schemes=("redis", "rediss"), environ={"REDIS_URL": "rediss://h:6380/1"})
    assert env_url("REDIS_URL", "", schemes=("redis",), environ={}) == ""
    with pytest.raises(ImproperlyConfigured, match=r"REDIS_URL must start with one of redis://.*'http://x'"):
        env_url("REDIS_URL", "", schemes=("redis", "rediss"), environ={"REDIS_URL": "http://x"})


def test_a_secret_can_come_from_a_file(tmp_path):
    secret = tmp_path / "secret_key"
    secret.write_text("  from-the-file\n", encoding="utf-8")

    environ = {"SECRET_KEY_FILE": str(secret), "SECRET_KEY": "from-the-variable"}

    assert env_str("SECRET_KEY", "", environ=environ) == "from-the-file"


def test_every_reader_honours_the_file_variant(tmp_path):
    path = tmp_path / "value"
    path.write_text("7\n", encoding="utf-8")
    environ = {"N_FILE": str(path)}

    assert env_int("N", 1, environ=environ) == 7
    assert env_float("N", 1.0, environ=environ) == 7.0
    assert env_list("N", [], environ=environ) == ["7"]


def test_an_unreadable_secret_file_names_the_file_variable(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ImproperlyConfigured, match=r"^SECRET_KEY_FILE: cannot read .*nope"):
        env_str("SECRET_KEY", "", environ={"SECRET_KEY_FILE": str(missing)})


# --------------------------------------------------------------------------- DATABASE_URL


def test_the_default_database_is_sqlite_in_wal_mode_with_a_busy_timeout(tmp_path):
    config = database_from_url("", base_dir=str(tmp_path))

    assert config["ENGINE"] == "django.db.backends.sqlite3"
    assert config["NAME"] == str(tmp_path / "makima.sqlite3")
    options = config["OPTIONS"]
    assert "PRAGMA journal_mode=WAL" in options["init_command"]
    assert options["timeout"] >= 5
    assert options["transaction_mode"] == "IMMEDIATE"


def test_a_sqlite_url_names_the_file():
    config = database_from_url("sqlite:////var/lib/makima/db.sqlite3", base_dir="/unused")

    assert config["ENGINE"] == "django.db.backends.sqlite3"
    assert config["NAME"] == "/var/lib/makima/db.sqlite3"
    assert config["OPTIONS"]["transaction_mode"] == "IMMEDIATE"


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "pgsql"])
def test_a_postgresql_url_keeps_connections_and_checks_them(scheme):
    config = database_from_url(f"{scheme}://makima:s3cret@db.internal:5433/makima", base_dir="/unused")

    assert config["ENGINE"] == "django.db.backends.postgresql"
    assert (config["NAME"], config["USER"], config["PASSWORD"]) == ("makima", "makima", "s3cret")
    assert (config["HOST"], config["PORT"]) == ("db.internal", 5433)
    assert config["CONN_HEALTH_CHECKS"] is True
    assert config["CONN_MAX_AGE"] > 0
    assert "init_command" not in config.get("OPTIONS", {})


@pytest.mark.parametrize("url", ["mysql://root@localhost/makima", "redis://localhost", "just-a-path.db"])
def test_a_database_url_of_another_kind_is_refused(url):
    with pytest.raises(ImproperlyConfigured, match="DATABASE_URL must be a sqlite:// or postgresql:// URL"):
        database_from_url(url, base_dir="/unused")


# --------------------------------------------------------------------------- the settings module, for real

SETTINGS_VARIABLES = {
    "DEBUG",
    "SECRET_KEY",
    "SECRET_KEY_FILE",
    "ALLOWED_HOSTS",
    "CSRF_TRUSTED_ORIGINS",
    "DATABASE_URL",
    "REDIS_URL",
}


def _environment(tmp_path: Path, **values: str) -> dict[str, str]:
    """This process's environment without any makima setting, plus ``values``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in SETTINGS_VARIABLES and not name.startswith("MAKIMA_")
    }
    # Never touch the developer's database file.
    env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'settings-test.sqlite3'}"
    env.update(values)
    return env


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"DEBUG": "maybe"}, "DEBUG"),
        ({"MAKIMA_TICK_SECONDS": "abc"}, "MAKIMA_TICK_SECONDS"),
        ({"MAKIMA_TICK_SECONDS": "0"}, "MAKIMA_TICK_SECONDS"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"DEBUG": "0"}, "SECRET_KEY"),
        ({"DEBUG": "0", "SECRET_KEY": "makima-development-only-secret-key-do-not-use-in-production"}, "SECRET_KEY"),
        ({"MAKIMA_PUBLIC_URL": "ftp://makima"}, "MAKIMA_PUBLIC_URL"),
        ({"MAKIMA_COMPOSITE_AGENT_WEIGHT": "-0.5"}, "MAKIMA_COMPOSITE_AGENT_WEIGHT"),
    ],
    ids=lambda v: ",".join(f"{k}={x[:12]}" for k, x in v.items()) if isinstance(v, dict) else v,
)
def test_the_settings_refuse_to_load_with_a_bad_value_and_name_the_variable(tmp_path, values, variable):
    result = _python("import makima.settings", _environment(tmp_path, **values))

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert variable in last_line, result.stderr


def test_the_settings_load_with_nothing_set(tmp_path):
    result = _python("import makima.settings as s; print(s.DEBUG)", _environment(tmp_path))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_the_production_settings_pass_the_deploy_checks(tmp_path):
    env = _environment(
        tmp_path,
        DEBUG="0",
        SECRET_KEY=secrets.token_urlsafe(64),
        ALLOWED_HOSTS="makima.example.com",
        DJANGO_SETTINGS_MODULE="makima.settings",
    )
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout
    assert "WARNINGS" not in result.stdout + result.stderr


_SHOW_BACKENDS = (
    "import json, makima.settings as s; print(json.dumps({'layer': s.CHANNEL_LAYERS['default'], 'q': s.Q_CLUSTER}))"
)


def test_with_redis_the_channel_layer_and_the_task_broker_use_it(tmp_path):
    result = _python(_SHOW_BACKENDS, _environment(tmp_path, REDIS_URL="redis://127.0.0.1:6379/3"))

    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["layer"]["BACKEND"] == "channels_redis.core.RedisChannelLayer"
    assert shown["layer"]["CONFIG"]["hosts"] == [{"address": "redis://127.0.0.1:6379/3", "socket_timeout": 30}]
    assert shown["q"]["redis"] == "redis://127.0.0.1:6379/3"
    assert "orm" not in shown["q"]


def test_without_redis_everything_stays_in_process_and_in_the_database(tmp_path):
    result = _python(_SHOW_BACKENDS, _environment(tmp_path))

    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["layer"]["BACKEND"] == "channels.layers.InMemoryChannelLayer"
    assert shown["q"]["orm"] == "default"
    assert "redis" not in shown["q"]


def test_postgresql_connections_give_up_after_a_few_seconds_unless_the_url_says_otherwise():
    assert database_from_url("postgresql://postgres@db.internal/makima", base_dir="/tmp")["OPTIONS"] == {
        "connect_timeout": 5
    }
    configured = database_from_url("postgresql://postgres@db.internal/makima?connect_timeout=20", base_dir="/tmp")
    assert configured["OPTIONS"]["connect_timeout"] in ("20", 20)
