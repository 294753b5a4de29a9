"""Verifiers: the test commands the daemon runs in a worktree after the agent.

A verifier is a shell command; it passes when it exits 0. Each runs in its
own process group (a new session) so that a timeout kills everything it
started, and whatever it leaves running after it exits is killed too: a test
suite's stray server must not outlive the task or hold the output pipe open.
Results have exactly the shape of ``verifier_results`` in ``task_finished``
(protocol.md).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

#: How much of a verifier's output goes into its result.
TAIL_CHARS = 4000
#: Bytes kept while reading (the tail of the tail survives any decoding).
_KEEP_BYTES = 64 * 1024
#: After a verifier exits, how long to wait for its output to drain.
_DRAIN_S = 5.0
#: Python test files looked for when no config file mentions pytest.
_SCAN_LIMIT = 5000
_SKIP_DIRS = {".git", ".venv", "venv", "node_modules", "__pycache__", ".tox", "build", "dist"}


def detect(path: Path) -> list[str]:
    """The test commands a checkout's files suggest, in a fixed order.

    - pytest: ``pytest.ini``; a ``pyproject.toml``, ``setup.cfg`` or
      ``tox.ini`` that mentions pytest; a ``conftest.py``; or ``test_*.py``/
      ``*_test.py`` files at the top or under ``tests/``/``test/``. A bare
      ``pyproject.toml`` does not count: pytest finding no tests exits 5 and
      would fail the step of a project that has none. The command is
      ``python -m pytest -q``: the ``python`` on the verifier's ``PATH``
      (the task's environment, e.g. an activated virtualenv), whose pytest
      imports the checkout's package from the working directory.
    - ``npm test`` when ``package.json`` has a ``test`` script (not npm's
      "no test specified" placeholder);
    - ``cargo test`` with ``Cargo.toml``; ``go test ./...`` with ``go.mod``;
    - ``make test`` when a Makefile has a ``test`` target.
    """
    path = Path(path)
    commands: list[str] = []
    if _has_pytest(path):
        commands.append("python -m pytest -q")
    if _has_npm_test(path / "package.json"):
        commands.append("npm test")
    if (path / "Cargo.toml").is_file():
        commands.append("cargo test")
    if (path / "go.mod").is_file():
        commands.append("go test ./...")
    if any(_has_make_test(path / name) for name in ("GNUmakefile", "makefile", "Makefile")):
        commands.append("make test")
    return commands


def run_verifiers(
    commands: Sequence[str] | Literal["auto"] | str | None,
    cwd: Path,
    *,
    timeout_s: float = 600,
    env: Mapping[str, str] | None = None,
    cancel: threading.Event | None = None,
) -> list[dict[str, Any]]:
    """Run each command in ``cwd`` (``"auto"``: the detected ones) and return their results.

    ``env`` is laid over the daemon's environment. The time limit is per
    command. Nothing a verifier does (no output, endless or binary output,
    a missing directory) raises: it becomes a failed result. Setting
    ``cancel`` (from another thread: this call blocks, and cancelling the
    ``asyncio.to_thread`` that runs it does not stop it) kills the running
    command and skips the rest."""
    results = []
    for command in _resolve(commands, Path(cwd)):
        if cancel is not None and cancel.is_set():
            break
        results.append(run_verifier(command, cwd, timeout_s=timeout_s, env=env, cancel=cancel))
    return results


def run_verifier(
    command: str,
    cwd: Path,
    *,
    timeout_s: float = 600,
    env: Mapping[str, str] | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Run one verifier command; its result dict."""
    full_env = {**os.environ, **(env or {})}
    # Test runners that would otherwise go interactive (watch modes, prompts) don't under CI.
    full_env.setdefault("CI", "true")
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            command,
            shell=True,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        return _result(command, passed=False, exit_code=None, started=started, output=f"could not start: {exc}")

    tail = _Tail()
    assert proc.stdout is not None
    reader = threading.Thread(target=tail.pump, args=(proc.stdout.fileno(),), daemon=True)
    reader.start()
    exited = _wait_unreaped(proc.pid, started + timeout_s, cancel)
    # The group is killed while its leader is still unreaped, so its id cannot have been reused:
    # on a timeout this is the kill, after a normal exit it sweeps up what the command left behind.
    _kill_group(proc.pid)
    exit_code = proc.wait()
    reader.join(_DRAIN_S)
    if not reader.is_alive():
        proc.stdout.close()
    output = tail.text()
    if not exited:
        if cancel is not None and cancel.is_set():
            note = "[killed: the task was interrupted]"
        else:
            note = f"[killed: exceeded the time limit of {timeout_s:g} s]"
        return _result(command, passed=False, exit_code=None, started=started, output=f"{output}\n{note}".lstrip())
    return _result(command, passed=exit_code == 0, exit_code=exit_code, started=started, output=output)


def verifier_name(command: str) -> str:
    """A short name: the command's first word (``pytest`` for ``python -m pytest``)."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    while words and "=" in words[0] and not words[0].startswith(("=", "-", "/", ".")):
        words.pop(0)  # leading VAR=value assignments
    if not words:
        return "verifier"
    first = os.path.basename(words[0]) or words[0]
    if first.startswith("python") and len(words) >= 3 and words[1] == "-m":
        return words[2]
    return first


# --- helpers ----------------------------------------------------------------------


def _resolve(commands: Sequence[str] | str | None, cwd: Path) -> list[str]:
    if not commands:
        return []
    if isinstance(commands, str):
        commands = [commands]
    resolved: list[str] = []
    for command in commands:
        command = str(command).strip()
        if command == "auto":
            resolved += [c for c in detect(cwd) if c not in resolved]
        elif command:
            resolved.append(command)
    return resolved


def _result(command: str, *, passed: bool, exit_code: int | None, started: float, output: str) -> dict[str, Any]:
    return {
        "name": verifier_name(command),
        "command": command,
        "passed": passed,
        "exit_code": exit_code,
        "duration_s": round(time.monotonic() - started, 3),
        "output_tail": output,
    }


class _Tail:
    """Keeps the last bytes of a stream; memory stays bounded however much is written."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.total = 0

    def pump(self, fd: int) -> None:
        try:
            while chunk := os.read(fd, 65536):
                self.total += len(chunk)
                self.buffer += chunk
                if len(self.buffer) > 2 * _KEEP_BYTES:
                    del self.buffer[:-_KEEP_BYTES]
        except OSError:
            pass

    def text(self) -> str:
        # NUL is valid UTF-8 but PostgreSQL text/jsonb cannot store it: the report would be refused.
        text = bytes(self.buffer).decode("utf-8", errors="replace").replace("\x00", "\ufffd")
        if len(text) > TAIL_CHARS or self.total > len(self.buffer):
            text = "…" + text[-(TAIL_CHARS - 1) :]
        return text


def _wait_unreaped(pid: int, deadline: float, cancel: threading.Event | None) -> bool:
    """Wait until ``pid`` exits (True), or the deadline passes or ``cancel`` is set (False); it stays unreaped."""
    delay = 0.002
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0 or (cancel is not None and cancel.is_set()):
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_text(path: Path, limit: int = 1 << 20) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(limit)
    except OSError:
        return ""


def _has_pytest(path: Path) -> bool:
    if (path / "pytest.ini").is_file() or (path / "conftest.py").is_file():
        return True
    for name in ("pyproject.toml", "setup.cfg", "tox.ini"):
        if (path / name).is_file() and "pytest" in _read_text(path / name):
            return True
    if any(_is_test_file(child.name) for child in _children(path)):
        return True
    return any(_has_test_files(path / name) for name in ("tests", "test"))


def _is_test_file(name: str) -> bool:
    return name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))


def _children(path: Path) -> list[Path]:
    try:
        return [child for child in path.iterdir() if child.is_file()]
    except OSError:
        return []


def _has_test_files(root: Path) -> bool:
    if not root.is_dir():
        return False
    seen = 0
    for _, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        if any(_is_test_file(name) for name in files):
            return True
        seen += len(files) + len(dirs)
        if seen > _SCAN_LIMIT:
            return False
    return False


def _has_npm_test(package_json: Path) -> bool:
    if not package_json.is_file():
        return False
    try:
        data = json.loads(_read_text(package_json, limit=4 << 20))
    except ValueError:
        return False
    scripts = data.get("scripts") if isinstance(data, dict) else None
    test = scripts.get("test") if isinstance(scripts, dict) else None
    return isinstance(test, str) and bool(test.strip()) and "no test specified" not in test


def _has_make_test(makefile: Path) -> bool:
    if not makefile.is_file():
        return False
    for line in _read_text(makefile).splitlines():
        if not line or line[0] in " \t#" or ":" not in line:
            continue
        targets, _, rest = line.partition(":")
        if rest.startswith("=") or "=" in targets:  # `test := …`, `X = a:b`: variables, not rules
            continue
        if "test" in targets.split():
            return True
    return False
