"""The spool: one durable JSON file per report the server has not confirmed."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from makima.worker.spool import Spool, report_id_ok


def finished(task_id: str | None = None, **fields) -> dict:
    return {
        "type": "task_finished",
        "id": str(uuid.uuid4()),
        "task_id": task_id or str(uuid.uuid4()),
        "status": "done",
        **fields,
    }


def test_a_report_is_kept_until_deleted(tmp_path):
    spool = Spool(tmp_path)
    report = finished(summary="all good ✓")

    spool.put(report)

    assert (tmp_path / "spool" / f"{report['id']}.json").is_file()
    assert report["id"] in spool
    assert spool.get(report["id"]) == report
    assert spool.reports() == [report]
    assert spool.task_ids() == [report["task_id"]]
    assert spool.has_task(report["task_id"])
    assert spool.delete(report["id"]) is True
    assert spool.delete(report["id"]) is False
    assert spool.reports() == []
    assert not spool.has_task(report["task_id"])


def test_reports_survive_a_new_spool_on_the_same_workdir_oldest_first(tmp_path):
    first, second = finished(), finished()
    spool = Spool(tmp_path)
    spool.put(first)
    spool.put(second)
    # Make the order unambiguous even on filesystems with coarse timestamps.
    os.utime(tmp_path / "spool" / f"{first['id']}.json", ns=(1_000_000_000, 1_000_000_000))

    again = Spool(tmp_path)

    assert [r["id"] for r in again.reports()] == [first["id"], second["id"]]


def test_writes_leave_no_temporary_files_and_stale_ones_are_cleared(tmp_path):
    spool = Spool(tmp_path)
    spool.put(finished())
    assert [p.name for p in (tmp_path / "spool").iterdir() if not p.name.endswith(".json")] == []

    (tmp_path / "spool" / ".half-written.tmp").write_text("{")
    Spool(tmp_path)

    assert not (tmp_path / "spool" / ".half-written.tmp").exists()


def test_a_put_with_the_same_id_replaces_the_report(tmp_path):
    spool = Spool(tmp_path)
    report = finished(summary="long")
    spool.put(report)
    spool.put({**report, "summary": "short"})

    assert [r["summary"] for r in spool.reports()] == ["short"]


def test_a_broken_file_is_set_aside_and_the_others_still_load(tmp_path):
    spool = Spool(tmp_path)
    good = finished()
    spool.put(good)
    broken = tmp_path / "spool" / f"{uuid.uuid4()}.json"
    broken.write_text("{not json")
    mislabelled = finished()
    (tmp_path / "spool" / f"{uuid.uuid4()}.json").write_text(json.dumps(mislabelled))

    assert spool.reports() == [good]
    assert broken.with_suffix(".bad").exists()
    assert not broken.exists()


@pytest.mark.parametrize("value", ["../../etc/passwd", "x", "", None, 42, str(uuid.uuid4()).upper()])
def test_ids_from_outside_never_become_paths(tmp_path, value):
    spool = Spool(tmp_path)
    assert not report_id_ok(value)
    assert spool.get(value) is None
    assert spool.delete(value) is False
    assert value not in spool
    with pytest.raises((ValueError, KeyError, TypeError)):
        spool.put({"type": "task_finished", "id": value, "task_id": "t"})


def test_state_is_saved_atomically_and_a_broken_state_reads_as_empty(tmp_path):
    spool = Spool(tmp_path)
    assert spool.load_state() == {}
    spool.save_state({"name": "box-1", "daemon_id": "d"})

    assert Spool(tmp_path).load_state() == {"name": "box-1", "daemon_id": "d"}
    assert not list(tmp_path.glob(".*.tmp"))
    assert not list((tmp_path / "spool").glob("*.json"))  # the state is not a report

    (tmp_path / "state.json").write_text("[1, 2")
    assert Spool(tmp_path).load_state() == {}
