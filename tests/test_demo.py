"""``demo_setup``: the demo user, repositories and directives of the local stack."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from django.core.management import call_command

from directives import demo
from directives.models import Directive


def run_setup(tmp_path, *args):
    call_command("demo_setup", "--password", "pw", "--repository", str(tmp_path / "greeter.git"), *args)


def git_show(repository, path):
    return subprocess.run(
        ["git", "show", f"main:{path}"], cwd=repository, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.django_db
def test_demo_setup_builds_a_bare_repository_with_the_package_and_the_agent_script(tmp_path):
    run_setup(tmp_path)

    repository = tmp_path / "greeter.git"
    assert (repository / "HEAD").exists() and not (repository / ".git").exists()  # bare
    assert git_show(repository, "greeter/__init__.py") == demo.PACKAGE["greeter/__init__.py"]
    script = yaml.safe_load(git_show(repository, ".makima/script.yaml"))
    names = [s["name"] for s in script["planning"]["steps"]]
    assert names == ["Names", "Greet", "Farewell", "Document"]
    assert len(script["steps"]["Greet"]["attempts"]) == 2  # the first attempt fails its tests


@pytest.mark.django_db
def test_demo_setup_creates_one_draft_directive_on_that_repository_and_starts_it_on_request(tmp_path):
    run_setup(tmp_path)
    run_setup(tmp_path)
    [directive] = Directive.objects.filter(title=demo.TITLE)
    assert (directive.status, directive.agent, directive.owner.username) == ("draft", "scripted", "demo")
    assert directive.repository_url == str((tmp_path / "greeter.git").resolve())

    run_setup(tmp_path, "--start")

    assert Directive.objects.get(pk=directive.pk).status == Directive.Status.PLANNING


@pytest.mark.django_db
def test_a_finished_demo_directive_is_followed_by_a_fresh_one(tmp_path):
    run_setup(tmp_path)
    Directive.objects.filter(title=demo.TITLE).update(status=Directive.Status.COMPLETED)

    run_setup(tmp_path)

    assert list(Directive.objects.filter(title=demo.TITLE).values_list("status", flat=True).order_by("created_at")) == [
        "completed",
        "draft",
    ]


@pytest.mark.django_db
def test_the_demo_package_tests_pass_on_main_and_the_buggy_greet_fails_them(tmp_path):
    run_setup(tmp_path)
    work = tmp_path / "work"
    subprocess.run(["git", "clone", "-q", str(tmp_path / "greeter.git"), str(work)], check=True)
    for name, content in demo.SCRIPT["steps"]["Names"]["write"].items():
        (work / name).write_text(content)
    attempts = demo.SCRIPT["steps"]["Greet"]["attempts"]
    for name, content in attempts[0]["write"].items():
        (work / name).write_text(content)
    pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]

    assert subprocess.run(pytest_cmd, cwd=work, capture_output=True).returncode == 1
    for name, content in attempts[1]["write"].items():
        (work / name).write_text(content)
    assert subprocess.run(pytest_cmd, cwd=work, capture_output=True).returncode == 0


@pytest.mark.django_db
def test_demo_setup_also_creates_a_guided_directive_whose_farewell_evaluation_waits_for_a_person(tmp_path):
    run_setup(tmp_path, "--start")

    [review] = Directive.objects.filter(title=demo.REVIEW_TITLE)
    assert (review.status, review.autonomy_level) == ("planning", "guided")
    repository = tmp_path / "greeter-review.git"
    assert review.repository_url == str(repository.resolve())
    script = yaml.safe_load(git_show(repository, ".makima/script.yaml"))
    assert script["evaluations"]["Farewell"]["confidenceLevel"] == "yellow"
    assert script["evaluations"]["*"]["confidenceLevel"] == "green"
    # The self-running demo's script has no marginal evaluation.
    assert list(yaml.safe_load(git_show(tmp_path / "greeter.git", ".makima/script.yaml"))["evaluations"]) == ["*"]


@pytest.mark.django_db
def test_every_demo_step_takes_the_pace_so_that_a_watcher_sees_it_run(tmp_path):
    run_setup(tmp_path, "--pace", "2.5")

    script = yaml.safe_load(git_show(tmp_path / "greeter.git", ".makima/script.yaml"))
    assert {name: entry["sleep"] for name, entry in script["steps"].items()} == dict.fromkeys(
        ["Names", "Greet", "Farewell", "Document"], 2.5
    )
    assert "sleep" not in demo.SCRIPT["steps"]["Names"]  # the module's script stays unpaced for tests
