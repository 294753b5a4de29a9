"""The ``makima`` command line.

It talks to a makima server only over its REST API (``makima.client``) and,
for ``makima daemon run``, the daemon websocket, never through Django, so that
it runs on worker machines without the server's settings or database.

Agents use it with the environment the daemon gives them (``MAKIMA_URL``,
``MAKIMA_API_KEY``, ``MAKIMA_TASK_ID``, ``MAKIMA_DIRECTIVE_ID``,
``MAKIMA_CONTRACT_ID``); operators pass ``--url`` and ``--api-key``.

While the server is unavailable (restarting, or its proxy answering 502, 503,
504) a command retries its requests for up to ``--retry-for`` seconds
(``MAKIMA_RETRY_FOR``, default 60), one line on stderr per retry; then it fails
as it would have at once.

Exit status: 0 done, 1 the server refused, 2 usage error, 3 server unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, TextIO

from makima.client import DEFAULT_RETRY_FOR, ApiError, Client, Unreachable

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

#: Where each connection setting comes from: ``attribute: (environment variable, option)``.
SETTINGS = {
    "url": ("MAKIMA_URL", "--url"),
    "api_key": ("MAKIMA_API_KEY", "--api-key"),
    "directive": ("MAKIMA_DIRECTIVE_ID", "--directive"),
    "contract": ("MAKIMA_CONTRACT_ID", "--contract"),
    "task": ("MAKIMA_TASK_ID", "--task"),
}

#: Step statuses in the order progress is shown.
STEP_STATUSES = (
    "pending",
    "ready",
    "running",
    "evaluating",
    "awaiting_approval",
    "passed",
    "failed",
    "skipped",
    "blocked",
)
DIRECTIVE_ENDS = {"completed": EXIT_OK, "failed": EXIT_REFUSED, "archived": EXIT_REFUSED}
BAR_WIDTH = 30
EVENTS_PAGE = 1000


class UsageError(Exception):
    """Something to fix in the command line or its environment (exit status 2)."""


class Context:
    """What a command needs: its parsed arguments, the settings behind them,
    a client and the output stream."""

    def __init__(self, args: argparse.Namespace, out: TextIO, environ: Mapping[str, str]) -> None:
        self.args = args
        self.out = out
        self.environ = environ

    @property
    def json_output(self) -> bool:
        return bool(getattr(self.args, "json", False))

    def setting(self, name: str) -> str:
        """An option's value, else its environment variable's; a usage error when neither is set."""
        env, option = SETTINGS[name]
        value = (getattr(self.args, name, None) or self.environ.get(env, "")).strip()
        if not value:
            raise UsageError(f"{env} is not set: export it or pass {option}")
        return value

    @property
    def retry_for(self) -> float:
        """``--retry-for``, else ``$MAKIMA_RETRY_FOR``, else the client's default."""
        value = getattr(self.args, "retry_for", None)
        if value is not None:
            return value
        text = self.environ.get("MAKIMA_RETRY_FOR", "").strip()
        if not text:
            return DEFAULT_RETRY_FOR
        try:
            return retry_seconds(text)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"MAKIMA_RETRY_FOR {exc}") from None

    @cached_property
    def client(self) -> Client:
        return Client(self.setting("url"), self.setting("api_key"), retry_for=self.retry_for, notify=notice)

    def connect(self) -> Client:
        """Resolve the URL and the key, so that their absence is reported before a missing id's."""
        return self.client

    def directive_path(self, directive_id: str | None = None) -> str:
        return f"/directives/{directive_id or self.setting('directive')}/"

    def contract_path(self) -> str:
        return f"/contracts/{self.setting('contract')}/"

    def write(self, text: str) -> None:
        self.out.write(text if text.endswith("\n") else f"{text}\n")
        self.out.flush()

    def emit(self, data: Any, human: str) -> int:
        """Print the command's result: ``data`` as JSON with ``--json``, else ``human``."""
        self.write(json.dumps(data, indent=2, ensure_ascii=False) if self.json_output else human)
        return EXIT_OK


# --------------------------------------------------------------------------- input helpers


