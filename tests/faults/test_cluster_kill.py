"""The django-q2 cluster is killed (SIGKILL to its whole process group: the
parent, the sentinel, the pusher, the monitor and the workers) again and
again while it runs the orchestrator's tick, and restarted each time. The
directive needs the tick to finish: its daemon vanishes mid-task, and only the
tick's lease check hands the task to another daemon. It completes, with every
task dispatched once per attempt, one completion task, and every event once.

django-q2 1.11 looks at its schedules only every ~30 s, and a restarted
cluster starts that count again, so a test that waited for the schedule would
see few ticks. A feeder process enqueues the schedule's own task
(``directives.tasks.orchestrator_tick``) on the real broker every 0.3 s
instead; the schedule stays installed too. Kills are aimed at a running tick:
the worker logs ``processing … orchestrator_tick`` when it takes one and the
tick logs ``orchestrator tick: {…}`` when it is done, so a kill while the
first is ahead of the second cut a tick short.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.fake_daemon import FakeDaemon, Outcome, api
from tests.e2e.stack import ROOT, Stack, database_url, running_stack

pytestmark = pytest.mark.slow

ENV = {
    "MAKIMA_TICK_SECONDS": "1",
    "MAKIMA_HEARTBEAT_INTERVAL_S": "1",
    "MAKIMA_TASK_LEASE_S": "2",
    "MAKIMA_Q_WORKERS": "2",
    # The worker's "processing" line and the tick's own line are INFO.
    "MAKIMA_LOG_LEVEL": "INFO",
}
MIN_KILLS_DURING_A_TICK = 4
MAX_KILLS = 20
TICK_TASK = "directives.tasks.orchestrator_tick"

PLAN = {
    "steps": [
        {"name": "A", "description": "Lay the ground", "task_plan": "Create the package.", "order_index": 0},
        {"name": "B", "description": "Parser", "task_plan": "Parse.", "depends_on": ["A"], "order_index": 1},
        {"name": "C", "description": "Printer", "task_plan": "Print.", "depends_on": ["A"], "order_index": 1},
        {"name": "D", "description": "Wire it", "task_plan": "Wire.", "depends_on": ["B", "C"], "order_index": 2},
    ]
}

FEEDER = f"""
import time
from django.db import close_old_connections
from django_q.brokers import get_broker
from django_q.tasks import async_task
broker = get_broker()
while True:
    try:
        close_old_connections()
        if broker.queue_size() < 2:
            async_task({TICK_TASK!r}, group="makima.orchestrator_tick")
    except Exception as exc:  # the database may be restarting (test_database_restart): go on
        print("feeder:", type(exc).__name__, exc, flush=True)
    time.sleep(0.3)
"""

# What the stack's database holds about the directive, read through the ORM.
REPORT = """
import json, sys
from collections import Counter
from contracts.models import Task, TaskOutput
from daemons.models import DaemonCommand
from directives.models import Directive, DirectiveEvent, Step
d = Directive.objects.get(pk=sys.argv[-1])
tasks = [
    {**t, "id": str(t["id"])}
    for t in Task.objects.filter(directive=d).values("id", "kind", "step__name", "attempt", "status", "daemon__name")
]
spawns = Counter(
    str(t) for t in DaemonCommand.objects.filter(command_type="spawn_task", task__directive=d).values_list("task_id", flat=True)
)
events = [
    {"type": e, "subject": s, "message": m, "at": at.timestamp()}
    for e, s, m, at in DirectiveEvent.objects.filter(directive=d).values_list("event_type", "subject_id", "message", "created_at")
]
steps = {s.name: {"id": str(s.pk), "status": s.status, "rework_count": s.rework_count} for s in Step.objects.filter(directive=d)}
output = {}
for task_id, seq in TaskOutput.objects.filter(task__directive=d).values_list("task_id", "seq"):
    output.setdefault(str(task_id), []).append(seq)
