"""The `makima` CLI run for real, as a subprocess, against a live test server.

``agent`` is a task's view of the world (a task token and the ``MAKIMA_*``
variables the daemon sets); ``operator`` is alice with her user API key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from daemons.models import ApiToken
from tests.factories import make_contract, make_directive, make_task, make_token


def worker_env(**values: str) -> dict[str, str]:
    """A worker machine's environment: none of the caller's makima or Django settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKIMA_") and k != "DJANGO_SETTINGS_MODULE"}
    env.update(values)
    return env


def run_makima(*args: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "makima.cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


@dataclass
class Caller:
    """Someone running `makima` with ``env``."""

    env: dict[str, str]
    objects: dict[str, Any] = field(default_factory=dict)

    def run(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return run_makima(*args, env=self.env, stdin=stdin)

    def ok(self, *args: str, stdin: str = "") -> str:
        """Run and expect success; the standard output."""
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture
def agent(live_server, alice) -> Caller:
    """The agent of a task of alice's directive, holding that task's token."""
    directive = make_directive(alice)
    contract = make_contract(directive)
    task = make_task(directive, contract=contract)
    token = make_token(alice, kind=ApiToken.Kind.TASK, task=task).plain
    env = worker_env(
        MAKIMA_URL=live_server.url,
        MAKIMA_API_KEY=token,
        MAKIMA_TASK_ID=str(task.pk),
        MAKIMA_DIRECTIVE_ID=str(directive.pk),
        MAKIMA_CONTRACT_ID=str(contract.pk),
    )
    return Caller(env, {"directive": directive, "contract": contract, "task": task})


@pytest.fixture
def operator(live_server, alice) -> Caller:
    """alice at her terminal, with her user API key."""
    return Caller(worker_env(MAKIMA_URL=live_server.url, MAKIMA_API_KEY=make_token(alice).plain))