def split_list(value: str | None) -> list[str]:
    """``"a, b,c"`` → ``["a", "b", "c"]``."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


def seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def retry_seconds(text: str) -> float:
    """An argparse type: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds (0 or more), not {text!r}")
    return value


def notice(message: str) -> None:
    """Tell the user what is going on, on stderr: stdout is the command's result."""
    sys.stderr.write(f"makima: {message}\n")
    sys.stderr.flush()


def read_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where} is not valid JSON: {exc}") from None


def read_file(path: str) -> str:
    """A file's text; ``-`` is stdin."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def steps_from(value: Any, where: str) -> list[dict[str, Any]]:
    """A list of step objects, given as a list or as ``{"steps": [...]}``."""
    if isinstance(value, dict) and set(value) == {"steps"}:
        value = value["steps"]
    if not isinstance(value, list) or not all(isinstance(step, dict) for step in value):
        raise UsageError(f'{where} must be a JSON list of step objects (or {{"steps": [...]}})')
    return value


# --------------------------------------------------------------------------- human output


def short(identifier: str | None) -> str:
    return (identifier or "")[:8]


def step_names(steps: list[dict[str, Any]]) -> dict[str, str]:
    return {step["id"]: step["name"] for step in steps}


def step_line(step: dict[str, Any], names: Mapping[str, str]) -> str:
    after = ", ".join(names.get(dep, short(dep)) for dep in step.get("depends_on") or []) or "-"
    return (
        f"  {step['status']:<17} {step['name']}  [{step['id']}]  "
        f"order {step.get('order_index', 0)} · after: {after} · reworks: {step.get('rework_count', 0)}"
    )


def counts_text(counts: Mapping[str, int]) -> str:
    parts = [f"{counts[status]} {status}" for status in STEP_STATUSES if counts.get(status)]
    return ", ".join(parts) or "none"


def directive_summary(directive: dict[str, Any], steps: list[dict[str, Any]]) -> str:
    counts = directive.get("step_counts") or {}
    lines = [
        f"{directive['title']}",
        f"  id: {directive['id']}   status: {directive['status']}   agent: {directive.get('agent', '')}"
        f"   evaluation: {directive.get('evaluation_mode', '')}",
        f"  goal: {directive.get('goal', '').strip()}",
        f"  pull request: {directive.get('pr_url') or '-'}",
        f"steps: {counts.get('total', len(steps))} ({counts_text(counts)})",
    ]
    names = step_names(steps)
    lines.extend(step_line(step, names) for step in steps)
    return "\n".join(lines)


def bar(count: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = round(width * count / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


def progress_lines(directive: dict[str, Any], steps: list[dict[str, Any]]) -> list[str]:
    """The live block of ``directive watch``: a header and a bar per step status."""
    counts = directive.get("step_counts") or {}
    total = counts.get("total", 0)
    lines = [f"{directive['title']} — {directive['status']} — {counts.get('passed', 0)}/{total} steps passed"]
    lines.extend(
        f"  {status:<17} {bar(counts[status], total)} {counts[status]}"
        for status in STEP_STATUSES
        if counts.get(status)
    )
    running = [step["name"] for step in steps if step["status"] in ("running", "evaluating")]
    if running:
        lines.append(f"  working on: {', '.join(running)}")
    return lines


def progress_line(directive: dict[str, Any]) -> str:
    """The same as one plain line, for output that is not a terminal."""
    counts = directive.get("step_counts") or {}
    return (
        f"progress: {directive['status']} · {counts.get('passed', 0)}/{counts.get('total', 0)} steps passed"
        f" · {counts_text(counts)}"
    )


def event_line(event: dict[str, Any], names: Mapping[str, str]) -> str:
    data = event.get("data") or {}
    parts = [(event.get("created_at") or "")[11:19], event["event_type"]]
    if event.get("severity") not in (None, "", "info"):
        parts.insert(1, event["severity"].upper())
    if event.get("step"):
        parts.append(names.get(event["step"], short(event["step"])))
    if "from" in data and "to" in data:
        parts.append(f"({data['from']} → {data['to']})")
    if event.get("message"):
        parts.append(f"— {event['message']}")
    return "  ".join(parts)


# --------------------------------------------------------------------------- agent-facing commands


def directive_add_step(ctx: Context) -> int:
    args = ctx.args
    body: dict[str, Any] = {"name": args.name, "description": args.description, "task_plan": args.task_plan}
    if args.depends_on is not None:
        body["depends_on"] = split_list(args.depends_on)
    optional = {
        "order_index": args.order_index,
        "generation": args.generation,
        "step_type": args.step_type,
        "agent": args.agent,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    step = ctx.client.post(f"{ctx.directive_path()}steps/", body)
    return ctx.emit(step, f"added step {step['name']} [{step['id']}] ({step['status']})")


def directive_batch_add_steps(ctx: Context) -> int:
    args = ctx.args
    if args.file is not None:
        steps = steps_from(read_json(read_file(args.file), args.file), args.file)
    else:
        text = sys.stdin.read() if args.steps_json == "-" else args.steps_json
        steps = steps_from(read_json(text, "--json"), "--json")
    answer = ctx.client.post(f"{ctx.directive_path()}steps/batch/", {"steps": steps})
    added = answer["steps"]
    names = step_names(added)
    human = "\n".join([f"added {len(added)} steps:", *(step_line(step, names) for step in added)])
    return ctx.emit(added, human)


def directive_remove_step(ctx: Context) -> int:
    ctx.client.delete(f"{ctx.directive_path()}steps/{ctx.args.step_id}/")
    return ctx.emit({"id": ctx.args.step_id, "removed": True}, f"removed step {ctx.args.step_id}")


def directive_update(ctx: Context) -> int:
    body = {key: value for key, value in (("pr_url", ctx.args.pr_url), ("status", ctx.args.status)) if value}
    if not body:
        raise UsageError("nothing to update: pass --pr-url URL and/or --status completed")
    directive = ctx.client.patch(ctx.directive_path(), body)
    human = f"directive {directive['id']}: status {directive['status']}, pull request {directive.get('pr_url') or '-'}"
    return ctx.emit(directive, human)


def directive_show(ctx: Context) -> int:
    path = ctx.directive_path(ctx.args.directive_id)
    directive = ctx.client.get(path)
    steps = ctx.client.get_all(f"{path}steps/")
    return ctx.emit({"directive": directive, "steps": steps}, directive_summary(directive, steps))


def contract_files(ctx: Context) -> int:
    files = ctx.client.get_all(f"{ctx.contract_path()}files/")
    lines = [f"{file['id']}  {file['name']}  {file['size']} bytes  {file['created_at']}" for file in files]
    return ctx.emit(files, "\n".join(lines) or "no files")


def contract_file(ctx: Context) -> int:
    file = ctx.client.get(f"{ctx.contract_path()}files/{ctx.args.file_id}/")
    if ctx.json_output:
        return ctx.emit(file, "")
    ctx.out.write(file["content"])
    ctx.out.flush()
    return EXIT_OK


def contract_create_file(ctx: Context) -> int:
    content = ctx.args.content
    if content is None:
        if sys.stdin.isatty():
            raise UsageError("give the file's content on stdin (makima contract create-file NAME < FILE) or --content")
        content = sys.stdin.read()
    file = ctx.client.post(f"{ctx.contract_path()}files/", {"name": ctx.args.name, "content": content})
    return ctx.emit(file, f"created {file['name']} [{file['id']}] ({file['size']} bytes)")


def supervisor_complete(ctx: Context) -> int:
    task = ctx.client.post(f"/tasks/{ctx.setting('task')}/complete/")
    return ctx.emit(task, f"task {task['id']} marked as delivered")


# --------------------------------------------------------------------------- operator-facing commands


def directive_create(ctx: Context) -> int:
    """Create a directive from a spec file, add its hand-authored steps, optionally start it."""
    spec = read_json(read_file(ctx.args.file), ctx.args.file)
    if not isinstance(spec, dict):
        raise UsageError(f"{ctx.args.file} must hold a JSON object with the directive's fields")
    fields = dict(spec)
    steps = steps_from(fields.pop("steps"), f"{ctx.args.file}: steps") if "steps" in fields else []
    directive = ctx.client.post("/directives/", fields)
    path = ctx.directive_path(directive["id"])
    try:
        if steps:
            ctx.client.post(f"{path}steps/batch/", {"steps": steps})
        if ctx.args.start:
            ctx.client.post(f"{path}start/")
    except (ApiError, Unreachable):
        sys.stderr.write(f"makima: directive {directive['id']} was created (draft) but the next request failed:\n")
        raise
    if steps or ctx.args.start:
        directive = ctx.client.get(path)
    return ctx.emit(directive, directive["id"])


class Watch:
    """``makima directive watch``: follow a directive until it ends.

    Each round reads the directive, then its steps and its new events, so that
    every event up to the final transition is printed before the watch ends."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.path = ctx.directive_path(ctx.args.directive_id)
        self.last_event = 0
        self.tty = ctx.out.isatty()
        self.block_height = 0
        self.last_progress = ""

    def run(self) -> int:
        while True:
            directive = self.ctx.client.get(self.path)
            steps = self.ctx.client.get_all(f"{self.path}steps/")
            self.show(directive, steps, self.new_events())
            if directive["status"] in DIRECTIVE_ENDS:
                return self.end(directive)
            self.wait()

    def wait(self) -> None:
        time.sleep(self.ctx.args.interval)

    def new_events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while True:
            page = self.ctx.client.get(f"{self.path}events/", after=self.last_event, limit=EVENTS_PAGE)
            events.extend(page)
            if page:
                self.last_event = page[-1]["id"]
            if len(page) < EVENTS_PAGE:
                return events

    def show(self, directive: dict[str, Any], steps: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
        """Print the new events and, when it changed, the progress."""
        if self.ctx.json_output:
            lines = [json.dumps({"type": "event", "event": event}) for event in events]
            progress = json.dumps(
                {"type": "progress", "status": directive["status"], "step_counts": directive.get("step_counts")}
            )
        else:
            names = step_names(steps)
            lines = [event_line(event, names) for event in events]
            if self.tty:
                self.redraw(lines, progress_lines(directive, steps))
                return
            progress = progress_line(directive)
        if progress != self.last_progress:
            lines.append(progress)
            self.last_progress = progress
        if lines:
            self.ctx.write("\n".join(lines))

    def redraw(self, lines: list[str], block: list[str]) -> None:
        """Erase the previous progress block, print the new events, then the block again."""
        erase = f"\x1b[{self.block_height}F\x1b[J" if self.block_height else ""
        self.block_height = len(block)
        self.ctx.out.write(erase + "".join(f"{line}\n" for line in [*lines, *block]))
        self.ctx.out.flush()

    def end(self, directive: dict[str, Any]) -> int:
        status = directive["status"]
        if self.ctx.json_output:
            self.ctx.write(json.dumps({"type": "end", "status": status, "directive": directive["id"]}))
        else:
            self.ctx.write(f"directive {directive['id']} is {status}")
        return DIRECTIVE_ENDS[status]


def directive_watch(ctx: Context) -> int:
    try:
        return Watch(ctx).run()
    except KeyboardInterrupt:
        return 130


def agents_from(values: list[str] | None) -> list[str]:
    """``--agent a --agent b,c`` → ``["a", "b", "c"]``."""
    return [agent for value in values or [] for agent in split_list(value)]


def daemon_run(ctx: Context) -> int:
    """Hand the parsed options to the worker runtime (imported only when needed)."""
    args = ctx.args
    if not args.server:
        raise UsageError("MAKIMA_SERVER is not set: export it or pass --server URL")
    if not args.token:
        raise UsageError("MAKIMA_DAEMON_TOKEN is not set: export it or pass --token TOKEN")
    args.agents = agents_from(args.agents) or ["claude"]
    if "command" in args.agents and not args.command_line:
        raise UsageError("the command agent needs a program: pass --command-line CMD or set MAKIMA_AGENT_COMMAND")
    from makima.worker import daemon

    return daemon.main(args)


# --------------------------------------------------------------------------- arguments


def add_common_options(parser: argparse.ArgumentParser, *, top: bool, output: bool = True) -> None:
    """The connection settings and ``--json``, accepted before and after the command.

    Under a command they default to ``SUPPRESS`` so that a value given before
    the command is not overwritten."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("connection (default: the environment variables)")
    for name, (env, option) in SETTINGS.items():
        metavar = {"url": "URL", "api_key": "KEY"}.get(name, "ID")
        group.add_argument(option, dest=name, metavar=metavar, default=default(None), help=f"default: ${env}")
    group.add_argument(
        "--retry-for",
        type=retry_seconds,
        metavar="SECONDS",
        default=default(None),
        help="how long to keep retrying while the server is unavailable (restarting, 502/503/504); "
        f"0: fail at once (default: $MAKIMA_RETRY_FOR, else {DEFAULT_RETRY_FOR:g})",
    )
    if output:
        parser.add_argument("--json", action="store_true", default=default(False), help="print JSON")


def command(
    subparsers: Any, name: str, handler: Callable[[Context], int], help: str, *, output: bool = True
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=help)
    add_common_options(parser, top=False, output=output)
    parser.set_defaults(handler=handler, connects=True)
    return parser


def add_directive_commands(subparsers: Any) -> None:
    group = subparsers.add_parser("directive", help="directives and their steps")
    commands = group.add_subparsers(dest="command", metavar="COMMAND", required=True)

    add = command(commands, "add-step", directive_add_step, "add a step to the directive")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--description", required=True)
    add.add_argument("--task-plan", required=True, help="what the agent of this step must do")
    add.add_argument("--depends-on", metavar="ID_OR_NAME,…", help="steps this one waits for (ids or names)")
    add.add_argument("--order-index", type=int)
    add.add_argument("--generation", type=int)
    add.add_argument("--step-type")
    add.add_argument("--agent")

    batch = command(
        commands,
        "batch-add-steps",
        directive_batch_add_steps,
        "add several steps at once (all or nothing); for JSON output use `makima --json directive batch-add-steps`",
        output=False,
    )
    source = batch.add_mutually_exclusive_group(required=True)
    source.add_argument("--json", dest="steps_json", metavar="STEPS", help="a JSON list of steps, or - for stdin")
    source.add_argument("--file", metavar="PATH", help="a file holding the JSON list of steps")

    remove = command(commands, "remove-step", directive_remove_step, "remove a step that has not started")
    remove.add_argument("step_id", metavar="ID")

    update = command(commands, "update", directive_update, "record the pull request or complete the directive")
    update.add_argument("--pr-url", metavar="URL")
    update.add_argument("--status", choices=["completed"])

    show = command(commands, "show", directive_show, "show the directive and its steps")
    show.add_argument("directive_id", metavar="ID", nargs="?", help="default: --directive / $MAKIMA_DIRECTIVE_ID")

    create = command(commands, "create", directive_create, "create a directive from a JSON spec")
    create.add_argument(
        "--file", required=True, metavar="SPEC", help='directive fields plus optional "steps"; - for stdin'
    )
    create.add_argument("--start", action="store_true", help="start it once created")

    watch = command(commands, "watch", directive_watch, "follow a directive's progress until it ends")
    watch.add_argument("directive_id", metavar="ID")
    watch.add_argument("--interval", type=seconds, default=2.0, metavar="S", help="seconds between polls (default 2)")


def add_contract_commands(subparsers: Any) -> None:
    group = subparsers.add_parser("contract", help="files of the task's contract")
    commands = group.add_subparsers(dest="command", metavar="COMMAND", required=True)
    command(commands, "files", contract_files, "list the contract's files")
    file = command(commands, "file", contract_file, "print one file's content")
    file.add_argument("file_id", metavar="FILE_ID")
    create = command(commands, "create-file", contract_create_file, "add a file (content on stdin)")
    create.add_argument("name", metavar="NAME")
    create.add_argument("--content", help="the content, instead of stdin")


def add_supervisor_commands(subparsers: Any) -> None:
    group = subparsers.add_parser("supervisor", help="the task's own state")
    commands = group.add_subparsers(dest="command", metavar="COMMAND", required=True)
    command(commands, "complete", supervisor_complete, "state that the task's work is delivered")


def add_daemon_commands(subparsers: Any) -> None:
    group = subparsers.add_parser("daemon", help="run a worker daemon")
    commands = group.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser("run", help="connect to the server and run tasks", description="run a worker daemon")
    run.set_defaults(handler=daemon_run)
    run.add_argument("--server", default=os.environ.get("MAKIMA_SERVER"), help="server URL (default: $MAKIMA_SERVER)")
    run.add_argument(
        "--token", default=os.environ.get("MAKIMA_DAEMON_TOKEN"), help="daemon token (default: $MAKIMA_DAEMON_TOKEN)"
    )
    run.add_argument("--name", default=socket.gethostname(), help="the daemon's name (default: the host name)")
    run.add_argument(
        "--agent",
        dest="agents",
        action="append",
        metavar="AGENT",
        help="claude, command or scripted (default: claude); repeat it or give a,b",
    )
    run.add_argument("--max-tasks", type=int, default=2, metavar="N", help="tasks run at the same time (default 2)")
    run.add_argument(
        "--workdir",
        type=Path,
        default=Path.home() / ".makima",
        metavar="DIR",
        help="worktrees and spool (default: ~/.makima)",
    )
    run.add_argument("--script", type=Path, metavar="PATH", help="the scripted agent's script")
    run.add_argument("--claude-bin", default="claude", metavar="PATH", help="the Claude Code program (default: claude)")
    run.add_argument(
        "--command-line",
        metavar="CMD",
        default=os.environ.get("MAKIMA_AGENT_COMMAND"),
        help="the program the `command` agent runs, prompt on stdin (default: $MAKIMA_AGENT_COMMAND)",
    )
    run.add_argument("--heartbeat-s", type=seconds, metavar="S", help="default: the server's")
    run.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="makima",
        description="The makima command line: agents manage their directive and contract; operators "
        "create and watch directives and run worker daemons.",
        epilog="Requests are retried for up to --retry-for seconds while the server is unavailable. "
        "Exit status: 0 done, 1 the server refused, 2 usage error, 3 server unreachable.",
    )
    add_common_options(parser, top=True)
    subparsers = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    add_directive_commands(subparsers)
    add_contract_commands(subparsers)
    add_supervisor_commands(subparsers)
    add_daemon_commands(subparsers)
    return parser


# --------------------------------------------------------------------------- errors


def error_lines(error: ApiError) -> list[str]:
    """What to tell the user about a refused request, most useful first."""
    messages = {
        400: f"the server refused the input (400): {error.detail}",
        401: f"the API key was refused (401): check MAKIMA_API_KEY / --api-key ({error.detail})",
        403: f"not allowed (403): {error.detail}",
        404: f"not found (404): {error.detail} — check the id (and MAKIMA_DIRECTIVE_ID / MAKIMA_CONTRACT_ID)",
        409: f"refused in the current state (409): {error.detail}",
    }
    lines = [messages.get(error.status, f"the server answered {error.status}: {error.detail}")]
    for field, value in error.errors.items():
        lines.extend(f"  {field}: {message}" for message in flatten(value))
    return lines


def flatten(value: Any) -> list[str]:
    """Field error messages, however nested."""
    if isinstance(value, Mapping):
        return [f"{key}: {message}" for key, inner in value.items() for message in flatten(inner)]
    if isinstance(value, list):
        return [message for inner in value for message in flatten(inner)]
    return [str(value)]


def fail(lines: list[str], status: int) -> int:
    sys.stderr.write(f"makima: {lines[0]}\n" + "".join(f"{line}\n" for line in lines[1:]))
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = Context(args, sys.stdout, os.environ)
    try:
        if getattr(args, "connects", False):
            ctx.connect()
        return args.handler(ctx)
    except UsageError as exc:
        return fail([str(exc)], EXIT_USAGE)
    except Unreachable as exc:
        return fail([f"cannot reach makima at {exc.url}: {exc.reason} — check MAKIMA_URL / --url"], EXIT_UNREACHABLE)
    except ApiError as exc:
        return fail(error_lines(exc), EXIT_REFUSED)


if __name__ == "__main__":
    raise SystemExit(main())