print("REPORT" + json.dumps(
    {"status": d.status, "tasks": tasks, "spawns": spawns, "events": events, "steps": steps, "output": output}
))
"""


def evaluation() -> dict[str, Any]:
    return {
        "passed": True,
        "overallScore": 0.95,
        "confidenceLevel": "green",
        "criteriaResults": [{"criterion": "AC1", "passed": True, "score": 0.95, "evidence": "read it"}],
        "summaryFeedback": "fine",
        "reworkInstructions": "",
    }


class Agent:
    """What the tasks do, through the REST API with their task token. ``lose_on``:
    the step whose execution makes this daemon's machine vanish."""

    def __init__(self, lose_on: str | None = None) -> None:
        self.lose_on = lose_on
        self.lost = asyncio.Event()

    async def __call__(self, daemon: FakeDaemon, task: dict[str, Any]) -> Outcome:
        call = daemon.api_for(task)
        contract = task["env"]["MAKIMA_CONTRACT_ID"]
        if task["kind"] == "planning":
            await call(
                "POST", f"/api/v1/contracts/{contract}/files/", {"name": "chain-plan", "content": json.dumps(PLAN)}
            )
        elif task["kind"] == "execution":
            if self.lose_on and task["name"] == self.lose_on:
                self.lost.set()
                await asyncio.Event().wait()  # the machine is gone: nothing more comes from it
            await asyncio.sleep(0.8)
        elif task["kind"] == "monitoring":
            body = {"name": "evaluation-result", "content": json.dumps(evaluation())}
            await call("POST", f"/api/v1/contracts/{contract}/files/", body)
        await call("POST", f"/api/v1/tasks/{task['id']}/complete/")
        return Outcome(summary=f"{task['kind']} {task['name']} finished")


@dataclass
class Running:
    """A FakeDaemon's connection plus the heartbeats a real daemon sends (the
    tick marks a daemon silent for 3 heartbeat intervals as lost)."""

    daemon: FakeDaemon
    jobs: list[asyncio.Task[Any]] = field(default_factory=list)

    def start(self) -> None:
        self.jobs = [asyncio.create_task(self.daemon.run()), asyncio.create_task(self._heartbeats())]

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(1)
            if self.daemon.welcome is not None and self.daemon._ws is not None:
                running = [tid for tid, run in self.daemon.runs.items() if not run.finished_at]
                await self.daemon.send({"type": "heartbeat", "running_tasks": running})

    def check(self, stack: Stack) -> None:
        """Fail clearly when the server closed this daemon's socket: a FakeDaemon
        does not reconnect (with REDIS_URL, channels_redis on redis-py 8 does
        that every few seconds by itself: see the report of this change)."""
        if self.jobs and self.jobs[0].done() and not self.jobs[0].cancelled():
            ws = self.daemon._ws
            raise AssertionError(
                f"the server closed {self.daemon.name}'s socket ({getattr(ws, 'close_code', None)}):\n"
                f"{stack.log.read_text(errors='replace')[-3000:]}"
            )

    async def vanish(self) -> None:
        """The machine is gone: its socket closes and its agents stop."""
        for job in [*self.jobs, *self.daemon._tasks]:
            job.cancel()
        await asyncio.gather(*self.jobs, *self.daemon._tasks, return_exceptions=True)


