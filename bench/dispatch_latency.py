"""Time from a daemon sending `task_finished` for a step to it receiving the
`spawn_task` of the step's successor, over a 50-step linear chain with
evaluation off, on a real daphne with the embedded defaults.

    .venv/bin/python bench/dispatch_latency.py
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/makima REDIS_URL=redis://127.0.0.1:6379/0 .venv/bin/python bench/dispatch_latency.py

Prints p50 and p95 in milliseconds. Targets: p50 ≤ 50 ms, p95 ≤ 200 ms.

Each task "works" for ``--work-ms`` (default 50) between its ``task_started``
and its ``task_finished``, as any real agent does: with 0 the daemon sends
``ack``, ``task_started`` and ``task_finished`` back to back, and the figure
also contains the server storing the first two (the socket's messages are
handled in order), which is not hand-off time.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from tests.e2e.fake_daemon import FakeDaemon, Outcome, api
from tests.e2e.stack import running_stack

STEPS = 50


async def work(daemon: FakeDaemon, task: dict, *, seconds: float) -> Outcome:
    await asyncio.sleep(seconds)
    return Outcome(summary="ok")


async def measure(work_s: float) -> tuple[list[float], list[float]]:
    with running_stack() as stack:

        async def rest(method: str, path: str, body=None):
            return await asyncio.to_thread(api, stack.base_url, method, path, stack.api_key, body)

        directive = await rest(
            "POST",
            "/api/v1/directives/",
            {"title": "Latency", "goal": "Measure dispatch.", "agent": "scripted", "evaluation_mode": "off"},
        )
        steps = [
            {"name": f"S{i:02d}", "task_plan": "noop", **({"depends_on": [f"S{i - 1:02d}"]} if i else {})}
            for i in range(STEPS)
        ]
        await rest("POST", f"/api/v1/directives/{directive['id']}/steps/batch/", {"steps": steps})
        daemon = FakeDaemon(
            ws_url=stack.ws_url,
            token=stack.daemon_token,
            behaviour=functools.partial(work, seconds=work_s),
            max_tasks=4,
        )
        runner = asyncio.create_task(daemon.run())
        while daemon.welcome is None:
            await asyncio.sleep(0.01)
        await rest("POST", f"/api/v1/directives/{directive['id']}/start/")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            current = await rest("GET", f"/api/v1/directives/{directive['id']}/")
            if current["status"] == "completing" or len(daemon.finish_times) >= STEPS:
                break
            await asyncio.sleep(0.5)  # light polling: the API is not what is measured
        runner.cancel()
        try:
            await runner
        except asyncio.CancelledError:
            pass
    spawns = [(at, task) for at, task in daemon.spawn_times if task["kind"] == "execution"]
    spawns.sort(key=lambda item: item[0])
    latencies, stored = [], []
    for (_, previous), (spawned_at, _) in itertools.pairwise(spawns):
        finished = daemon.finish_times[previous["id"]]
        latencies.append((spawned_at - finished) * 1000)
        stored.append((daemon.received[daemon.report_ids[previous["id"]]] - finished) * 1000)
    return latencies, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-ms", type=float, default=50, help="how long each task works (default 50)")
    args = parser.parse_args()
    latencies, stored = asyncio.run(measure(args.work_ms / 1000))
    if len(latencies) < STEPS - 1:
        raise SystemExit(f"only {len(latencies) + 1} of {STEPS} steps ran")
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        f"{len(latencies)} hand-offs over a {STEPS}-step chain (evaluation off, {args.work_ms:g} ms of work per task)"
    )
    print(f"p50 {statistics.median(latencies):.1f} ms  p95 {quantiles[94]:.1f} ms  max {max(latencies):.1f} ms")
    print(f"of which task_finished → received (report stored): p50 {statistics.median(stored):.1f} ms")


if __name__ == "__main__":
    main()
