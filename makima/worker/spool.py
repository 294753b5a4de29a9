"""Reports the server has not confirmed yet, kept on disk.

A ``task_finished`` report is written here before it is sent and deleted
when the server answers ``received`` (protocol.md), so that neither a lost
connection nor a restart of the daemon loses a task's result. Layout under
the daemon's workdir::

    spool/<report id>.json    one report each: the exact message to send
    spool/.<report id>.tmp    a report being written (never read back)
    spool/<report id>.bad     a file that could not be read (kept to look at)
    state.json                the little the daemon remembers across restarts

Every write is atomic (temp file, fsync, ``os.replace``, fsync of the
directory): after a crash a report is either wholly there or not at all.
The spool is used from the daemon's event loop only; it holds no lock of its
own (the daemon holds one on the whole workdir).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SUFFIX = ".json"


def report_id_ok(value: Any) -> bool:
    """Whether ``value`` is a report id this spool could have made (a UUID): ids
    that come back from the server become file names, so nothing else is used."""
    if not isinstance(value, str):
        return False
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that a crash leaves the old file or the new one."""
    temp = path.with_name(f".{path.stem}.tmp")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    with open(temp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Spool:
    """One JSON file per unacknowledged report, oldest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.path = self.workdir / "spool"
        self.state_path = self.workdir / "state.json"
        self.path.mkdir(parents=True, exist_ok=True)
        # Leftovers of writes a crash interrupted: never renamed, so never meant to count.
        for temp in self.path.glob(".*.tmp"):
            temp.unlink(missing_ok=True)

    def _file(self, report_id: str) -> Path:
        if not report_id_ok(report_id):
            raise ValueError(f"not a report id: {report_id!r}")
        return self.path / f"{report_id}{SUFFIX}"

    # reports

    def put(self, report: dict[str, Any]) -> Path:
        """Store ``report`` (a message with an ``id``) durably; replaces one with the same id."""
        path = self._file(report["id"])
        write_json_atomic(path, report)
        return path

    def get(self, report_id: str) -> dict[str, Any] | None:
        if not report_id_ok(report_id):
            return None
        path = self._file(report_id)
        try:
            return self._read(path)
        except FileNotFoundError:
            return None

    def delete(self, report_id: Any) -> bool:
        """Forget a report; False when the spool did not hold it."""
        if not report_id_ok(report_id):
            return False
        path = self._file(report_id)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(self.path)
        return True

    def __contains__(self, report_id: object) -> bool:
        return report_id_ok(report_id) and self._file(str(report_id)).is_file()

    def reports(self) -> list[dict[str, Any]]:
        """Every stored report, oldest first. A file that cannot be read is renamed
        ``.bad`` and skipped: one broken file must not stop the others."""
        entries = []
        for path in self.path.glob(f"*{SUFFIX}"):
            try:
                entries.append((path.stat().st_mtime_ns, path.name, path))
            except FileNotFoundError:
                continue
        found = []
        for _, _, path in sorted(entries):
            try:
                report = self._read(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                logger.error("spool: cannot read %s (%s); set aside as .bad", path.name, exc)
                with contextlib.suppress(OSError):
                    path.replace(path.with_suffix(".bad"))
                continue
            found.append(report)
        return found

    def task_ids(self) -> list[str]:
        """The tasks whose ``task_finished`` is still waiting for ``received``."""
        return list(dict.fromkeys(str(r["task_id"]) for r in self.reports() if r.get("type") == "task_finished"))

    def has_task(self, task_id: str) -> bool:
        return task_id in self.task_ids()

    def _read(self, path: Path) -> dict[str, Any]:
        report = json.loads(path.read_text(encoding="utf-8"))
        if (
            not isinstance(report, dict)
            or not isinstance(report.get("type"), str)
            or report.get("id") != path.name.removesuffix(SUFFIX)
            or (report["type"] == "task_finished" and not isinstance(report.get("task_id"), str))
        ):
            raise ValueError("not a report this spool wrote")
        return report

    # state

    def load_state(self) -> dict[str, Any]:
        """What an earlier run of the daemon saved (``{}`` when nothing or unreadable)."""
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("spool: ignoring unreadable %s (%s)", self.state_path, exc)
            return {}
        return state if isinstance(state, dict) else {}

    def save_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.state_path, state)
