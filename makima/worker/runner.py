"""One task, from worktree to report: :class:`TaskRunner`.

1. ``Workspace.prepare`` (in a thread: git blocks) checks out the task's
   branch; then ``task_started``. A git failure ends the task ``failed``.
2. The agent runs in the worktree with the task's prompt (preceded by a
   merge preamble when some ``merge_branches`` conflicted) and environment,
   under ``task.timeout_s`` (a timeout ends it ``failed``).
3. When the agent succeeded, the verifiers run (their results go with the
   report; a failing verifier does not change the status: the server judges).
4. When the agent ended ``done`` or ``failed``, ``Workspace.finish`` commits
   what it left and, for ``completion_action`` "branch"/"pr" with a remote,
   pushes the branch (a failed push turns ``done`` into ``failed``).
5. ``task_finished`` is spooled, the output flushed, the report sent (see
   :mod:`makima.worker.daemon`), and the worktree removed. The branch lives on on the remote; for
   ``completion_action`` "none" (planning, monitoring and verification tasks,
   which read code rather than produce it) nothing is pushed and whatever the
   agent changed goes with the worktree.

An interrupt (``interrupt_task``, or the daemon shutting down) cancels the
runner: the agent gets SIGTERM then SIGKILL, and the task ends
``interrupted`` with the reason as its error; nothing is pushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from makima.worker.base import Agent, AgentResult, TaskSpec, Worktree
from makima.worker.output import OutputBatcher, Send, Throttle, fit_report

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: ``keep(report)``: write a ``task_finished`` report to the spool (it is sent afterwards).
Keep = Callable[[dict[str, Any]], None]

MAX_COST_USD = 99_999_999


def run_in_thread(function: Callable[..., T], /, *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """Run a blocking call in a daemon thread; its result as an asyncio future.

    Not ``asyncio.to_thread``: a stuck git or verifier call must not keep the
    daemon from exiting (the default executor is joined at exit), and an
    interrupted task must be able to wait for the call to end before it
    removes the worktree the call works in."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            result, error = function(*args, **kwargs), None
        except BaseException as exc:
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name=f"makima-{getattr(function, '__name__', 'call')}", daemon=True).start()
    return future


def build_prompt(task: TaskSpec, worktree: Worktree) -> str:
    """The agent's prompt: the task's plan, after a merge preamble when some
    ``merge_branches`` could not be merged automatically."""
    if not worktree.conflicts:
        return task.plan
    branches = "\n".join(f"- {name}" for name in worktree.conflicts)
    preamble = (
        "BEFORE ANYTHING ELSE: these branches had to be merged into your branch, but merging them "
        "automatically failed with conflicts (the merge was aborted, so your worktree is clean):\n"
        f"{branches}\n"
        "Merge each of them yourself first (`git merge origin/<branch>`, or `git merge <branch>` for a "
        "branch that exists only locally), resolve every conflict so that the work of both sides is kept, "
        "and commit the merge. Only then start on the task below.\n\n"
    )
    return preamble + task.plan


def task_environment(task: TaskSpec, worktree: Worktree) -> dict[str, str]:
    """The agent's environment: the daemon's, the task's, and where it runs."""
    return {
        **os.environ,
        **task.env,
        "MAKIMA_TASK_KIND": task.kind,
        "MAKIMA_TASK_NAME": task.name,
        "MAKIMA_WORKTREE": str(worktree.path),
    }


