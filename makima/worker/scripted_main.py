"""The scripted agent's program: ``python -m makima.worker.scripted_main``.

A deterministic agent for machines without a model. It reads the prompt on
stdin (and mostly ignores it), finds out which task it runs from the
environment the daemon sets (``MAKIMA_TASK_KIND``, ``MAKIMA_STEP_ID`` …) and
the real ``makima`` CLI (``makima --json directive show``), then does what its
script says for that task: submit a plan, write files and run commands, write
an evaluation, record a pull request, and finally ``makima supervisor
complete``. The format is documented in ``docs/scripted-agent.md``.

Exit status 0 when the task succeeded, 1 when it failed (the reason on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

SCRIPT_NAMES = (".makima/script.yaml", ".makima/script.yml", ".makima/script.json")
TOP_LEVEL = {"planning", "replanning", "steps", "evaluations", "completion", "verification"}
#: Keys every entry may have; they say what to do, not what to report.
ACTIONS = {"say", "merge", "delete", "write", "run", "commit", "sleep", "succeed", "error", "complete"}
PLAN_KEYS = ACTIONS | {"steps", "via", "remove", "raw"}
COMPLETION_KEYS = ACTIONS | {"pr_url"}
VERIFICATION_KEYS = COMPLETION_KEYS | {"mark_completed"}
EVALUATION_DEFAULT: dict[str, Any] = {
    "passed": True,
    "overallScore": 1.0,
    "confidenceLevel": "green",
    "criteriaResults": [],
    "summaryFeedback": "The script has no evaluation for this step: the scripted agent passes it.",
    "reworkInstructions": "",
}
MERGE_LINE = re.compile(r"^\s*git merge --no-edit (\S+)\s*$", re.MULTILINE)


class ScriptError(Exception):
    """The task fails with this message."""


def say(text: str) -> None:
    for line in str(text).splitlines() or [""]:
        print(line, flush=True)


# --- the script ---------------------------------------------------------------


def find_script(given: str | None, root: Path) -> Path | None:
    if given:
        path = Path(given)
        if not path.is_file():
            raise ScriptError(f"script {given} does not exist")
        return path
    for name in SCRIPT_NAMES:
        if (root / name).is_file():
            return root / name
    return None


def load_script(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ScriptError(f"script {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ScriptError(f"script {path}: the top level must be a mapping")
    for key in data:
        if key not in TOP_LEVEL:
            say(f"warning: the script's top-level key {key!r} is not used by the scripted agent")
    return data


def for_attempt(entry: Any, attempt: int, where: str) -> dict[str, Any]:
    """The entry for attempt ``attempt`` (1-based): a list, or a mapping with
    ``attempts`` (its other keys apply to every attempt), holds one entry per
    attempt and its last one repeats."""
    if isinstance(entry, dict) and "attempts" in entry:
        shared = {k: v for k, v in entry.items() if k != "attempts"}
        attempts = entry["attempts"]
        if not isinstance(attempts, list):
            raise ScriptError(f"{where}.attempts must be a list")
    elif isinstance(entry, list):
        shared, attempts = {}, entry
    else:
        shared, attempts = {}, [entry]
    if not attempts:
        return dict(shared)
    index = min(max(attempt, 1), len(attempts)) - 1
    chosen = attempts[index]
    if chosen is None:
        chosen = {}
    if not isinstance(chosen, dict):
        raise ScriptError(f"{where}: attempt {index + 1} must be a mapping, not {type(chosen).__name__}")
    return {**shared, **chosen}


def pick(section: Any, name: str, attempt: int, where: str) -> dict[str, Any] | None:
    """The entry of ``section`` for step ``name`` (else ``"*"``), or None."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ScriptError(f"{where} must be a mapping of step names")
    for key in (name, "*"):
        if key in section:
            return for_attempt(section[key], attempt, f"{where}.{key}")
    return None


