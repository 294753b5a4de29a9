"""Wall time of the demo directive on the local stack, and how much of it is
orchestration overhead.

Starts what `./dev.sh run` starts — daphne, a django-q2 cluster and one
`makima daemon run` (scripted agent, 4 slots) — on a fresh database and a
fresh demo repository, runs the demo directive (planning, a diamond of four
steps with one rework, evaluations, completion) and prints:

- wall time from `start` to `completed`;
- agent time: when at least one task was running (the union of the tasks'
  started → finished intervals);
- overhead: the rest, i.e. time when no task was running — the server's
  hand-offs, the daemon preparing worktrees, committing and pushing;
- every hand-off gap (a task finishing → the next task starting while
  nothing else ran).

    .venv/bin/python bench/demo_run.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from directives import demo
from tests.e2e.fake_daemon import api
from tests.e2e.stack import running_stack


def when(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="makima-demo-bench-") as folder:
        repository = demo.build_repository(Path(folder) / "greeter.git")
        with running_stack(cluster=True) as stack:
            stack.start_daemon("local", Path(folder) / "daemon", max_tasks=4)
            time.sleep(1.0)  # the daemon says hello
            directive = api(
                stack.base_url,
                "POST",
                "/api/v1/directives/",
                stack.api_key,
                {**demo.DIRECTIVE, "repository_url": str(repository)},
            )
            began = time.time()
            api(stack.base_url, "POST", f"/api/v1/directives/{directive['id']}/start/", stack.api_key)
            while True:
                current = api(stack.base_url, "GET", f"/api/v1/directives/{directive['id']}/", stack.api_key)
                if current["status"] in ("completed", "failed", "paused"):
                    break
                if time.time() - began > 600:
                    raise SystemExit("the demo did not finish within 10 minutes")
                time.sleep(0.2)
            ended = when(current["updated_at"])
            page = api(
                stack.base_url, "GET", f"/api/v1/tasks/?directive={directive['id']}&page_size=500", stack.api_key
            )
    if current["status"] != "completed":
        raise SystemExit(f"the demo ended {current['status']}")
    tasks = sorted(
        (
            (when(t["started_at"]), when(t["finished_at"]), t["kind"], t["name"])
            for t in page["results"]
            if t["started_at"]
        ),
        key=lambda item: item[0],
    )
    busy, gaps, covered_until = 0.0, [], began
    for start, finish, _, _ in tasks:
        if start > covered_until:
            gaps.append(start - covered_until)
        busy += max(0.0, finish - max(start, covered_until))
        covered_until = max(covered_until, finish)
    gaps.append(max(0.0, ended - covered_until))  # last task → completed
    wall = ended - began
    print(f"demo directive: {len(tasks)} tasks ({', '.join(sorted({k for *_, k, _ in tasks}))})")
    print(
        f"wall time {wall:.2f} s   agent time {busy:.2f} s   overhead {wall - busy:.2f} s ({(wall - busy) / wall:.0%})"
    )
    print(
        f"{len(gaps)} hand-offs with nothing running: p50 {statistics.median(gaps) * 1000:.0f} ms  "
        f"max {max(gaps) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