def _cost(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return None
    return min(float(value), MAX_COST_USD)


def _exit_code(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return max(min(value, 2**31 - 1), -(2**31))


class TaskRunner:
    """Runs one task (see the module docs). The daemon calls :meth:`start`,
    :meth:`interrupt` and :meth:`send_message`; the runner reports through
    ``send`` (best effort: ``task_started``, ``task_output``,
    ``task_progress``, and ``task_finished`` once ``keep`` has spooled it)."""

    def __init__(
        self,
        task: TaskSpec,
        *,
        agent: Agent,
        workspace: Any,
        send: Send,
        keep: Keep,
        output_interval_s: float = 0.25,
        progress_interval_s: float = 1.0,
        verifier_timeout_s: float = 600,
    ) -> None:
        self.task = task
        self.agent = agent
        self.workspace = workspace
        self.send = send
        self.keep = keep
        self.verifier_timeout_s = verifier_timeout_s
        self.output = OutputBatcher(task.id, send, interval_s=output_interval_s)
        self.progress = Throttle(self._send_progress, interval_s=progress_interval_s)
        self.cost: float | None = None
        self.worktree: Worktree | None = None
        self.report: dict[str, Any] | None = None
        #: The report is in the spool: the task no longer counts against capacity.
        self.reported = False
        self.job: asyncio.Task[dict[str, Any] | None] | None = None
        self._interrupt_reason: str | None = None
        self._delivering = False
        self._threads: list[asyncio.Future[Any]] = []
        self._prepare: asyncio.Future[Worktree] | None = None

    # ---------------------------------------------------------------- control

    def start(self) -> asyncio.Task[dict[str, Any] | None]:
        self.job = asyncio.get_running_loop().create_task(self.run(), name=f"task-{self.task.id}")
        return self.job

    @property
    def interrupted(self) -> bool:
        return self._interrupt_reason is not None

    def interrupt(self, reason: str) -> bool:
        """Stop the task: the agent gets SIGTERM then SIGKILL and the task ends
        ``interrupted``. False when it is too late (its report is being made)."""
        if self._delivering or self.job is None or self.job.done():
            return False
        if self._interrupt_reason is None:
            self._interrupt_reason = reason or "interrupted"
            self.job.cancel()
        return True

    def send_message(self, message: str) -> bool:
        """Input for the running agent; False when it cannot take any."""
        if self.reported or self.worktree is None:
            return False
        try:
            return bool(self.agent.send(self.task.id, message))
        except Exception:
            logger.exception("task %s: the agent failed to take a message", self.task.id)
            return False

    # ---------------------------------------------------------------- the task

    async def run(self) -> dict[str, Any] | None:
        """The whole task; returns the report it delivered."""
        pump = asyncio.get_running_loop().create_task(self.output.run())
        try:
            try:
                report = await self._work()
            except asyncio.CancelledError:
                if self._interrupt_reason is None:
                    raise  # not an interrupt: the daemon is going away at once
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
                logger.info("task %s: interrupted (%s)", self.task.id, self._interrupt_reason)
                report = self._report("interrupted", error=self._interrupt_reason)
            self._delivering = True
            self.report = fit_report(report)
            self.progress.cancel()
            # Durable before anything else: sending may wait on a slow server, and the
            # report must survive a crash meanwhile.
            self.keep(self.report)
            self.reported = True
            await self.output.close()  # the lines go out before the end
            await self.send(self.report)
        finally:
            pump.cancel()
            self.progress.cancel()
        await self._cleanup()
        return self.report

    async def _blocking(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        future = run_in_thread(function, *args, **kwargs)
        self._threads.append(future)
        # Shielded: an interrupt stops the waiting, not the call; _cleanup waits for it.
        return await asyncio.shield(future)

    async def _work(self) -> dict[str, Any]:
        task = self.task
        self._prepare = run_in_thread(self.workspace.prepare, task)
        self._threads.append(self._prepare)
        try:
            worktree = await asyncio.shield(self._prepare)
        except Exception as exc:
            logger.warning("task %s: preparing the worktree failed: %s", task.id, exc)
            return self._report("failed", error=f"could not prepare the worktree: {exc}")
        self.worktree = worktree
        await self.send(
            {"type": "task_started", "task_id": task.id, "branch": worktree.branch, "base_commit": worktree.base_commit}
        )
        if worktree.conflicts:
            self.output.add("system", "merge conflicts left for the agent: " + ", ".join(worktree.conflicts))

        result = await self._run_agent(worktree)
        self.cost = _cost(result.cost_usd) if result.cost_usd is not None else self.cost
        status, error = result.status, result.error or None

        verifier_results: list[dict[str, Any]] = []
        if status == "done" and (task.verifiers == "auto" or len(task.verifiers) > 0):
            verifier_results = await self._run_verifiers(worktree)

        commit_sha = None
        if status in ("done", "failed"):
            push = task.completion_action in ("branch", "pr") and worktree.has_remote
            try:
                commit_sha = await self._blocking(self.workspace.finish, worktree, message=task.name, push=push)
            except Exception as exc:
                what = "commit and push" if push else "commit"
                logger.warning("task %s: could not %s the work: %s", task.id, what, exc)
                problem = f"could not {what} the task's work: {exc}"
                error = f"{error}\n{problem}" if error else problem
                status = "failed"
        return self._report(
            status,
            exit_code=result.exit_code,
            summary=result.summary,
            error=error,
            commit_sha=commit_sha,
            verifier_results=verifier_results,
        )

    async def _run_agent(self, worktree: Worktree) -> AgentResult:
        task = self.task
        timeout = task.timeout_s if task.timeout_s and task.timeout_s > 0 else None
        try:
            async with asyncio.timeout(timeout):
                return await self.agent.run(
                    task=task,
                    prompt=build_prompt(task, worktree),
                    cwd=worktree.path,
                    env=task_environment(task, worktree),
                    emit=self.output.add,
                    progress=self._on_progress,
                )
        except TimeoutError:
            logger.info("task %s: timed out after %g s", task.id, timeout)
            return AgentResult(status="failed", error=f"timed out after {timeout:g} s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("task %s: the %s agent failed", task.id, self.agent.name)
            return AgentResult(status="failed", error=f"the {self.agent.name} agent failed: {exc!r}")

    async def _run_verifiers(self, worktree: Worktree) -> list[dict[str, Any]]:
        from makima.worker.verifiers import run_verifiers

        env = {k: v for k, v in task_environment(self.task, worktree).items() if k != "MAKIMA_API_KEY"}
        try:
            results = await self._blocking(
                run_verifiers, self.task.verifiers, worktree.path, timeout_s=self.verifier_timeout_s, env=env
            )
        except Exception as exc:
            logger.exception("task %s: the verifiers could not run", self.task.id)
            command = self.task.verifiers if isinstance(self.task.verifiers, str) else "; ".join(self.task.verifiers)
            results = [
                {
                    "name": "verifiers",
                    "command": command,
                    "passed": False,
                    "exit_code": None,
                    "duration_s": 0.0,
                    "output_tail": f"the verifiers could not run: {exc}",
                }
            ]
        for result in results:
            state = "passed" if result.get("passed") else "failed"
            self.output.add("system", f"verifier {result.get('name') or result.get('command')}: {state}")
        return list(results)

    def _on_progress(self, cost_usd: float) -> None:
        cost = _cost(cost_usd)
        if cost is not None:
            self.cost = cost
            self.progress.update(cost)

    async def _send_progress(self, cost: float) -> None:
        if not self._delivering:
            await self.send({"type": "task_progress", "task_id": self.task.id, "cost_usd": cost})

    def _report(
        self,
        status: str,
        *,
        exit_code: int | None = None,
        summary: str | None = None,
        error: str | None = None,
        commit_sha: str | None = None,
        verifier_results: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        branch = self.worktree.branch if self.worktree is not None else self.task.branch
        return {
            "type": "task_finished",
            "id": str(uuid.uuid4()),
            "task_id": self.task.id,
            "status": status,
            "exit_code": _exit_code(exit_code),
            "summary": summary or "",
            "error": error or None,
            "branch": branch or None,
            "commit_sha": commit_sha or None,
            "cost_usd": self.cost,
            "verifier_results": list(verifier_results or []),
        }

    # ---------------------------------------------------------------- clean-up

    async def _cleanup(self) -> None:
        """Wait for blocking calls an interrupt left behind, then remove the worktree."""
        pending = [future for future in self._threads if not future.done()]
        if pending:
            await asyncio.wait(pending)
        for future in self._threads:
            if not future.cancelled():
                future.exception()  # handled already, or moot after an interrupt: mark it seen
        worktree = self.worktree
        prepared = self._prepare
        if worktree is None and prepared is not None and not prepared.cancelled() and prepared.exception() is None:
            worktree = prepared.result()  # interrupted while git was still preparing: it exists now
        if worktree is None:
            return
        try:
            await asyncio.shield(run_in_thread(self.workspace.remove, worktree))
        except Exception as exc:
            logger.warning("task %s: could not remove the worktree %s: %s", self.task.id, worktree.path, exc)
