"""Log lines carry the directive, step, task and daemon they are about.

The unit tests pin down the context itself (nesting, resetting, asyncio
tasks, worker threads); the path tests run the real code (a daemon's
``task_finished`` through the websocket gateway, a finished task's
consequences, the tick over several directives) with SQL logging on, and look
at the ids on the log records those paths emit."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.db import connections
from django.utils import timezone

from contracts.services import task_finished_consequences
from daemons.models import ApiToken
from directives import lifecycle
from directives.models import Directive, Step
from makima.asgi import application
from makima.logs import ContextFilter, bind, current, log_context, unbind
from tests.daemons.conftest import say_hello
from tests.factories import make_daemon, make_directive, make_steps, make_task, make_token, make_user

logger = logging.getLogger("tests.ops")


def _ids(record: logging.LogRecord) -> tuple[str, str, str, str]:
    return (record.directive_id, record.step_id, record.task_id, record.daemon)


class Captured:
    """The records a test emitted, passed through the filter of the LOGGING setting."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def mine(self) -> list[logging.LogRecord]:
        return [r for r in self.caplog.records if r.name == logger.name]

    def all(self) -> list[logging.LogRecord]:
        return list(self.caplog.records)

    def clear(self) -> None:
        self.caplog.clear()


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Iterator[Captured]:
    context_filter = ContextFilter()
    caplog.handler.addFilter(context_filter)
    caplog.set_level(logging.DEBUG)
    yield Captured(caplog)
    caplog.handler.removeFilter(context_filter)


@pytest.fixture
def sql_records(settings, caplog, records) -> Captured:
    """Records of every SQL statement run too (``django.db.backends`` logs them when DEBUG is on)."""
    settings.DEBUG = True
    caplog.set_level(logging.DEBUG, logger="django.db.backends")
    return records


def _statements(records: Captured, *fragments: str) -> list[logging.LogRecord]:
    return [
        r
        for r in records.all()
        if r.name == "django.db.backends" and all(f in getattr(r, "sql", "") or "" for f in fragments)
    ]


# --------------------------------------------------------------------------- the context


def test_a_record_carries_the_bound_ids_and_empty_strings_for_the_rest(records):
    directive, task = uuid.uuid4(), uuid.uuid4()
    logger.info("outside")
    with log_context(directive=directive, task=task):
        logger.info("inside")

    outside, inside = records.mine()
    assert _ids(outside) == ("", "", "", "")
    assert outside.log_context == ""
    assert _ids(inside) == (str(directive), "", str(task), "")
    assert inside.log_context == f" [directive={directive} task={task}]"


def test_contexts_nest_and_each_block_restores_the_ids_before_it_even_when_it_raises(records):
    with log_context(directive="d1", daemon="box"):
        with log_context(step="s1", task="t1"):
            logger.info("inner")
            with pytest.raises(RuntimeError), log_context(directive="d2", task="t2"):
                logger.info("innermost")
                raise RuntimeError("boom")
            logger.info("inner again")
        with log_context(directive=None, step=None):  # None keeps the outer value
            logger.info("outer")
    logger.info("none")

    assert [(r.getMessage(), _ids(r)) for r in records.mine()] == [
        ("inner", ("d1", "s1", "t1", "box")),
        ("innermost", ("d2", "s1", "t2", "box")),
        ("inner again", ("d1", "s1", "t1", "box")),
        ("outer", ("d1", "", "", "box")),
        ("none", ("", "", "", "")),
    ]


def test_bind_lasts_until_unbind_and_unknown_names_are_refused():
    token = bind(daemon="box-1")
    assert current() == {"daemon": "box-1"}
    unbind(token)
    assert current() == {}
    with pytest.raises(TypeError, match="daemon, directive, step, task, not user"):
        bind(user="alice")


def test_an_id_given_through_extra_is_kept(records):
    with log_context(task="from-context"):
        logger.info("explicit", extra={"task_id": "from-extra"})
    assert records.mine()[0].task_id == "from-extra"


def test_a_newline_in_a_daemon_name_cannot_start_a_forged_log_line(records):
    with log_context(daemon="box\n2026-01-01 ERROR forged"):
        logger.info("hello")
    (record,) = records.mine()
    assert record.daemon == "box?2026-01-01 ERROR forged"
    assert "\n" not in record.log_context


async def test_asyncio_tasks_inherit_the_ids_and_their_own_changes_do_not_leak(records):
    seen: dict[str, dict[str, str]] = {}

    async def worker(name: str, task_id: str) -> None:
        seen[f"{name} start"] = current()
        with log_context(task=task_id):
            await asyncio.sleep(0.01)  # both tasks are inside their blocks at once
            seen[f"{name} inside"] = current()
            logger.info(name)
        seen[f"{name} end"] = current()

    with log_context(directive="d1"):
        await asyncio.gather(asyncio.create_task(worker("a", "t-a")), asyncio.create_task(worker("b", "t-b")))
        seen["parent"] = current()

    assert seen["a start"] == seen["b start"] == seen["a end"] == seen["b end"] == {"directive": "d1"}
    assert seen["a inside"] == {"directive": "d1", "task": "t-a"}
    assert seen["b inside"] == {"directive": "d1", "task": "t-b"}
    assert seen["parent"] == {"directive": "d1"}
    assert current() == {}
    assert {(r.getMessage(), r.task_id, r.directive_id) for r in records.mine()} == {
        ("a", "t-a", "d1"),
        ("b", "t-b", "d1"),
    }