@dataclass
class Cluster:
    """``manage.py qcluster`` in its own session, so that one ``killpg`` reaches
    every process it forks. Each incarnation logs to its own file."""

    stack: Stack
    logs: Path
    process: subprocess.Popen | None = None
    incarnation: int = 0
    kills: list[dict[str, Any]] = field(default_factory=list)
    ticks_done: int = 0

    @property
    def log(self) -> Path:
        return self.logs / f"cluster-{self.incarnation}.log"

    def start(self) -> None:
        self.incarnation += 1
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "qcluster"],
                cwd=ROOT,
                env=self.stack.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def counts(self) -> tuple[int, int, list[float]]:
        """Ticks taken by a worker, ticks finished, and their durations, in this incarnation."""
        text = self.log.read_text(errors="replace")
        started = sum(1 for line in text.splitlines() if " processing " in line and TICK_TASK in line)
        seconds = [float(s) for s in re.findall(r"orchestrator tick: \{.*'seconds': ([0-9.]+)", text)]
        return started, len(seconds), seconds

    async def kill_during_a_tick(self) -> bool:
        """Let one tick finish (the work must go on), wait until a worker takes
        the next one, wait a random part of a tick's duration, SIGKILL the
        whole group. Returns whether a tick was cut short."""
        deadline = time.monotonic() + 60
        while True:
            started, finished, seconds = self.counts()
            if finished >= 1 and started > finished:
                break
            if self.process.poll() is not None:
                raise AssertionError(f"the cluster exited:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no tick ran:\n{self.log.read_text()[-3000:]}")
            await asyncio.sleep(0.002)
        # Somewhere in the first part of a tick (as long as the last one took), so that most kills cut one.
        await asyncio.sleep(random.uniform(0, 0.7 * max(seconds[-1], 0.01)))
        os.killpg(self.process.pid, signal.SIGKILL)
        await asyncio.to_thread(self.process.wait)
        started, finished, _ = self.counts()
        self.ticks_done += finished
        cut = started > finished
        self.kills.append({"at": time.time(), "cut_a_tick": cut, "incarnation": self.incarnation})
        return cut

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_tick_feeder(stack: Stack, log: Path) -> subprocess.Popen:
    """A process that keeps up to two orchestrator ticks queued on the stack's
    django-q2 broker (see the module docs); stopped with the stack."""
    with open(log, "w") as out:
        feeder = subprocess.Popen(
            [sys.executable, "manage.py", "shell", "-c", FEEDER],
            cwd=ROOT,
            env=stack.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    stack.processes.append(feeder)
    return feeder


def stack_report(stack: Stack, directive_id: str) -> dict[str, Any]:
    """The directive's tasks, spawn_task commands per task, events and steps, from the stack's database."""
    out = stack.manage("shell", "-c", REPORT.replace("sys.argv[-1]", repr(directive_id)))
    return json.loads(out.split("REPORT", 1)[1])


async def test_a_cluster_killed_again_and_again_during_ticks_resumes_and_the_directive_completes_once(tmp_path):
    with database_url("makima_h6e_") as db, running_stack(extra_env=ENV, database=db) as stack:
        stack.manage("setup_schedules")
        start_tick_feeder(stack, tmp_path / "feeder.log")
        cluster = Cluster(stack=stack, logs=tmp_path)
        cluster.start()

        async def rest(method: str, path: str, body: Any = None) -> Any:
            return await asyncio.to_thread(api, stack.base_url, method, path, stack.api_key, body)

        lost_agent = Agent(lose_on="C")
        first = Running(FakeDaemon(ws_url=stack.ws_url, token=stack.daemon_token, behaviour=lost_agent, name="box-1"))
        second = Running(FakeDaemon(ws_url=stack.ws_url, token=stack.daemon_token, behaviour=Agent(), name="box-2"))
        first.start()
        try:
            while first.daemon.welcome is None:
                await asyncio.sleep(0.05)
            directive = await rest(
                "POST",
                "/api/v1/directives/",
                {
                    "title": "Killed clusters",
                    "goal": "Build a parser and a printer and wire them together.",
                    "acceptance_criteria": ["It round-trips"],
                    "repository_url": "/srv/repos/killed.git",
                    "agent": "scripted",
                    "evaluation_mode": "agent",
                    "autonomy_level": "full_auto",
                },
            )
            await rest("POST", f"/api/v1/directives/{directive['id']}/start/")

            lost_at = float("inf")

            async def kills() -> None:
                # Until enough kills cut a tick, and some fell while the directive
                # waited for the tick, and box-2 got C: the restarted cluster resumed.
                while True:
                    cut = sum(k["cut_a_tick"] for k in cluster.kills)
                    while_waiting = any(k["at"] > lost_at for k in cluster.kills)
                    retried = any(
                        r.task["kind"] == "execution" and r.task["name"] == "C" for r in second.daemon.runs.values()
                    )
                    if (cut >= MIN_KILLS_DURING_A_TICK and while_waiting and retried) or len(
                        cluster.kills
                    ) >= MAX_KILLS:
                        return
                    await cluster.kill_during_a_tick()
                    cluster.start()

            killer = asyncio.create_task(kills())

            # Daemon box-1 vanishes while it runs C (B may be running there too),
            # once the cluster has been killed at least once. Only the tick's
            # lease check gives its tasks to box-2.
            await asyncio.wait_for(lost_agent.lost.wait(), timeout=60)
            while not cluster.kills:
                await asyncio.sleep(0.05)
            await first.vanish()
            lost_at = time.time()
            second.start()

            await asyncio.wait_for(killer, timeout=180)
            deadline = time.monotonic() + 90
            while (current := await rest("GET", f"/api/v1/directives/{directive['id']}/"))["status"] != "completed":
                assert current["status"] in ("active", "completing"), current["status"]
                assert time.monotonic() < deadline, f"directive still {current['status']}"
                second.check(stack)
                await asyncio.sleep(0.2)
        finally:
            await first.vanish()
            await second.vanish()
            cluster.stop()
        report = stack_report(stack, directive["id"])
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))

    # The cluster was really killed during ticks, and the work went on after.
    cut = [k for k in cluster.kills if k["cut_a_tick"]]
    assert len(cut) >= MIN_KILLS_DURING_A_TICK, (cluster.kills, logs)
    events = report["events"]
    tasks = {t["id"]: t for t in report["tasks"]}
    [c_task] = [t for t in tasks.values() if t["kind"] == "execution" and t["step__name"] == "C"]
    interrupted = [e for e in events if e["type"] == "task_interrupted" and e["subject"] == c_task["id"]]
    assert len(interrupted) == 1 and "lease expired" in interrupted[0]["message"], interrupted
    assert interrupted[0]["at"] > lost_at > cluster.kills[0]["at"]  # a restarted cluster's tick did it
    assert any(k["at"] > lost_at for k in cluster.kills)  # and kills fell while the directive waited for it
    assert (c_task["attempt"], c_task["status"], c_task["daemon__name"]) == (2, "done", "box-2")

    # Nothing lost: every step passed once, after one execution and one evaluation.
    assert report["status"] == "completed"
    assert {name: s["status"] for name, s in report["steps"].items()} == dict.fromkeys("ABCD", "passed")
    per_step: dict[tuple[str, str], int] = {}
    for task in tasks.values():
        if task["step__name"]:
            per_step[task["kind"], task["step__name"]] = per_step.get((task["kind"], task["step__name"]), 0) + 1
    assert per_step == {(kind, name): 1 for kind in ("execution", "monitoring") for name in "ABCD"}
    kinds = sorted(t["kind"] for t in tasks.values() if not t["step__name"])
    assert kinds == ["completion", "planning"]  # one completion task

    # Nothing duplicated: one dispatch (one spawn_task, one move to `starting`)
    # per attempt, one end per task, each event once.
    for task in tasks.values():
        assert task["status"] == "done", task
        starts = [e for e in events if e["type"] == "task_starting" and e["subject"] == task["id"]]
        done = [e for e in events if e["type"] == "task_done" and e["subject"] == task["id"]]
        assert (report["spawns"].get(task["id"]), len(starts), len(done)) == (task["attempt"], task["attempt"], 1), task
    for event_type in (
        "step_passed",
        "step_evaluating",
        "chain_completed",
        "directive_completing",
        "directive_completed",
    ):
        subjects = [e["subject"] for e in events if e["type"] == event_type]
        assert len(subjects) == len(set(subjects)) > 0, (event_type, subjects)
    for runner in (first, second):
        assert not runner.daemon.errors, runner.daemon.errors
    assert {t["id"] for t in tasks.values() if t["daemon__name"] == "box-2"} <= set(second.daemon.runs)
    print(
        f"\ncluster kills: {len(cluster.kills)} SIGKILLs of the cluster's process group, {len(cut)} during a tick; "
        f"{cluster.ticks_done} ticks completed by the killed incarnations"
    )
