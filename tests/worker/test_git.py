"""The worker's git layer against real repositories (no mocks, no database)."""

from __future__ import annotations

import subprocess
import threading
import uuid
from pathlib import Path

import pytest

from makima.worker.base import TaskSpec
from makima.worker.git import GitError, Workspace, github_pr_command, is_github


@pytest.fixture(autouse=True)
def hermetic_git(tmp_path, monkeypatch):
    """No user or system git config: the identity fallback is exercised and results don't vary by machine."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(name, raising=False)


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30)
    return result.stdout.strip()


def commit_all(cwd: Path, message: str) -> str:
    git(cwd, "add", "-A")
    git(cwd, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
    return git(cwd, "rev-parse", "HEAD")


@pytest.fixture
def source(tmp_path) -> Path:
    """A normal (non-bare) repository: a small python package with a passing test, on main."""
    path = tmp_path / "source"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "greeter").mkdir()
    (path / "greeter" / "__init__.py").write_text("def greet(name):\n    return f'hello {name}'\n")
    (path / "tests").mkdir()
    (path / "tests" / "test_greet.py").write_text(
        "from greeter import greet\n\n\ndef test_greet():\n    assert greet('x') == 'hello x'\n"
    )
    (path / "pyproject.toml").write_text("[tool.pytest.ini_options]\npythonpath = ['.']\n")
    (path / "notes.txt").write_text("one\n")
    commit_all(path, "initial")
    return path


@pytest.fixture
def remote(tmp_path, source) -> Path:
    """A bare repository cloned from ``source``: what the daemons fetch from and push to."""
    path = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(source), str(path))
    return path


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace(tmp_path / "daemon-a")


def task(remote: Path | str | None, name: str = "step", **fields) -> TaskSpec:
    task_id = fields.pop("id", None) or str(uuid.uuid4())
    fields.setdefault("branch", f"makima/{name}-{task_id[:8]}")
    return TaskSpec(
        id=task_id,
        name=name,
        kind="execution",
        agent="scripted",
        plan="do it",
        local_path=str(remote) if remote else None,
        **fields,
    )


def remote_sha(remote: Path, branch: str) -> str:
    return git(remote, "rev-parse", f"refs/heads/{branch}")


def push_work(ws: Workspace, spec: TaskSpec, files: dict[str, str]) -> str:
    """Prepare ``spec``, write ``files`` (uncommitted), finish with a push; the pushed sha."""
    wt = ws.prepare(spec)
    for name, text in files.items():
        (wt.path / name).write_text(text)
    return ws.finish(wt, message=f"work of {spec.name}", push=True)


def test_it_prepares_a_worktree_from_the_base_branch(workspace, remote, tmp_path):
    spec = task(remote)
    wt = workspace.prepare(spec)

    assert wt.path.is_relative_to(tmp_path / "daemon-a" / "worktrees")
    assert wt.path.name == f"makima-step-{spec.id[:8]}-{spec.id[:8]}"
    assert wt.branch == spec.branch
    assert wt.base_commit == remote_sha(remote, "main")
    assert wt.conflicts == []
    assert wt.has_remote
    assert git(wt.path, "branch", "--show-current") == spec.branch
    assert (wt.path / "greeter" / "__init__.py").is_file()
    (repo,) = (tmp_path / "daemon-a" / "repos").glob("*.git")
    assert repo.name.startswith("remote-")
    assert git(repo, "config", "--get-all", "remote.origin.fetch") == "+refs/heads/*:refs/remotes/origin/*"
    assert "mirror" not in git(repo, "config", "--list")
    # The remote's branches are remote-tracking refs only; refs/heads holds task branches.
    assert git(repo, "for-each-ref", "--format=%(refname)", "refs/heads/") == f"refs/heads/{spec.branch}"


def test_it_fetches_before_each_task(workspace, remote, source):
    workspace.prepare(task(remote, "first"))
    (source / "notes.txt").write_text("two\n")
    new = commit_all(source, "later")
    git(source, "push", "-q", str(remote), "main")

    assert workspace.prepare(task(remote, "second")).base_commit == new


def test_it_continues_from_a_branch_another_daemon_pushed(workspace, remote, tmp_path):
    first = task(remote, "first")
    pushed = push_work(workspace, first, {"first.txt": "from daemon a\n"})

    other = Workspace(tmp_path / "daemon-b")
    second = task(remote, "second", continue_from={"task_id": first.id, "branch": first.branch})
    wt = other.prepare(second)

    assert wt.base_commit == pushed
    assert (wt.path / "first.txt").read_text() == "from daemon a\n"
    assert git(wt.path, "branch", "--show-current") == second.branch


def test_it_continues_from_a_local_branch_that_was_never_pushed(workspace, remote):
    first = task(remote, "first")
    wt = workspace.prepare(first)
    (wt.path / "local.txt").write_text("kept here\n")
    sha = workspace.finish(wt, message="local only", push=False)
    assert git(remote, "branch", "--list", first.branch) == ""

    second = workspace.prepare(task(remote, "second", continue_from={"task_id": first.id, "branch": first.branch}))
    assert second.base_commit == sha


def test_it_fails_clearly_when_the_predecessor_branch_is_nowhere(workspace, remote):
    spec = task(remote, continue_from={"task_id": "x", "branch": "makima/gone-12345678"})
    with pytest.raises(GitError, match="cannot continue from 'makima/gone-12345678'"):
        workspace.prepare(spec)


def test_it_merges_extra_branches(workspace, remote):
    one, two = task(remote, "one"), task(remote, "two")
    push_work(workspace, one, {"one.txt": "1\n"})
    push_work(workspace, two, {"two.txt": "2\n"})

    wt = workspace.prepare(task(remote, "three", merge_branches=(one.branch, two.branch)))

    assert wt.conflicts == []
    assert (wt.path / "one.txt").is_file() and (wt.path / "two.txt").is_file()
    assert wt.base_commit == git(wt.path, "rev-parse", "HEAD")
    assert git(wt.path, "status", "--porcelain") == ""


def test_a_missing_merge_branch_is_an_error_and_leaves_nothing_behind(workspace, remote):
    spec = task(remote, merge_branches=("makima/never-pushed",))
    with pytest.raises(GitError, match="cannot merge 'makima/never-pushed'"):
        workspace.prepare(spec)
    assert not workspace.worktree_path(spec).exists()
    (repo,) = workspace.repos.glob("*.git")
    assert git(repo, "for-each-ref", "refs/heads/") == ""


def test_a_conflicting_merge_is_aborted_and_recorded(workspace, remote):
    one, two = task(remote, "one"), task(remote, "two")
    one_sha = push_work(workspace, one, {"notes.txt": "one's version\n"})
    push_work(workspace, two, {"notes.txt": "two's version\n"})

    wt = workspace.prepare(
        task(remote, "three", continue_from={"task_id": one.id, "branch": one.branch}, merge_branches=(two.branch,))
    )

    assert wt.conflicts == [two.branch]
    assert wt.base_commit == one_sha
    assert git(wt.path, "status", "--porcelain") == ""
    assert not (Path(git(wt.path, "rev-parse", "--git-dir")) / "MERGE_HEAD").exists()
    assert (wt.path / "notes.txt").read_text() == "one's version\n"


def test_finish_commits_uncommitted_work_and_pushes_it(workspace, remote):
    spec = task(remote)
    wt = workspace.prepare(spec)
    (wt.path / "new.txt").write_text("new\n")
    (wt.path / "notes.txt").unlink()

    sha = workspace.finish(wt, message="makima: the step", push=True)

    assert sha != wt.base_commit
    assert remote_sha(remote, spec.branch) == sha
    assert git(remote, "log", "-1", "--format=%an <%ae>|%s", sha) == "makima <makima@localhost>|makima: the step"
    assert git(remote, "ls-tree", "--name-only", sha).split() == ["greeter", "new.txt", "pyproject.toml", "tests"]


def test_finish_without_changes_pushes_the_branch_as_it_is(workspace, remote):
    spec = task(remote)
    wt = workspace.prepare(spec)
    assert workspace.finish(wt, message="nothing", push=True) == wt.base_commit
    assert remote_sha(remote, spec.branch) == wt.base_commit


def test_finish_uses_the_identity_the_repository_configures(workspace, remote, tmp_path):
    (tmp_path / "gitconfig").write_text("[user]\n\tname = Alice\n\temail = alice@example.com\n")
    wt = workspace.prepare(task(remote))
    (wt.path / "x.txt").write_text("x\n")
    sha = workspace.finish(wt, message="mine", push=False)
    assert git(wt.path, "log", "-1", "--format=%an <%ae>", sha) == "Alice <alice@example.com>"


def test_a_retry_starts_from_the_pushed_branch_and_may_rewrite_it(workspace, remote, tmp_path):
    spec = task(remote)
    first = push_work(workspace, spec, {"attempt.txt": "1\n"})
    workspace.remove(workspace.prepare(spec))

    # Same task again, on another daemon: it starts where the first attempt left off.
    other = Workspace(tmp_path / "daemon-b")
    wt = other.prepare(spec)
    assert wt.base_commit == first
    assert (wt.path / "attempt.txt").read_text() == "1\n"

    # The retry throws the first attempt away; pushing its own branch still succeeds.
    git(wt.path, "reset", "-q", "--hard", "HEAD~1")
    (wt.path / "attempt.txt").write_text("2\n")
    second = other.finish(wt, message="again", push=True)
    assert remote_sha(remote, spec.branch) == second
    assert first not in git(remote, "rev-list", spec.branch).split()


def test_preparing_the_same_task_twice_replaces_the_stale_worktree(workspace, remote):
    spec = task(remote)
    wt = workspace.prepare(spec)
    (wt.path / "junk.txt").write_text("left by a crashed attempt\n")
    again = workspace.prepare(spec)
    assert again.path == wt.path
    assert not (again.path / "junk.txt").exists()


def test_remove_deletes_the_worktree_and_the_local_branch_only(workspace, remote):
    spec = task(remote)
    pushed = push_work(workspace, spec, {"a.txt": "a\n"})
    wt = workspace.prepare(spec)

    workspace.remove(wt)

    assert not wt.path.exists()
    (repo,) = workspace.repos.glob("*.git")
    assert git(repo, "branch", "--list", spec.branch) == ""
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1
    assert remote_sha(remote, spec.branch) == pushed
    workspace.remove(wt)  # twice is harmless


def test_prune_removes_the_worktrees_of_tasks_not_kept(workspace, remote):
    kept, dropped = task(remote, "kept"), task(remote, "dropped")
    kept_wt, dropped_wt = workspace.prepare(kept), workspace.prepare(dropped)
    scratch = workspace.prepare(task(None, "scratch"))
    (workspace.worktrees / "leftover-deadbeef").mkdir()

    removed = workspace.prune({kept.id})

    assert kept_wt.path.is_dir() and not dropped_wt.path.exists() and not scratch.path.exists()
    assert set(removed) == {dropped_wt.path, scratch.path, workspace.worktrees / "leftover-deadbeef"}
    (repo,) = workspace.repos.glob("*.git")
    assert git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/") == kept.branch
    assert workspace.prune({kept.id}) == []


@pytest.mark.parametrize(
    ("name", "branch"),
    [("../../etc", ""), ("a/b", "a/b"), ("", ""), ("..", ""), ("/etc/passwd", "")],
)
def test_evil_names_stay_inside_the_workdir(workspace, remote, tmp_path, name, branch):
    before = set(tmp_path.iterdir())
    spec = task(remote, name, branch=branch, id="../../" + uuid.uuid4().hex)
    wt = workspace.prepare(spec)
    assert wt.path.resolve().is_relative_to(workspace.worktrees)
    assert wt.path.parent == workspace.worktrees
    assert git(wt.path, "branch", "--show-current") == wt.branch
    assert set(tmp_path.iterdir()) - before == {tmp_path / "daemon-a"}


@pytest.mark.parametrize("branch", ["../../etc", "-f", "a..b", "HEAD", "x y"])
def test_invalid_branch_names_are_refused(workspace, remote, branch):
    with pytest.raises(GitError, match="invalid task branch name"):
        workspace.prepare(task(remote, branch=branch))
    assert not workspace.worktrees.exists() or not any(workspace.worktrees.iterdir())


def test_an_empty_remote_is_a_clear_error(workspace, tmp_path):
    empty = tmp_path / "empty.git"
    git(tmp_path, "init", "-q", "--bare", str(empty))
    with pytest.raises(GitError, match="has no branches"):
        workspace.prepare(task(empty))


def test_a_missing_base_branch_is_a_clear_error(workspace, remote):
    with pytest.raises(GitError, match=r"base branch 'develop' is not on the remote \(it has: main\)"):
        workspace.prepare(task(remote, base_branch="develop"))


def test_an_unreachable_remote_names_the_failing_command(workspace, tmp_path):
    with pytest.raises(GitError, match="git fetch --prune --quiet origin"):
        workspace.prepare(task(tmp_path / "nowhere.git"))
    # A failed first fetch leaves a usable clone behind for the next attempt.
    assert [p.name.endswith(".git") for p in workspace.repos.iterdir() if p.is_dir()] == [True]


def test_a_normal_repository_path_works_as_the_remote(workspace, source):
    spec = task(source)
    wt = workspace.prepare(spec)
    assert wt.base_commit == git(source, "rev-parse", "main")
    (wt.path / "b.txt").write_text("b\n")
    sha = workspace.finish(wt, message="to a working copy", push=True)
    assert git(source, "rev-parse", f"refs/heads/{spec.branch}") == sha
    assert git(source, "branch", "--show-current") == "main"


def test_a_task_without_a_repository_gets_a_scratch_one(workspace):
    wt = workspace.prepare(task(None, "scratch"))
    assert not wt.has_remote
    (wt.path / "out.txt").write_text("x\n")
    sha = workspace.finish(wt, message="scratch", push=True)
    assert sha == git(wt.path, "rev-parse", "HEAD") != wt.base_commit
    workspace.remove(wt)
    assert not wt.path.exists()


def test_tasks_of_one_repository_can_be_prepared_concurrently(tmp_path, remote):
    specs = [task(remote, f"t{i}") for i in range(4)]
    spaces = [Workspace(tmp_path / "daemon-a"), Workspace(tmp_path / "daemon-a")]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            push_work(spaces[i % 2], specs[i], {f"t{i}.txt": f"{i}\n"})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(specs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert all(git(remote, "branch", "--list", spec.branch) for spec in specs)


def test_the_pull_request_command_is_one_argv():
    argv = github_pr_command(base="main", head="makima/x", title="-Fix- it", body="line 1\nline 2")
    assert argv == [
        "gh",
        "pr",
        "create",
        "--base=main",
        "--head=makima/x",
        "--title=-Fix- it",
        "--body=line 1\nline 2",
    ]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://github.com/o/r.git", True),
        ("https://x-access-token:abc@github.com/o/r", True),
        ("git@github.com:o/r.git", True),
        ("ssh://git@github.com/o/r.git", True),
        ("https://GitHub.com/o/r", True),
        ("https://gitlab.com/o/r.git", False),
        ("https://github.com.evil.example/o/r", False),
        ("/srv/git/github.com/r.git", False),
        ("", False),
    ],
)
def test_it_tells_github_remotes_apart(url, expected):
    assert is_github(url) is expected


def test_git_errors_do_not_leak_credentials(workspace):
    spec = task(None, repository_url="https://user:s3cret@127.0.0.1:9/o/r.git")
    spec = TaskSpec(**{**spec.__dict__, "local_path": None})
    with pytest.raises(GitError) as caught:
        workspace.prepare(spec)
    assert "s3cret" not in str(caught.value)


def test_a_new_access_token_does_not_mean_a_new_clone(workspace):
    assert workspace.repo_path("https://x:token1@github.com/o/r.git") == workspace.repo_path(
        "https://x:token2@github.com/o/r.git"
    )
    assert workspace.repo_path("https://github.com/o/r.git").name.startswith("r-")
    assert workspace.repo_path("https://github.com/o/r.git") != workspace.repo_path("https://github.com/p/r.git")
