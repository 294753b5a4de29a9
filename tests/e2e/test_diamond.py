"""End to end through real parts: daphne on a free port, the REST API, the
daemon websocket and a protocol-speaking test daemon. A planner submits a
diamond (A; B and C after A; D after B and C); B is sent back once by a red
evaluation, C waits for a person (yellow) who approves it through the API,
and the directive completes."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

import pytest

from tests.e2e.fake_daemon import FakeDaemon, Outcome, api
from tests.e2e.stack import running_stack

pytestmark = pytest.mark.slow

DIAMOND = {
    "steps": [
        {"name": "A", "description": "Lay the ground", "task_plan": "Create the package.", "order_index": 0},
        {"name": "B", "description": "Parser", "task_plan": "Write the parser.", "depends_on": ["A"], "order_index": 1},
        {
            "name": "C",
            "description": "Printer",
            "task_plan": "Write the printer.",
            "depends_on": ["A"],
            "order_index": 1,
        },
        {
            "name": "D",
            "description": "Wire it up",
            "task_plan": "Connect parser and printer.",
            "depends_on": ["B", "C"],
            "order_index": 2,
        },
    ]
}
REWORK = "Handle the empty input in the parser."


def evaluation(score: float, level: str, passed: bool, rework: str = "") -> dict[str, Any]:
    return {
        "passed": passed,
        "overallScore": score,
        "confidenceLevel": level,
        "criteriaResults": [{"criterion": "AC1", "passed": passed, "score": score, "evidence": "looked at it"}],
        "summaryFeedback": f"scored {score}",
        "reworkInstructions": rework,
    }


class Scenario:
    def __init__(self, directive_id: str) -> None:
        self.directive_id = directive_id
        self.evaluations: Counter[str] = Counter()

    async def __call__(self, daemon: FakeDaemon, task: dict[str, Any]) -> Outcome:
        call = daemon.api_for(task)
        env = task["env"]
        contract = env["MAKIMA_CONTRACT_ID"]
        if task["kind"] == "planning":
            content = "My plan, as asked:\n```json\n" + json.dumps(DIAMOND) + "\n```\nDone."
            await call("POST", f"/api/v1/contracts/{contract}/files/", {"name": "chain-plan", "content": content})
        elif task["kind"] == "execution":
            await asyncio.sleep(0.5)  # long enough that B and C visibly overlap
        elif task["kind"] == "monitoring":
            step = await call("GET", f"/api/v1/directives/{self.directive_id}/steps/{env['MAKIMA_STEP_ID']}/")
            name = step["name"]
            self.evaluations[name] += 1
            if name == "B" and self.evaluations[name] == 1:
                result = evaluation(0.3, "red", False, REWORK)
            elif name == "C":
                result = evaluation(0.65, "yellow", True)
            else:
                result = evaluation(0.95, "green", True)
            await call(
                "POST",
                f"/api/v1/contracts/{contract}/files/",
                {"name": "evaluation-result", "content": json.dumps(result)},
            )
        await call("POST", f"/api/v1/tasks/{task['id']}/complete/")
        return Outcome(summary=f"{task['kind']} {task['name']} finished", output=[f"working on {task['name']}"])


async def wait_for(predicate, *, timeout: float = 60.0, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError("timed out waiting")


async def test_a_diamond_directive_completes_with_rework_and_an_approval():
    with running_stack() as stack:

        async def rest(method: str, path: str, body: Any = None) -> Any:
            return await asyncio.to_thread(api, stack.base_url, method, path, stack.api_key, body)

        directive = await rest(
            "POST",
            "/api/v1/directives/",
            {
                "title": "Diamond",
                "goal": "Build a parser and a printer and wire them together.",
                "acceptance_criteria": ["It round-trips"],
                "repository_url": "/srv/repos/diamond.git",
                "agent": "scripted",
                "evaluation_mode": "agent",
                "autonomy_level": "guided",
            },
        )
        scenario = Scenario(directive["id"])
        daemon = FakeDaemon(ws_url=stack.ws_url, token=stack.daemon_token, behaviour=scenario, max_tasks=4)
        runner = asyncio.create_task(daemon.run())
        try:
            await wait_for(lambda: asyncio.sleep(0, result=daemon.welcome))
            await rest("POST", f"/api/v1/directives/{directive['id']}/start/")

            async def pending_approval():
                page = await rest("GET", "/api/v1/approvals/?status=pending")
                return page["results"]

            approvals = await wait_for(pending_approval)
            assert len(approvals) == 1
            await rest("POST", f"/api/v1/approvals/{approvals[0]['id']}/approve/", {"note": "Looks fine to me."})

            async def completed():
                current = await rest("GET", f"/api/v1/directives/{directive['id']}/")
                return current if current["status"] == "completed" else None

            final = await wait_for(completed)
        finally:
            runner.cancel()
            with pytest.raises(asyncio.CancelledError):
                await runner
        assert not daemon.errors, daemon.errors

    executions: dict[str, list[Any]] = {}
    for run in daemon.runs.values():
        if run.task["kind"] == "execution":
            executions.setdefault(run.task["name"].split(" ")[0], []).append(run)
    assert sorted(executions) == ["A", "B", "C", "D"]
    assert len(executions["B"]) == 2  # the red evaluation sent B back once

    # B and C ran at the same time.
    b, c = executions["B"][0], executions["C"][0]
    assert b.started_at < c.finished_at and c.started_at < b.finished_at

    # The rework continues from B's first attempt and carries the evaluator's instructions.
    first_b, second_b = sorted(executions["B"], key=lambda r: r.spawned_at)
    assert REWORK in second_b.task["plan"]
    assert second_b.task["continue_from"]["task_id"] == first_b.task["id"]

    # D starts from its first dependency (B, reworked) and merges the other (C).
    d = executions["D"][0].task
    assert d["continue_from"] == {"task_id": second_b.task["id"], "branch": second_b.task["branch"]}
    assert d["merge_branches"] == [executions["C"][0].task["branch"]]
    assert "merge" in d["plan"].lower()

    # A non-GitHub remote completes with the pushed directive branch and no PR.
    assert final["pr_url"] == ""
    assert final["pr_branch"].startswith("makima/directive-diamond-")
    kinds = Counter(run.task["kind"] for run in daemon.runs.values())
    assert kinds == Counter({"planning": 1, "execution": 5, "monitoring": 5, "completion": 1})


async def test_a_real_daphne_answers_an_oversized_frame_with_too_large_and_close_1009():
    import websockets

    with running_stack(extra_env={"MAKIMA_WS_MAX_BYTES": "2048"}) as stack:
        async with websockets.connect(
            stack.ws_url, additional_headers={"Authorization": f"Bearer {stack.daemon_token}"}, max_size=None
        ) as ws:
            await ws.send(json.dumps({"type": "hello", "padding": "x" * 3000}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
            assert (reply["type"], reply["code"]) == ("error", "too_large")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=10)
        assert closed.value.rcvd.code == 1009


async def test_a_real_daphne_closes_a_bad_token_with_4401():
    import websockets

    with running_stack() as stack:
        async with websockets.connect(stack.ws_url, additional_headers={"Authorization": "Bearer nope"}) as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), timeout=10)
        assert closed.value.rcvd.code == 4401