async def test_the_ids_follow_the_work_into_sync_to_async_threads(records):
    def in_a_thread() -> None:
        logger.info("from the worker thread")

    with log_context(directive="d1", task="t1"):
        await sync_to_async(in_a_thread, thread_sensitive=False)()
    (record,) = records.mine()
    assert _ids(record) == ("d1", "", "t1", "")


def test_the_logging_setting_puts_the_ids_before_the_message():
    handler_config = django_settings.LOGGING["handlers"]["console"]
    assert handler_config["filters"] == ["context"]
    assert django_settings.LOGGING["filters"]["context"]["()"] == "makima.logs.ContextFilter"
    # The console handler Django configured from that setting carries the filter.
    console = [h for h in logging.getLogger().handlers if any(isinstance(f, ContextFilter) for f in h.filters)]
    assert console, "no root handler has the ContextFilter"

    formatter = logging.Formatter(django_settings.LOGGING["formatters"]["plain"]["format"])
    context_filter = ContextFilter()

    def line(message: str) -> str:
        record = logging.LogRecord("directives.lifecycle", logging.INFO, __file__, 1, message, None, None)
        context_filter.filter(record)
        return formatter.format(record).split(" ", 2)[2]  # without the date and time

    with log_context(directive="d1", step="s1", task="t1"):
        assert line("dispatched") == "INFO directives.lifecycle [directive=d1 step=s1 task=t1] dispatched"
    assert line("tick") == "INFO directives.lifecycle tick"


# --------------------------------------------------------------------------- the paths that bind them


@pytest.mark.django_db(transaction=True)
async def test_a_daemons_task_finished_report_is_handled_under_its_daemon_task_and_directive(sql_records):
    """The gateway binds the daemon and the task for the whole message; the
    lifecycle adds the directive and step while it applies the consequences."""

    @sync_to_async
    def create():
        user = make_user("alice")
        daemon = make_daemon(user, "box-7")
        directive = make_directive(user)
        (step,) = make_steps(directive, {"name": "Health"})
        task = make_task(directive, step=step, daemon=daemon, status="running", started_at=timezone.now())
        Directive.objects.filter(pk=directive.pk).update(status=Directive.Status.ACTIVE)
        Step.objects.filter(pk=step.pk).update(execution_task=task, status=Step.Status.RUNNING)
        return make_token(user, kind=ApiToken.Kind.DAEMON).plain, directive, step, task

    token, directive, step, task = await create()
    socket = WebsocketCommunicator(application, "/ws/daemon/", headers=[(b"authorization", f"Bearer {token}".encode())])
    assert (await socket.connect())[0]
    try:
        await say_hello(socket, "box-7", running_tasks=[str(task.pk)])
        sql_records.clear()
        await socket.send_json_to(
            {
                "type": "task_finished",
                "id": str(uuid.uuid4()),
                "task_id": str(task.pk),
                "status": "failed",
                "exit_code": 1,
                "summary": None,
                "error": "it broke",
                "branch": None,
                "commit_sha": None,
                "cost_usd": None,
                "verifier_results": [],
            }
        )
        assert (await socket.receive_json_from(timeout=5))["type"] == "received"
        await socket.receive_nothing(timeout=0.3)
    finally:
        await socket.disconnect()
        await sync_to_async(connections.close_all)()

    task_hex = {str(task.pk), task.pk.hex}
    stored = _statements(sql_records, "UPDATE", "contracts_task", "failed")
    assert stored, "the task's end was not stored"
    assert all(r.task_id == str(task.pk) and r.daemon == "box-7" for r in stored)
    assert any(h in stored[0].sql for h in task_hex)
    # The step failing is a consequence applied by the lifecycle: directive, step and task are named.
    step_failed = _statements(sql_records, "UPDATE", "directives_step", "failed")
    assert step_failed, "the step was not failed"
    assert {_ids(r) for r in step_failed} == {(str(directive.pk), str(step.pk), str(task.pk), "box-7")}


def test_a_finished_tasks_consequences_are_logged_under_its_task_step_and_directive(sql_records, alice):
    daemon = make_daemon(alice)
    directive = make_directive(alice)
    Directive.objects.filter(pk=directive.pk).update(status=Directive.Status.ACTIVE)
    (step,) = make_steps(directive, {"name": "Health"})
    task = make_task(directive, step=step, daemon=daemon, status="failed", finished_at=timezone.now())
    Step.objects.filter(pk=step.pk).update(execution_task=task, status=Step.Status.RUNNING)
    sql_records.clear()

    task_finished_consequences(task_id=task.pk, owner_id=alice.pk)

    step_failed = _statements(sql_records, "UPDATE", "directives_step", "failed")
    assert step_failed
    assert {_ids(r) for r in step_failed} == {(str(directive.pk), str(step.pk), str(task.pk), "")}
    # Every statement of the handling names at least the task.
    assert all(r.task_id == str(task.pk) for r in _statements(sql_records))


def test_the_tick_names_each_directive_while_it_works_on_it(sql_records, alice):
    first, second = make_directive(alice, title="First"), make_directive(alice, title="Second")
    Directive.objects.filter(pk__in=[first.pk, second.pk]).update(status=Directive.Status.PLANNING)
    sql_records.clear()

    lifecycle.tick()

    inserts = _statements(sql_records, "INSERT", "contracts_task")
    assert len(inserts) == 2, "each directive gets a planning task"
    for record in inserts:
        directive = first if (str(first.pk) in record.sql or first.pk.hex in record.sql) else second
        assert record.directive_id == str(directive.pk)
    assert {r.directive_id for r in inserts} == {str(first.pk), str(second.pk)}
    (summary,) = [r for r in sql_records.all() if r.getMessage().startswith("orchestrator tick:")]
    assert _ids(summary) == ("", "", "", ""), "the tick's own summary is about no single directive"
