"""What the agents do in the browser tests: a behaviour for
:class:`tests.e2e.fake_daemon.FakeDaemon` that plays a hand-made chain through
the REST API, as the `makima` CLI would.

Each execution waits until the test releases its step, so the page can be
watched in every state without racing the daemon; monitoring answers green,
or yellow for the steps listed in ``yellow`` (their first evaluation), which
under ``guided`` autonomy asks a person for approval. ``output`` lines are
written while an execution runs; ``feedback`` is the evaluator's summary."""

from __future__ import annotations

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from tests.e2e.fake_daemon import FakeDaemon, Outcome

# Long enough for a slow CI machine; a test that forgets to release a step
# fails on its own page assertions well before this.
HOLD_TIMEOUT = 90.0


def evaluation(score: float, level: str, feedback: str = "") -> dict[str, Any]:
    """An ``evaluation-result`` file as a monitoring agent writes it."""
    return {
        "passed": True,
        "overallScore": score,
        "confidenceLevel": level,
        "criteriaResults": [
            {"criterion": "AC1", "passed": True, "score": score, "evidence": feedback or "read the diff"}
        ],
        "summaryFeedback": feedback or f"scored {score}",
        "reworkInstructions": "",
    }


class Scenario:
    def __init__(
        self, *, yellow: Iterable[str] = (), output: Sequence[str] = (), feedback: str = "", hold: bool = True
    ) -> None:
        self.yellow = set(yellow)
        self.output = list(output)
        self.feedback = feedback
        self.hold = hold
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.evaluations: Counter[str] = Counter()
        self.executed: list[str] = []
        self.unexpected: list[str] = []

    def release(self, name: str) -> None:
        """Let the execution of step ``name`` finish (now, or as soon as it starts)."""
        self.gates[name].set()

    async def __call__(self, daemon: FakeDaemon, task: dict[str, Any]) -> Outcome:
        call = daemon.api_for(task)
        env = task["env"]
        kind = task["kind"]
        name = ""
        if env.get("MAKIMA_STEP_ID"):
            step = await call("GET", f"/api/v1/directives/{env['MAKIMA_DIRECTIVE_ID']}/steps/{env['MAKIMA_STEP_ID']}/")
            name = step["name"]
        if kind == "execution":
            self.executed.append(name)
            if self.output:
                # Sent while the task runs, so the step panel shows them live.
                await daemon.send(
                    {
                        "type": "task_output",
                        "task_id": task["id"],
                        "items": [
                            {"seq": seq, "stream": "stdout", "content": line}
                            for seq, line in enumerate(self.output, start=1)
                        ],
                    }
                )
            if self.hold:
                await asyncio.wait_for(self.gates[name].wait(), timeout=HOLD_TIMEOUT)
        elif kind == "monitoring":
            self.evaluations[name] += 1
            yellow = name in self.yellow and self.evaluations[name] == 1
            result = evaluation(0.65, "yellow", self.feedback) if yellow else evaluation(0.95, "green", self.feedback)
            await call(
                "POST",
                f"/api/v1/contracts/{env['MAKIMA_CONTRACT_ID']}/files/",
                {"name": "evaluation-result", "content": json.dumps(result)},
            )
        elif kind != "completion":
            # A hand-made chain is never planned; anything else is a surprise worth failing on.
            self.unexpected.append(f"{kind} task {task['name']!r}")
        await call("POST", f"/api/v1/tasks/{task['id']}/complete/")
        return Outcome(summary=f"{kind} {name or task['name']} finished")
