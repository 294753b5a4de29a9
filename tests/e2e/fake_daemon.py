"""A small daemon that speaks protocol.md over a real websocket, for
end-to-end tests and benchmarks. It runs no agent: a ``behaviour`` coroutine
decides what each task does (usually by calling the REST API with the task
token, as an agent would) and what it reports."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import websockets


@dataclass
class Outcome:
    status: str = "done"
    exit_code: int = 0
    summary: str = ""
    error: str | None = None
    cost_usd: float = 0.0
    verifier_results: list[dict[str, Any]] = field(default_factory=list)
    output: list[str] = field(default_factory=list)


@dataclass
class Run:
    task: dict[str, Any]
    spawned_at: float
    started_at: float = 0.0
    finished_at: float = 0.0


Behaviour = Callable[["FakeDaemon", dict[str, Any]], Awaitable[Outcome]]


def api(base: str, method: str, path: str, token: str, body: Any = None) -> Any:
    """A blocking JSON call to the REST API, as the `makima` CLI makes it."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json", "Accept": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{method} {path} → {exc.code}: {exc.read()[:500]!r}") from None
    return json.loads(raw) if raw else None


class FakeDaemon:
    def __init__(
        self,
        *,
        ws_url: str,
        token: str,
        behaviour: Behaviour,
        name: str = "fake-daemon",
        agents: tuple[str, ...] = ("scripted",),
        max_tasks: int = 4,
    ) -> None:
        self.ws_url = ws_url
        self.token = token
        self.behaviour = behaviour
        self.name = name
        self.agents = list(agents)
        self.max_tasks = max_tasks
        self.runs: dict[str, Run] = {}
        self.spawn_times: list[tuple[float, dict[str, Any]]] = []
        self.finish_times: dict[str, float] = {}
        self.received: dict[str, float] = {}  # report id → when the server confirmed it
        self.report_ids: dict[str, str] = {}  # task id → its task_finished report id
        self._ws: Any = None
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.welcome: dict[str, Any] | None = None
        self.errors: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._ws.send(json.dumps(message))

    async def run(self) -> None:
        async with websockets.connect(
            self.ws_url, additional_headers={"Authorization": f"Bearer {self.token}"}, max_size=None
        ) as ws:
            self._ws = ws
            await self.send(
                {
                    "type": "hello",
                    "protocol": 1,
                    "name": self.name,
                    "hostname": self.name,
                    "version": "0.1.0",
                    "max_concurrent_tasks": self.max_tasks,
                    "agents": self.agents,
                    "running_tasks": [tid for tid, run in self.runs.items() if not run.finished_at],
                }
            )
            async for raw in ws:
                message = json.loads(raw)
                kind = message.get("type")
                if kind == "welcome":
                    self.welcome = message
                elif kind == "spawn_task":
                    await self._spawn(message)
                elif kind in ("interrupt_task", "send_message"):
                    await self.send({"type": "ack", "command_id": message["command_id"], "ok": True})
                elif kind == "received":
                    self.received[message["id"]] = time.perf_counter()
                elif kind == "error":
                    self.errors.append(message)

    async def _spawn(self, message: dict[str, Any]) -> None:
        task = message["task"]
        self.spawn_times.append((time.perf_counter(), task))
        if task["id"] in self.runs:  # at-least-once delivery: a repeat is a no-op
            await self.send({"type": "ack", "command_id": message["command_id"], "ok": True})
            return
        self.runs[task["id"]] = Run(task=task, spawned_at=time.perf_counter())
        await self.send({"type": "ack", "command_id": message["command_id"], "ok": True})
        job = asyncio.create_task(self._execute(task))
        self._tasks.add(job)
        job.add_done_callback(self._tasks.discard)

    async def _execute(self, task: dict[str, Any]) -> None:
        run = self.runs[task["id"]]
        run.started_at = time.perf_counter()
        await self.send(
            {"type": "task_started", "task_id": task["id"], "branch": task["branch"], "base_commit": "0" * 40}
        )
        outcome = await self.behaviour(self, task)
        if outcome.output:
            await self.send(
                {
                    "type": "task_output",
                    "task_id": task["id"],
                    "items": [
                        {"seq": i, "stream": "stdout", "content": line}
                        for i, line in enumerate(outcome.output, start=1)
                    ],
                }
            )
        run.finished_at = time.perf_counter()
        self.finish_times[task["id"]] = run.finished_at
        report_id = self.report_ids[task["id"]] = str(uuid.uuid4())
        await self.send(
            {
                "type": "task_finished",
                "id": report_id,
                "task_id": task["id"],
                "status": outcome.status,
                "exit_code": outcome.exit_code,
                "summary": outcome.summary,
                "error": outcome.error,
                "branch": task["branch"],
                "commit_sha": uuid.uuid4().hex + uuid.uuid4().hex[:8],
                "cost_usd": outcome.cost_usd,
                "verifier_results": outcome.verifier_results,
            }
        )

    # Helpers for behaviours: what an agent does through the `makima` CLI.
    def api_for(self, task: dict[str, Any]) -> Callable[..., Awaitable[Any]]:
        env = task["env"]

        async def call(method: str, path: str, body: Any = None) -> Any:
            return await asyncio.to_thread(api, env["MAKIMA_URL"], method, path, env["MAKIMA_API_KEY"], body)

        return call
