"""Task output: each line stored once per ``(task, attempt, seq)`` — a retried
task's daemon numbers its lines from 1 again — and retention per attempt."""

from __future__ import annotations

import pytest

from contracts.models import Task, TaskOutput
from contracts.services import task_output_append, task_output_trim
from tests.factories import make_directive, make_task

pytestmark = pytest.mark.django_db


@pytest.fixture
def task(alice) -> Task:
    return make_task(make_directive(alice), status=Task.Status.RUNNING)


def send(task: Task, seqs: range | list[int], text: str) -> None:
    task_output_append(task=task, items=[{"seq": seq, "content": f"{text} {seq}"} for seq in seqs])


def stored(task: Task) -> list[tuple[int, int, str]]:
    return list(TaskOutput.objects.filter(task=task).values_list("attempt", "seq", "content"))


def retry(task: Task) -> Task:
    """What a retry does to the row (directives.lifecycle._retry_interrupted): the next attempt."""
    Task.objects.filter(pk=task.pk).update(attempt=task.attempt + 1)
    task.refresh_from_db()
    return task


def test_a_retried_task_stores_its_new_attempts_lines_beside_the_old_ones(task):
    send(task, [1, 2, 3], "first run")
    task = retry(task)

    send(task, [1, 2, 3], "second run")

    assert stored(task) == [
        (1, 1, "first run 1"),
        (1, 2, "first run 2"),
        (1, 3, "first run 3"),
        (2, 1, "second run 1"),
        (2, 2, "second run 2"),
        (2, 3, "second run 3"),
    ]


def test_a_line_sent_again_within_an_attempt_is_still_ignored(task):
    send(task, [1, 2], "first run")
    task = retry(task)
    send(task, [1, 2, 3], "second run")

    send(task, [2], "resent")
    send(task, [2, 4], "second run")

    assert [row for row in stored(task) if row[0] == 2] == [
        (2, 1, "second run 1"),
        (2, 2, "second run 2"),
        (2, 3, "second run 3"),
        (2, 4, "second run 4"),
    ]
    assert TaskOutput.objects.filter(task=task).count() == 6


def test_lines_go_to_the_attempt_the_task_row_says_it_runs(task):
    stale = Task.objects.get(pk=task.pk)
    retry(task)
    # Services read the task afresh (task_report_output does, per batch): the row decides.
    send(Task.objects.get(pk=task.pk), [1], "second run")
    send(stale, [1], "first run")

    assert stored(task) == [(1, 1, "first run 1"), (2, 1, "second run 1")]


def test_retention_keeps_the_newest_lines_of_each_attempt_and_leaves_the_others_alone(settings, task):
    settings.MAKIMA_TASK_OUTPUT_MAX_LINES = 10
    for start in range(1, 16, 5):  # 15 lines in batches of 5, as a daemon sends them
        send(task, range(start, start + 5), "first run")
    first = stored(task)
    assert len(first) == 10
    assert first[0][:2] == (1, 6) and "output lines 1–6 were dropped" in first[0][2]
    assert "per attempt" in first[0][2]
    task = retry(task)

    for start in range(1, 26, 5):
        send(task, range(start, start + 5), "second run")

    rows = stored(task)
    assert [row for row in rows if row[0] == 1] == first  # attempt 2's trim left attempt 1 as it was
    second = [row for row in rows if row[0] == 2]
    assert len(second) == 10
    assert second[0][:2] == (2, 16) and second[0][2].startswith("[makima] output lines 1–16 were dropped")
    assert TaskOutput.objects.get(task=task, attempt=2, seq=16).stream == TaskOutput.Stream.SYSTEM
    assert [content for _, _, content in second[1:]] == [f"second run {seq}" for seq in range(17, 26)]


def test_a_new_attempt_below_the_limit_costs_no_retention_query(settings, task, django_assert_num_queries):
    settings.MAKIMA_TASK_OUTPUT_MAX_LINES = 10
    send(task, range(1, 31), "first run")  # attempt 1 was trimmed
    task = retry(task)

    with django_assert_num_queries(1):  # the insert only
        send(task, range(1, 11), "second run")

    assert TaskOutput.objects.filter(task=task, attempt=2).count() == 10


def test_trimming_another_attempt_than_the_current_one(settings, task):
    settings.MAKIMA_TASK_OUTPUT_MAX_LINES = 10
    send(task, range(1, 11), "first run")
    TaskOutput.objects.bulk_create(
        TaskOutput(task=task, attempt=1, seq=seq, content=f"first run {seq}") for seq in range(11, 21)
    )  # stored under an older limit
    task = retry(task)
    send(task, range(1, 4), "second run")

    assert task_output_trim(task=task) == 0  # the current attempt holds 3 lines
    assert task_output_trim(task=task, attempt=1) == 11  # lines 1–11 go, a marker takes seq 11

    assert TaskOutput.objects.filter(task=task, attempt=1).count() == 10
    assert TaskOutput.objects.filter(task=task, attempt=2).count() == 3
