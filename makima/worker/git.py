"""The worker's git layer: one bare clone per repository, one worktree per task.

Layout under the daemon's workdir::

    repos/<slug>-<sha1(remote)[:8]>.git        bare clone, remote "origin"
    repos/<slug>-<sha1(remote)[:8]>.git.lock   lock file (see ``_repo_lock``)
    worktrees/<slug(branch or name)>-<id[:8]>  a task's checkout

The clone keeps the remote's branches as remote-tracking refs
(``refs/remotes/origin/*``), never as its own ``refs/heads``: those hold only
the tasks' local branches. A ``--mirror`` clone would map the remote's heads
onto its own, and a push from it would delete remote branches the clone
lacks. Every call blocks (subprocess ``git``); the daemon runs them through
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from makima.worker.base import TaskSpec, Worktree, slug

#: Network operations (fetch, push) may take this long before they count as failed.
NETWORK_TIMEOUT_S = 600.0
#: Local operations (checkout of a large tree, merges).
LOCAL_TIMEOUT_S = 300.0
#: How much of a failing command's stderr goes into a ``GitError``.
STDERR_TAIL = 2000

_IDENTITY = {"user.name": "makima", "user.email": "makima@localhost"}
#: Variables that would point git at another repository than the one we mean.
_GIT_LOCATION_VARS = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR", "GIT_OBJECT_DIRECTORY")
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


class GitError(Exception):
    """A git operation failed; the message names the command and ends with its stderr."""

    def __init__(self, message: str, *, command: list[str] | None = None, stderr: str = "") -> None:
        self.command = command
        self.stderr = stderr
        text = f"{_redact(' '.join(command))} failed ({message})" if command else message
        tail = stderr.strip()[-STDERR_TAIL:]
        if tail:
            text += f": {_redact(tail)}"
        super().__init__(text)


def _redact(text: str) -> str:
    """Hide ``user:token@`` in URLs: error messages end up in task reports."""
    return _CREDENTIALS.sub(r"\g<scheme>***@", text)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_VARS}
    # A remote asking for a password must fail, not hang the daemon on a prompt.
    env["GIT_TERMINAL_PROMPT"] = "0"
    return env


def run_git(
    *args: str | Path, cwd: Path, check: bool = True, timeout: float = LOCAL_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    """Run ``git args…`` in ``cwd``; raise ``GitError`` on failure when ``check``."""
    command = ["git", *map(str, args)]
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise GitError(f"timed out after {timeout:g} s", command=command) from exc
    except OSError as exc:
        raise GitError(f"could not run git in {cwd}: {exc}", command=command) from exc
    if check and result.returncode != 0:
        raise GitError(f"exit status {result.returncode}", command=command, stderr=result.stderr)
    return result


def is_github(url: str) -> bool:
    """Whether a repository URL (https, ssh, or scp-like ``git@host:o/r``) is on github.com."""
    url = (url or "").strip()
    if "://" in url:
        try:
            host = urlsplit(url).hostname or ""
        except ValueError:
            return False
    else:
        match = re.match(r"^(?:[^@/:\s]+@)?(?P<host>[^/:\s]+):", url)
        host = match["host"] if match else ""
    return host.lower() in {"github.com", "www.github.com"}


def github_pr_command(*, base: str, head: str, title: str, body: str) -> list[str]:
    """The argv that opens a pull request with the GitHub CLI.

    Values go in ``--flag=value`` form so that one starting with a dash (a
    title like "-fix-") cannot be read as another option."""
    return ["gh", "pr", "create", f"--base={base}", f"--head={head}", f"--title={title}", f"--body={body}"]


# --- locking --------------------------------------------------------------------

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def _repo_lock(repo: Path) -> Iterator[None]:
    """Exclusive use of one bare clone's refs and config.

    Two tasks of one daemon (threads) and two daemons sharing a workdir
    (processes) must not fetch, push or add worktrees in one clone at once:
    git fails with "cannot lock ref" instead of waiting. The threading lock
    orders our own threads; the ``flock`` on a file next to the clone orders
    processes (and is released by the kernel if a daemon dies holding it)."""
    key = str(repo)
    with _thread_locks_guard:
        lock = _thread_locks.setdefault(key, threading.Lock())
    repo.parent.mkdir(parents=True, exist_ok=True)
    with lock, open(repo.parent / f"{repo.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the workspace ----------------------------------------------------------------


class Workspace:
    """Bare clones and task worktrees under one daemon workdir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).expanduser().resolve()
        self.repos = self.workdir / "repos"
        self.worktrees = self.workdir / "worktrees"

    # paths

    def _inside(self, path: Path, parent: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(parent) or resolved == parent:
            raise GitError(f"refusing a path outside {parent}: {resolved}")
        return resolved

    def repo_path(self, remote: str) -> Path:
        """Where the bare clone of ``remote`` lives."""
        name = re.split(r"[/:\\]", remote.rstrip("/\\"))[-1].removesuffix(".git")
        # Credentials are left out of the key: a fresh access token must not mean a fresh clone.
        digest = hashlib.sha1(_CREDENTIALS.sub(r"\g<scheme>", remote).encode()).hexdigest()[:8]
        return self._inside(self.repos / f"{slug(name, limit=40)}-{digest}.git", self.repos)

    def worktree_path(self, task: TaskSpec) -> Path:
        """Where ``task``'s worktree lives (always inside ``workdir/worktrees``)."""
        name = f"{slug(task.branch or task.name)}-{slug(task.id[:8])}"
        return self._inside(self.worktrees / name, self.worktrees)

    @staticmethod
    def branch_name(task: TaskSpec) -> str:
        """The task's branch: ``task.branch``, else the spec's ``makima/<slug(name)>-<8hex>``."""
        return task.branch or f"makima/{slug(task.name, limit=60)}-{slug(task.id[:8])}"

    # preparation

    def prepare(self, task: TaskSpec) -> Worktree:
        """Fetch the repository and check out a worktree for ``task`` (see module docs)."""
        branch = self.branch_name(task)
        _check_branch(branch, what="task branch")
        path = self.worktree_path(task)
        self.worktrees.mkdir(parents=True, exist_ok=True)
        if not task.remote:
            return self._prepare_scratch(path, branch)

        remote = _normalise_remote(task.remote)
        repo = self.repo_path(remote)
        with _repo_lock(repo):
            self._ensure_clone(repo, remote)
            run_git("remote", "set-url", "origin", remote, cwd=repo)
            run_git("fetch", "--prune", "--quiet", "origin", cwd=repo, timeout=NETWORK_TIMEOUT_S)
            run_git("-c", "gc.auto=6700", "gc", "--auto", "--quiet", cwd=repo, check=False)
            if not run_git("for-each-ref", "--count=1", "refs/remotes/origin/", cwd=repo).stdout.strip():
                raise GitError(f"the remote {_redact(remote)} has no branches (an empty repository?)")
            start = self._start_point(repo, task, branch)
            self._discard_worktree(repo, path)
            run_git("worktree", "add", "--quiet", "--no-track", "-B", branch, path, start, cwd=repo)
            # Plain `git push`/`git pull` in the worktree (an agent may run them) target the task's own branch.
            run_git("config", f"branch.{branch}.remote", "origin", cwd=repo)
            run_git("config", f"branch.{branch}.merge", f"refs/heads/{branch}", cwd=repo)

        worktree = Worktree(path=path, branch=branch, base_commit="")
        try:
            worktree.conflicts = [name for name in task.merge_branches if not self._merge(repo, path, name)]
            worktree.base_commit = run_git("rev-parse", "HEAD", cwd=path).stdout.strip()
        except BaseException:
            self.remove(worktree)  # a task that cannot start leaves nothing behind
            raise
        return worktree

    def _ensure_clone(self, repo: Path, remote: str) -> None:
        if (repo / "HEAD").is_file() and (repo / "config").is_file():
            return
        # `git clone --bare` would copy the remote's branches into refs/heads, where they would go
        # stale and collide with the tasks' branches; init + a remote-tracking refspec is the same
        # clone without that. Built aside and renamed so a failed clone leaves nothing half-made.
        scratch = repo.with_name(f"{repo.name}.new")
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            run_git("init", "--quiet", "--bare", scratch, cwd=self.repos)
            run_git("remote", "add", "origin", remote, cwd=scratch)
            run_git("config", "remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*", cwd=scratch)
            # Concurrent tasks share this clone: no automatic gc in the middle of one's merge or
            # commit; `prepare` runs it under the lock instead.
            run_git("config", "gc.auto", "0", cwd=scratch)
            scratch.rename(repo)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def _start_point(self, repo: Path, task: TaskSpec, branch: str) -> str:
        # A retry of the task: its branch is on the remote already, carry on from there.
        if _has_ref(repo, f"refs/remotes/origin/{branch}"):
            return f"refs/remotes/origin/{branch}"
        if task.continue_from:
            previous = str(task.continue_from.get("branch") or "")
            _check_branch(previous, what="continue_from branch")
            for ref in (f"refs/remotes/origin/{previous}", f"refs/heads/{previous}"):
                if _has_ref(repo, ref):
                    return ref
            raise GitError(
                f"cannot continue from {previous!r}: no such branch on the remote or in the local clone"
                f" (task {task.continue_from.get('task_id', '?')})"
            )
        _check_branch(task.base_branch, what="base branch")
        ref = f"refs/remotes/origin/{task.base_branch}"
        if not _has_ref(repo, ref):
            raise GitError(
                f"the base branch {task.base_branch!r} is not on the remote"
                f" (it has: {', '.join(_remote_branches(repo, limit=20)) or 'nothing'})"
            )
        return ref

    def _merge(self, repo: Path, path: Path, name: str) -> bool:
        """Merge one of ``merge_branches``; False (and the merge undone) when it conflicts."""
        _check_branch(name, what="merge branch")
        ref = next((r for r in (f"refs/remotes/origin/{name}", f"refs/heads/{name}") if _has_ref(repo, r)), None)
        if ref is None:
            raise GitError(f"cannot merge {name!r}: no such branch on the remote or in the local clone")
        merge = ["merge", "--no-edit", "--quiet", "-m", f"Merge branch '{name}'", ref]
        merged = run_git(*_identity(path), *merge, cwd=path, check=False)
        if merged.returncode == 0:
            return True
        run_git("merge", "--abort", cwd=path, check=False)
        # The worktree is brand new: nothing of value to lose, and the agent must start clean.
        run_git("reset", "--hard", "--quiet", "HEAD", cwd=path)
        run_git("clean", "-fdq", cwd=path)
        return False

    def _prepare_scratch(self, path: Path, branch: str) -> Worktree:
        """A task without a repository gets a fresh local one, with nothing to push to."""
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        run_git("init", "--quiet", f"--initial-branch={branch}", cwd=path)
        run_git(*_identity(path), "commit", "--quiet", "--allow-empty", "-m", "makima: start", cwd=path)
        head = run_git("rev-parse", "HEAD", cwd=path).stdout.strip()
        return Worktree(path=path, branch=branch, base_commit=head, has_remote=False)

    # completion

    def finish(self, worktree: Worktree, *, message: str, push: bool) -> str:
        """Commit whatever the agent left uncommitted and, if ``push``, push the branch; the HEAD sha."""
        path = self._inside(worktree.path, self.worktrees)
        run_git("add", "-A", cwd=path)
        if run_git("diff", "--cached", "--quiet", cwd=path, check=False).returncode != 0:
            # --no-verify: this is the daemon's bookkeeping commit; hooks the agent installed
            # must not turn finished work into a failed task (the verifiers judge the work).
            run_git(
                *_identity(path), "commit", "--quiet", "--no-verify", "-m", message.strip() or "makima: task", cwd=path
            )
        head = run_git("rev-parse", "HEAD", cwd=path).stdout.strip()
        if push and worktree.has_remote:
            repo = _common_dir(path)
            if repo is None:
                raise GitError(f"{path} is not a git worktree")
            with _repo_lock(repo):
                # --force, only ever onto the task's own branch: a retry or a reworked attempt may
                # rewrite what an earlier attempt of this same task pushed (an agent rebased, or a
                # daemon thought lost pushed late). Nobody else writes this branch, and the latest
                # attempt is the one the server is waiting for.
                refspec = f"HEAD:refs/heads/{worktree.branch}"
                run_git("push", "--quiet", "--force", "origin", refspec, cwd=path, timeout=NETWORK_TIMEOUT_S)
        return head

    # clean-up

    def remove(self, worktree: Worktree) -> None:
        """Delete a task's worktree and its local branch (the pushed branch stays on the remote)."""
        path = self._inside(worktree.path, self.worktrees)
        repo = self._owner(path)
        if repo is None:
            shutil.rmtree(path, ignore_errors=True)
            return
        with _repo_lock(repo):
            run_git("worktree", "remove", "--force", "--force", path, cwd=repo, check=False)
            shutil.rmtree(path, ignore_errors=True)
            run_git("worktree", "prune", cwd=repo, check=False)
            if worktree.branch:
                run_git("branch", "--quiet", "-D", worktree.branch, cwd=repo, check=False)
                run_git("config", "--remove-section", f"branch.{worktree.branch}", cwd=repo, check=False)

    def prune(self, keep_task_ids: Iterable[str]) -> list[Path]:
        """Remove the worktrees of tasks not in ``keep_task_ids`` (daemon start-up); the removed paths."""
        keep = {f"-{slug(task_id[:8])}" for task_id in keep_task_ids}
        removed: list[Path] = []
        registered: set[Path] = set()
        for repo in sorted(self.repos.glob("*.git")) if self.repos.is_dir() else ():
            with _repo_lock(repo):
                run_git("worktree", "prune", cwd=repo, check=False)
                for path, branch in _worktrees(repo):
                    if not path.is_relative_to(self.worktrees) or path == self.worktrees:
                        continue
                    registered.add(path)
                    if path.name.endswith(tuple(keep)):
                        continue
                    run_git("worktree", "remove", "--force", "--force", path, cwd=repo, check=False)
                    shutil.rmtree(path, ignore_errors=True)
                    if branch:
                        run_git("branch", "--quiet", "-D", branch, cwd=repo, check=False)
                        run_git("config", "--remove-section", f"branch.{branch}", cwd=repo, check=False)
                    removed.append(path)
                run_git("worktree", "prune", cwd=repo, check=False)
        # Leftovers no clone knows of: scratch repositories, half-made directories.
        for path in sorted(self.worktrees.iterdir()) if self.worktrees.is_dir() else ():
            if path.resolve() in registered or path.name.endswith(tuple(keep)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        return removed

    def _owner(self, path: Path) -> Path | None:
        """The bare clone a worktree belongs to, even when its directory is gone already."""
        if (path / ".git").is_file():
            repo = _common_dir(path)
            if repo is not None and repo.is_relative_to(self.repos):
                return repo
        for repo in self.repos.glob("*.git") if self.repos.is_dir() else ():
            if any(p == path for p, _ in _worktrees(repo)):
                return repo
        return None

    def _discard_worktree(self, repo: Path, path: Path) -> None:
        """Clear whatever a crashed earlier attempt of this task left at ``path``."""
        run_git("worktree", "prune", cwd=repo, check=False)
        if any(p == path for p, _ in _worktrees(repo)):
            run_git("worktree", "remove", "--force", "--force", path, cwd=repo, check=False)
        if path.exists() or path.is_symlink():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        run_git("worktree", "prune", cwd=repo, check=False)


# --- helpers ----------------------------------------------------------------------


def _check_branch(name: str, *, what: str) -> None:
    """Refuse names git would refuse, and those that would read as an option."""
    if not name or name.startswith("-") or name == "HEAD":
        raise GitError(f"invalid {what} name: {name!r}")
    result = subprocess.run(
        ["git", "check-ref-format", f"refs/heads/{name}"], capture_output=True, env=_env(), check=False
    )
    if result.returncode != 0:
        raise GitError(f"invalid {what} name: {name!r}")


def _normalise_remote(remote: str) -> str:
    """A local path becomes absolute (git runs in the clone, not in the daemon's directory)."""
    if "://" not in remote:
        candidate = Path(remote).expanduser()
        if candidate.exists():
            return str(candidate.resolve())
    return remote


def _has_ref(repo: Path, ref: str) -> bool:
    return run_git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", cwd=repo, check=False).returncode == 0


def _remote_branches(repo: Path, *, limit: int) -> list[str]:
    out = run_git("for-each-ref", f"--count={limit}", "--format=%(refname)", "refs/remotes/origin/", cwd=repo).stdout
    return [line.removeprefix("refs/remotes/origin/") for line in out.splitlines() if line]


def _identity(cwd: Path) -> list[str]:
    """``-c user.name=… -c user.email=…`` for whatever of the two the repository's config lacks."""
    args: list[str] = []
    for key, value in _IDENTITY.items():
        if not run_git("config", "--get", key, cwd=cwd, check=False).stdout.strip():
            args += ["-c", f"{key}={value}"]
    return args


def _common_dir(path: Path) -> Path | None:
    """The repository (for a worktree: the bare clone) that ``path`` is a checkout of."""
    result = run_git("rev-parse", "--path-format=absolute", "--git-common-dir", cwd=path, check=False)
    if result.returncode != 0:
        return None
    return Path(result.stdout.strip()).resolve()


def _worktrees(repo: Path) -> list[tuple[Path, str]]:
    """``(path, branch)`` of each worktree a clone has registered (the bare clone itself excluded)."""
    result = run_git("worktree", "list", "--porcelain", cwd=repo, check=False)
    entries: list[tuple[Path, str]] = []
    path: Path | None = None
    branch = ""
    bare = False
    for line in [*result.stdout.splitlines(), ""]:
        if line.startswith("worktree "):
            path, branch, bare = Path(line.removeprefix("worktree ")), "", False
        elif line.startswith("branch "):
            branch = line.removeprefix("branch ").removeprefix("refs/heads/")
        elif line == "bare":
            bare = True
        elif not line and path is not None:
            if not bare:
                entries.append((path.resolve(), branch))
            path = None
    return entries