def check_keys(entry: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ScriptError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


# --- the makima CLI ------------------------------------------------------------


class Makima:
    """Calls the real ``makima`` CLI. ``MAKIMA_CLI`` (a command line) replaces
    ``python -m makima.cli``: a test hook, see the docs."""

    def __init__(self, env: Mapping[str, str]) -> None:
        override = env.get("MAKIMA_CLI", "").strip()
        self.prefix = shlex.split(override) if override else [sys.executable, "-m", "makima.cli"]
        self._directive: dict[str, Any] | None = None

    def call(self, *args: str, stdin: str | None = None, quiet: bool = False) -> str:
        shown = shlex.join(args)
        shown = shown if len(shown) <= 200 else shown[:199] + "…"
        say(f"$ makima {shown}" + (" < input" if stdin is not None else ""))
        try:
            done = subprocess.run([*self.prefix, *args], input=stdin or "", capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ScriptError(f"makima {args[0]} could not run: {exc}") from exc
        if not quiet and done.stdout.strip():
            say(done.stdout.rstrip())
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip() or "no output"
            raise ScriptError(f"`makima {shlex.join(args)}` failed with status {done.returncode}: {detail}")
        return done.stdout

    def directive(self) -> dict[str, Any]:
        """``makima --json directive show``, once per run."""
        if self._directive is None:
            out = self.call("--json", "directive", "show", quiet=True)
            try:
                data = json.loads(out)
            except ValueError as exc:
                raise ScriptError(f"`makima --json directive show` did not print JSON: {out[:200]!r}") from exc
            if isinstance(data, dict) and isinstance(data.get("directive"), dict):
                data = {**data["directive"], **{k: v for k, v in data.items() if k != "directive"}}
            if not isinstance(data, dict):
                raise ScriptError("`makima --json directive show` did not print an object")
            self._directive = data
        return self._directive

    def steps(self) -> list[dict[str, Any]]:
        steps = self.directive().get("steps") or []
        return [s for s in steps if isinstance(s, dict)]

    def complete(self) -> None:
        self.call("supervisor", "complete")


# --- the worktree ----------------------------------------------------------------


class Worktree:
    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root.resolve()
        self.env = env

    def path(self, name: Any) -> Path:
        """``name`` inside the worktree; refuses anything that could leave it."""
        if not isinstance(name, str) or not name.strip():
            raise ScriptError(f"bad path {name!r}: a relative path inside the worktree is needed")
        pure = PurePosixPath(name.replace("\\", "/"))
        if pure.is_absolute() or Path(name).is_absolute() or ".." in pure.parts:
            raise ScriptError(f"refusing path {name!r}: paths must stay inside the worktree (no absolute paths, no ..)")
        if pure.parts and pure.parts[0] == ".git":
            raise ScriptError(f"refusing path {name!r}: the scripted agent does not write inside .git")
        target = self.root.joinpath(*pure.parts)
        if not target.resolve().is_relative_to(self.root):  # a symlink pointing out
            raise ScriptError(f"refusing path {name!r}: it resolves outside the worktree")
        return target

    def write(self, files: Any) -> None:
        if not isinstance(files, dict):
            raise ScriptError("write must map paths to file contents")
        targets = [(name, self.path(name), content) for name, content in files.items()]  # all checked first
        for name, target, content in targets:
            if not isinstance(content, str):
                raise ScriptError(f"write {name}: the content must be text, not {type(content).__name__}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content, encoding="utf-8")
            say(f"write {name} ({len(content.encode('utf-8'))} bytes)")

    def delete(self, names: Any) -> None:
        for name in as_list(names, "delete"):
            target = self.path(name)
            if target.is_file() or target.is_symlink():
                target.unlink()
                say(f"delete {name}")
            else:
                say(f"delete {name}: not there")

    def run(self, commands: Any) -> None:
        for command in as_list(commands, "run"):
            if not isinstance(command, str):
                raise ScriptError(f"run: each command is one shell command line, not {command!r}")
            say(f"$ {command}")
            # No __pycache__ for the commit to pick up (parallel steps would conflict on it).
            env = {"PYTHONDONTWRITEBYTECODE": "1", **self.env}
            code = subprocess.run(
                command, shell=True, cwd=self.root, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT
            ).returncode
            if code != 0:
                raise ScriptError(f"command failed with status {code}: {command}")

    def git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["git", *args], cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise ScriptError(f"git {shlex.join(args)} failed: {(done.stderr or done.stdout).strip()}")
        return done

    def _identity(self) -> list[str]:
        if self.git("config", "user.email", check=False).stdout.strip():
            return []
        return ["-c", "user.name=makima scripted agent", "-c", "user.email=scripted-agent@makima.invalid"]

    def merge(self, branches: list[str]) -> None:
        for branch in branches:
            ref = next(
                (
                    r
                    for r in (branch, f"origin/{branch}")
                    if self.git("rev-parse", "-q", "--verify", f"{r}^{{commit}}", check=False).returncode == 0
                ),
                None,
            )
            if ref is None:
                say(f"merge {branch}: no such branch here, skipped")
                continue
            if self.git("merge-base", "--is-ancestor", ref, "HEAD", check=False).returncode == 0:
                say(f"merge {branch}: already merged")
                continue
            done = self.git(*self._identity(), "merge", "--no-edit", ref, check=False)
            if done.returncode != 0:
                self.git("merge", "--abort", check=False)
                raise ScriptError(
                    f"merging {branch} failed (the scripted agent cannot resolve conflicts): {done.stdout.strip() or done.stderr.strip()}"
                )
            say(f"merge {branch}: merged")

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        if self.git("diff", "--cached", "--quiet", check=False).returncode == 0:
            say("commit: nothing to commit")
            return
        self.git(*self._identity(), "commit", "-q", "-m", message)
        say(f"commit {self.git('rev-parse', '--short', 'HEAD').stdout.strip()}: {message}")


def as_list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    if isinstance(value, str | int | float):
        return [value]
    raise ScriptError(f"{what} must be a list")


# --- one run ----------------------------------------------------------------------


class Agent:
    def __init__(
        self,
        *,
        script: dict[str, Any],
        prompt: str,
        kind: str,
        root: Path,
        env: dict[str, str],
        step: str | None,
        attempt: int | None,
    ) -> None:
        self.script = script
        self.prompt = prompt
        self.kind = kind
        self.env = env
        self.worktree = Worktree(root, env)
        self.makima = Makima(env)
        self.step_name = step
        self.attempt = attempt

    # The step this task works on, from the directive the CLI shows.
    def current_step(self) -> tuple[str, int]:
        if not self.step_name:
            step_id = self.env.get("MAKIMA_STEP_ID", "").strip()
            if not step_id:
                raise ScriptError(f"MAKIMA_STEP_ID is not set: a {self.kind} task needs to know its step")
            step = next((s for s in self.makima.steps() if str(s.get("id")) == step_id), None)
            if step is None:
                raise ScriptError(f"step {step_id} is not among the directive's steps")
            self.step_name = str(step.get("name") or "")
            self.attempt = int(step.get("rework_count") or 0) + 1
        self.attempt = self.attempt or 1
        self.env.update(MAKIMA_STEP_NAME=self.step_name, MAKIMA_ATTEMPT=str(self.attempt))
        return self.step_name, self.attempt

    def act(self, entry: dict[str, Any], *, merge_default: bool = False, commit_default: str | None = None) -> None:
        """The common actions, in this order: say, merge, delete, write, run,
        commit, sleep; then ``succeed: false`` fails the task."""
        if entry.get("say") is not None:
            say(entry["say"])
        merge = entry.get("merge", merge_default)
        if merge is True or merge == "prompt":
            self.worktree.merge(list(dict.fromkeys(MERGE_LINE.findall(self.prompt))))
        elif merge:
            self.worktree.merge([str(b) for b in as_list(merge, "merge")])
        if "delete" in entry:
            self.worktree.delete(entry["delete"])
        if "write" in entry:
            self.worktree.write(entry["write"])
        if "run" in entry:
            self.worktree.run(entry["run"])
        commit = entry.get("commit", commit_default)
        if commit:
            self.worktree.commit(
                commit if isinstance(commit, str) else commit_default or f"scripted agent: {self.kind}"
            )
        if entry.get("sleep"):
            try:
                seconds = float(entry["sleep"])
            except (TypeError, ValueError) as exc:
                raise ScriptError(f"sleep must be a number of seconds, not {entry['sleep']!r}") from exc
            say(f"sleep {seconds:g} s")
            time.sleep(seconds)
        if entry.get("succeed", True) is False:
            raise ScriptError(str(entry.get("error") or "the script says this attempt fails"))

    def finish(self, entry: dict[str, Any]) -> None:
        if entry.get("complete", True):
            self.makima.complete()

    # --- per kind

    def planning(self) -> str:
        has_steps = False
        existing: dict[str, dict[str, Any]] = {}
        plan = self.script.get("planning")
        if "replanning" in self.script or plan:
            existing = {str(s.get("name")): s for s in self.makima.steps()}
            has_steps = bool(existing)
        if has_steps and "replanning" in self.script:
            plan, where = self.script["replanning"], "replanning"
        else:
            where = "planning"
        if not plan:
            raise ScriptError("the script has no `planning` section: the scripted agent has no plan to submit")
        if not isinstance(plan, dict):
            raise ScriptError(f"{where} must be a mapping")
        check_keys(plan, PLAN_KEYS, where)
        self.act(plan)
        for name in as_list(plan.get("remove"), f"{where}.remove"):
            step = existing.get(str(name))
            if step is None:
                say(f"remove {name}: no such step")
                continue
            self.makima.call("directive", "remove-step", str(step.get("id")))
        via = plan.get("via", "batch")
        if via not in ("batch", "file"):
            raise ScriptError(f"{where}.via must be batch or file, not {via!r}")
        if "raw" in plan:  # a plan as an agent might write it, prose and all
            self.makima.call("contract", "create-file", "chain-plan", stdin=str(plan["raw"]))
        else:
            steps = [
                self.plan_step(s, f"{where}.steps[{i}]")
                for i, s in enumerate(as_list(plan.get("steps"), f"{where}.steps"))
            ]
            if via == "file":
                self.makima.call(
                    "contract", "create-file", "chain-plan", stdin=json.dumps({"steps": steps}, indent=2) + "\n"
                )
            else:
                new = [s for s in steps if s["name"] not in existing]
                for step in steps:
                    if step["name"] in existing:
                        say(f"step {step['name']} exists already")
                if new:
                    self.makima.call("directive", "batch-add-steps", "--json", json.dumps(new))
                else:
                    say("no new steps to add")
        self.finish(plan)
        return "plan submitted"

    @staticmethod
    def plan_step(step: Any, where: str) -> dict[str, Any]:
        if not isinstance(step, dict) or not isinstance(step.get("name"), str) or not step["name"].strip():
            raise ScriptError(f"{where}: a step is a mapping with a name")
        result = dict(step)
        result.setdefault("description", "")
        result.setdefault("task_plan", result["description"])
        result.setdefault("depends_on", [])
        return result

    def execution(self) -> str:
        section = self.script.get("steps")
        if section:
            name, attempt = self.current_step()
            say(f"step {name}, attempt {attempt}")
            entry = pick(section, name, attempt, "steps") or {}
        else:
            entry = {}
        check_keys(entry, ACTIONS, f"steps.{self.step_name or '*'}")
        # Like a model-driven agent, it commits its work (the daemon would commit leftovers).
        message = f"{self.step_name}: attempt {self.attempt} (scripted agent)" if self.step_name else "scripted agent"
        self.act(entry, merge_default=True, commit_default=message)
        self.finish(entry)
        return f"step {self.step_name} done" if self.step_name else "step done"

    def monitoring(self) -> str:
        section = self.script.get("evaluations")
        entry: dict[str, Any] = {}
        if section:
            name, attempt = self.current_step()
            say(f"evaluating step {name}, attempt {attempt}")
            entry = pick(section, name, attempt, "evaluations") or {}
        self.act(entry)
        # ``raw``: the verdict exactly as given (an unparsable one, say).
        content = str(entry["raw"]) if "raw" in entry else json.dumps(evaluation(entry), indent=2) + "\n"
        self.makima.call("contract", "create-file", "evaluation-result", stdin=content)
        self.finish(entry)
        return "evaluation submitted"

    def completion(self) -> str:
        entry = for_attempt(self.script.get("completion") or {}, 1, "completion")
        check_keys(entry, COMPLETION_KEYS, "completion")
        self.act(entry, merge_default=True)
        if entry.get("pr_url"):
            self.makima.call("directive", "update", "--pr-url", str(entry["pr_url"]))
        self.finish(entry)
        return "completion done"

    def verification(self) -> str:
        entry = for_attempt(self.script.get("verification") or {}, 1, "verification")
        check_keys(entry, VERIFICATION_KEYS, "verification")
        self.act(entry)
        if entry.get("pr_url"):
            self.makima.call("directive", "update", "--pr-url", str(entry["pr_url"]))
        if entry.get("mark_completed", True):
            self.makima.call("directive", "update", "--status", "completed")
        self.finish(entry)
        return "verification done"

    def other(self) -> str:
        entry = for_attempt(self.script.get(self.kind) or {}, 1, self.kind)
        check_keys(entry, ACTIONS, self.kind)
        self.act(entry)
        self.finish(entry)
        return f"{self.kind} done"

    def run(self) -> str:
        handler = {
            "planning": self.planning,
            "execution": self.execution,
            "monitoring": self.monitoring,
            "completion": self.completion,
            "verification": self.verification,
        }.get(self.kind, self.other)
        return handler()


def evaluation(entry: dict[str, Any]) -> dict[str, Any]:
    """The ``evaluation-result`` JSON of a monitoring entry: its ``result``, or
    the entry without its action keys; missing fields get defaults."""
    given = entry.get("result")
    if given is None:
        given = {k: v for k, v in entry.items() if k not in ACTIONS}
    if not isinstance(given, dict):
        raise ScriptError("an evaluation must be a mapping")
    if not given:
        return dict(EVALUATION_DEFAULT)
    result = dict(given)
    if "overallScore" not in result:
        result["overallScore"] = 1.0 if result.get("passed", True) else 0.0
    try:
        score = float(result["overallScore"])
    except (TypeError, ValueError) as exc:
        raise ScriptError(f"overallScore must be a number, not {result['overallScore']!r}") from exc
    result.setdefault("passed", score >= 0.8)
    result.setdefault("confidenceLevel", "green" if score >= 0.8 else "yellow" if score >= 0.5 else "red")
    result.setdefault("criteriaResults", [])
    result.setdefault("summaryFeedback", "")
    result.setdefault("reworkInstructions", "")
    return result


def infer_kind(prompt: str) -> str:
    """The task's kind from its prompt, for when MAKIMA_TASK_KIND is missing."""
    head = prompt[:300]
    for marker, kind in (
        ("You are the planner", "planning"),
        ("You are the evaluator", "monitoring"),
        ("You are finishing", "completion"),
        ("completion task finished without", "verification"),
    ):
        if marker in head:
            return kind
    return "execution"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripted-agent", description="makima's deterministic agent")
    parser.add_argument("--script", help="the script (default: .makima/script.yaml or .json in the worktree)")
    parser.add_argument("--kind", help="the task's kind (default: MAKIMA_TASK_KIND)")
    parser.add_argument("--step", help="the step's name (default: found through MAKIMA_STEP_ID)")
    parser.add_argument("--attempt", type=int, help="the attempt, with --step (default 1)")
    args = parser.parse_args(argv)
    prompt = sys.stdin.read() if not sys.stdin.isatty() else ""
    env = dict(os.environ)
    kind = args.kind or env.get("MAKIMA_TASK_KIND", "").strip() or infer_kind(prompt)
    root = Path.cwd()
    try:
        path = find_script(args.script, root)
        say(f"scripted agent: {kind} task {env.get('MAKIMA_TASK_NAME', '')}".rstrip())
        say(f"script: {path}" if path else "script: none (built-in defaults)")
        agent = Agent(
            script=load_script(path), prompt=prompt, kind=kind, root=root, env=env, step=args.step, attempt=args.attempt
        )
        summary = agent.run()
    except ScriptError as exc:
        sys.stdout.flush()
        print(f"scripted agent: {exc}", file=sys.stderr, flush=True)
        return 1
    say(f"scripted agent: {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
