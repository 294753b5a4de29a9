"""Hostile agent data: oversized contract files and task output, floods of
output, path traversal in names (contract files, steps, branches, the
daemon's workdir) and script payloads in every field an agent can fill,
rendered by the dashboard and the admin.

Agents hold task tokens and daemons speak the protocol; both are
untrusted. Whatever they send is refused with a clear error and leaves
nothing behind, or is stored and shown as inert text.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from contracts.models import ContractFile, Task, TaskOutput
from contracts.services import branch_name, task_output_append
from daemons.models import ApiToken, Daemon
from directives.models import ApprovalRequest, Chain, Directive, DirectiveEvent, Evaluation, Step
from makima.asgi import application
from makima.worker.base import TaskSpec, slug
from makima.worker.git import GitError, Workspace
from tests.daemons.conftest import db, hello_message
from tests.factories import make_contract, make_daemon, make_directive, make_task, make_token, make_user
from tests.security import World, make_world, replies_until_handled


def bearer(plain: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {plain}")
    return client


@pytest.fixture
def agent(db: Any) -> dict[str, Any]:
    """An agent's view: a running task of alice's directive, its contract and task token."""
    alice = make_user("alice")
    directive = make_directive(alice)
    contract = make_contract(directive)
    task = make_task(directive, contract=contract, status=Task.Status.RUNNING)
    token = make_token(alice, kind=ApiToken.Kind.TASK, task=task).plain
    return {"alice": alice, "directive": directive, "contract": contract, "task": task, "client": bearer(token)}


def post_file(agent: dict[str, Any], body: dict[str, Any]) -> Any:
    return agent["client"].post(
        f"/api/v1/contracts/{agent['contract'].pk}/files/", json.dumps(body), content_type="application/json"
    )


def nothing_stored(agent: dict[str, Any]) -> bool:
    return (
        not ContractFile.objects.filter(contract=agent["contract"]).exists()
        and not DirectiveEvent.objects.filter(event_type="contract_file_created").exists()
    )


# --------------------------------------------------------------------------- oversized contract files


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("content", "body"),
    [
        ("x" * 2049, None),
        ("€" * 700, None),  # 700 characters, 2100 bytes: the limit is in bytes
        ("", [{"type": "paragraph", "text": "x" * 3000}]),  # the body counts too
        ("x" * 1500, [{"type": "code", "content": "y" * 600}]),
    ],
    ids=["ascii", "multibyte", "body", "content-and-body"],
)
def test_a_contract_file_over_the_limit_is_refused_with_a_clear_message_and_nothing_is_stored(
    settings, agent, content, body
):
    settings.MAKIMA_MAX_CONTRACT_FILE_BYTES = 2048

    response = post_file(agent, {"name": "notes.md", "content": content, "body": body})

    assert response.status_code == 400
    detail = response.json()["detail"]
    assert re.search(r"contract files may hold at most 2048 bytes", detail), detail
    assert nothing_stored(agent)


@pytest.mark.django_db
def test_a_contract_file_of_exactly_the_limit_is_stored(settings, agent):
    settings.MAKIMA_MAX_CONTRACT_FILE_BYTES = 2048

    response = post_file(agent, {"name": "notes.md", "content": "€" * 682 + "xx"})  # 2046 + 2 bytes

    assert response.status_code == 201
    assert response.json()["size"] == 2048


# --------------------------------------------------------------------------- malformed ids, filters and bodies (found by schemathesis)


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/tasks/%C2%84/",
        "/api/v1/tasks/null/output/",
        "/api/v1/contracts/../../etc/passwd/files/",
        "/api/v1/contracts/1 OR 1=1/",
        "/api/v1/directives/0/steps/",
        "/api/v1/daemons/true/",
        "/api/v1/no-such-endpoint/",
        "/api/v1/",
    ],
)
@pytest.mark.parametrize("method", ["get", "post", "delete"])
def test_a_path_that_is_no_api_route_gets_a_json_404_for_any_method(agent, path, method):
    session = Client(enforce_csrf_checks=True)  # a browser's session: a POST without CSRF token too
    session.force_login(agent["alice"])
    for client in (agent["client"], session):
        response = getattr(client, method)(path)
        assert response.status_code == 404, (path, method)
        assert response["Content-Type"] == "application/json"
        assert response.json() == {"detail": "Not found."}


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body",
    [
        [{"type": {}, "content": "x"}],
        [{"type": ["code"], "content": "x"}],
        [{"type": "code", "content": "x", "language": {}}],
        [{"type": "code", "content": 5}],
        [{"type": "paragraph", "text": None}],
        {"type": "code"},
        "code",
    ],
)
def test_a_body_element_of_the_wrong_shape_is_refused_with_400_not_a_server_error(agent, body):
    response = post_file(agent, {"name": "notes.md", "content": "x", "body": body})

    assert response.status_code == 400
    assert "body" in response.json()["errors"]
    assert nothing_stored(agent)


@pytest.mark.django_db
@pytest.mark.parametrize("team", ["-3.635832710845117e+99", "1e99", "1.5", "99999999999999999999", "0", "abc"])
def test_a_team_filter_that_is_no_team_id_is_refused_with_400_not_a_server_error(team):
    alice = make_user("alice")
    response = bearer(make_token(alice).plain).get("/api/v1/directives/", {"team": team})
    assert response.status_code == 400
    assert "team" in response.json()["errors"]


# --------------------------------------------------------------------------- path traversal in names

TRAVERSALS = [
    "../../etc/passwd",
    "..",
    ".",
    ".hidden",
    "a/b",
    "/etc/passwd",
    "a\\b",
    "..\\..\\windows",
    "%2e%2e%2fetc",
    "．．／etc",  # fullwidth dots and slash
    "chain-plan\n",
    "chain-plan\x00.md",
    "",
    " ",
    "-rf",
    "x" * 201,
]


@pytest.mark.django_db
@pytest.mark.parametrize("name", TRAVERSALS, ids=range(len(TRAVERSALS)))
def test_a_contract_file_name_that_is_not_a_plain_file_name_is_refused(agent, name):
    response = post_file(agent, {"name": name, "content": "pwned"})

    assert response.status_code == 400
    assert "name" in response.json()["errors"]
    assert nothing_stored(agent)


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["chain-plan", "evaluation-result", "notes.md", "a..b", "v1.2_final-draft"])
def test_plain_file_names_are_accepted(agent, name):
    assert post_file(agent, {"name": name, "content": "ok"}).status_code == 201


BRANCHES = ["../../etc", "--upload-pack=touch /tmp/pwned", "-b", "a b", "a..b", "a~1", "x:y", "a/", "a.lock", "@{-1}"]


@pytest.mark.django_db
@pytest.mark.parametrize("field", ["base_branch", "pr_branch"])
@pytest.mark.parametrize("branch", BRANCHES, ids=range(len(BRANCHES)))
def test_a_branch_name_git_would_refuse_or_read_as_an_option_is_refused_by_the_api(agent, field, branch):
    directive = agent["directive"]
    before = Directive.objects.values(field).get(pk=directive.pk)[field]

    response = agent["client"].patch(
        f"/api/v1/directives/{directive.pk}/", json.dumps({field: branch}), content_type="application/json"
    )

    assert response.status_code == 400
    assert response.json()["errors"][field] == [
        "Not a git branch name: no spaces, '..', '~^:?*[\\', '@{', leading '-' or '.', trailing '/' or '.'."
    ]
    assert Directive.objects.values(field).get(pk=directive.pk)[field] == before


@pytest.mark.django_db
@pytest.mark.parametrize("branch", ["main", "develop", "release/2.0", "makima/directive-x-1234abcd"])
def test_ordinary_branch_names_are_accepted(agent, branch):
    directive = agent["directive"]
    response = agent["client"].patch(
        f"/api/v1/directives/{directive.pk}/", json.dumps({"base_branch": branch}), content_type="application/json"
    )
    assert (response.status_code, response.json()["base_branch"]) == (200, branch)


HOSTILE_NAMES = [
    "../../etc/passwd",
    "..",
    "/root/.ssh/authorized_keys",
    "--upload-pack=evil",
    "-rf /",
    "a\nb",
    "<script>alert(1)</script>",
    "名前 with ünïcödé",
    "." * 300,
    "x" * 500,
    "",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_the_servers_branch_for_any_task_name_is_a_safe_git_ref_and_directory_name(name):
    ident = uuid.uuid4()

    branch = branch_name(name, ident)

    assert re.fullmatch(r"makima/[a-z0-9][a-z0-9_-]{0,59}-[0-9a-f]{8}", branch), branch
    assert ".." not in branch and not branch.split("/", 1)[1].startswith("-")


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_the_daemons_worktree_for_any_task_name_or_branch_stays_inside_its_workdir(tmp_path: Path, name):
    workspace = Workspace(tmp_path / "work")
    for spec in (
        TaskSpec(id=str(uuid.uuid4()), name=name, kind="execution", agent="scripted", plan=""),
        TaskSpec(id=name or "x", name=name, kind="execution", agent="scripted", plan="", branch=name),
    ):
        path = workspace.worktree_path(spec)
        assert path.parent == workspace.worktrees
        assert ".." not in path.name.split("-") and not path.name.startswith(".")
    component = slug(name)
    assert "/" not in component and "\\" not in component and component not in ("", ".", "..")


@pytest.mark.parametrize("branch", ["../../etc", "--upload-pack=evil", "-b", "a..b", "a b", "HEAD"])
def test_the_daemon_refuses_a_base_or_merge_branch_git_would_misread(tmp_path: Path, branch):
    from makima.worker.git import _check_branch

    with pytest.raises(GitError, match="invalid"):
        _check_branch(branch, what="base branch")


@pytest.mark.django_db
def test_a_step_named_like_a_path_is_only_text_and_its_branch_is_safe(agent):
    directive = agent["directive"]
    response = agent["client"].post(
        f"/api/v1/directives/{directive.pk}/steps/batch/",
        json.dumps({"steps": [{"name": "../../etc/passwd"}, {"name": "--force", "depends_on": ["../../etc/passwd"]}]}),
        content_type="application/json",
    )
    assert response.status_code == 201
    names = [step["name"] for step in response.json()["steps"]]
    assert names == ["../../etc/passwd", "--force"]
    for step in Step.objects.filter(directive=directive):
        assert re.fullmatch(r"makima/[a-z0-9][a-z0-9_-]*-[0-9a-f]{8}", branch_name(step.name, step.pk))


# --------------------------------------------------------------------------- oversized output and floods


@pytest.fixture
async def daemon_socket() -> AsyncIterator[Any]:
    """alice's daemon, connected and said hello, with a running task."""

    @db
    def create() -> tuple[str, Task]:
        alice = make_user("alice")
        daemon = make_daemon(alice, name="box")
        task = make_task(make_directive(alice), daemon=daemon, status=Task.Status.RUNNING, started_at=timezone.now())
        return make_token(alice, kind=ApiToken.Kind.DAEMON).plain, task

    token, task = await create()
    socket = WebsocketCommunicator(application, "/ws/daemon/", headers=[(b"authorization", f"Bearer {token}".encode())])
    assert (await socket.connect())[0]
    await socket.send_json_to(hello_message("box", running_tasks=[str(task.pk)]))
    assert (await socket.receive_json_from(timeout=2))["type"] == "welcome"
    yield socket, task
    await socket.disconnect()
    await db(connections.close_all)()


@pytest.mark.django_db(transaction=True)
async def test_a_flood_of_output_keeps_only_the_newest_lines_of_the_task(daemon_socket, settings):
    settings.MAKIMA_TASK_OUTPUT_MAX_LINES = 300
    settings.MAKIMA_WS_RATE_BURST = 10_000
    socket, task = daemon_socket

    for batch in range(25):  # 5000 lines, 200 a message as a daemon batches them
        items = [
            {"seq": n, "stream": "stdout", "content": f"line {n}"} for n in range(batch * 200 + 1, batch * 200 + 201)
        ]
        await socket.send_json_to({"type": "task_output", "task_id": str(task.pk), "items": items})
    assert await replies_until_handled(socket) == []

    @db
    def kept() -> list[tuple[int, str, str]]:
        return list(TaskOutput.objects.filter(task=task).order_by("seq").values_list("seq", "stream", "content"))

    rows = await kept()
    assert len(rows) == 300
    assert rows[0][:2] == (4701, "system")
    assert "output lines 1–4701 were dropped" in rows[0][2]
    assert [seq for seq, _, _ in rows[1:]] == list(range(4702, 5001))


@pytest.mark.django_db(transaction=True)
async def test_an_output_line_over_the_byte_limit_is_cut_and_marked(daemon_socket, settings):
    settings.MAKIMA_TASK_OUTPUT_MAX_BYTES = 1000
    socket, task = daemon_socket

    await socket.send_json_to(
        {
            "type": "task_output",
            "task_id": str(task.pk),
            "items": [
                {"seq": 1, "stream": "stdout", "content": "a" * 100_000},
                {"seq": 2, "stream": "agent", "content": "🦀" * 10_000},
                {"seq": 3, "stream": "stderr", "content": "fine"},
            ],
        }
    )
    assert await replies_until_handled(socket) == []

    rows = await db(
        lambda: list(TaskOutput.objects.filter(task=task).order_by("seq").values_list("content", flat=True))
    )()
    assert [len(content.encode()) <= 1000 + len("\n… [cut]".encode()) for content in rows] == [True, True, True]
    assert rows[0].endswith("\n… [cut]") and rows[1].endswith("\n… [cut]")
    assert rows[2] == "fine"


@pytest.mark.django_db(transaction=True)
async def test_more_output_items_in_one_message_than_the_protocol_allows_are_refused_whole(daemon_socket):
    socket, task = daemon_socket
    items = [{"seq": n, "stream": "stdout", "content": "x"} for n in range(1, 202)]

    await socket.send_json_to({"type": "task_output", "task_id": str(task.pk), "items": items, "id": "big"})

    error = await socket.receive_json_from(timeout=2)
    assert (error["code"], error["message"], error["ref"]) == ("invalid", "items: must hold at most 200 items", "big")
    assert not await db(TaskOutput.objects.filter(task=task).exists)()


# --------------------------------------------------------------------------- script payloads in agent text


def payload(field: str) -> str:
    """A payload naming its field, so that a page that shows it proves the field was rendered
    (without the image for the columns of 64 characters)."""
    script = f'<script>pwn("{field}")</script>'
    return script if field == "daemon.version" else f'{script}<img src=x onerror=pwn("{field}")>'


def escaped(field: str) -> str:
    return f"&lt;script&gt;pwn(&quot;{field}&quot;)&lt;/script&gt;"


AGENT_FIELDS = [
    "step.name",
    "step.description",
    "step.task_plan",
    "step.rework_instructions",
    "evaluation.summary_feedback",
    "evaluation.rework_instructions",
    "evaluation.criterion",
    "evaluation.evidence",
    "evaluation.verifier_name",
    "evaluation.verifier_command",
    "evaluation.output_tail",
    "task.summary",
    "task.error",
    "task.question",
    "output.content",
    "approval.description",
    "event.message",
    "chain.name",
    "chain.rationale",
    "directive.goal",
    "directive.pr_branch",
    "daemon.name",
    "daemon.hostname",
    "daemon.version",
    "file.content",
]


@pytest.fixture
def hostile(db: Any) -> World:
    """alice's world with a payload in every field an agent or a daemon fills
    (written straight to the rows: whatever path a value came in by)."""
    w = make_world()
    m = w.mine
    step = m.steps[0]
    Step.objects.filter(pk=step.pk).update(
        name=payload("step.name"),
        description=payload("step.description"),
        task_plan=payload("step.task_plan"),
        rework_instructions=payload("step.rework_instructions"),
        status=Step.Status.AWAITING_APPROVAL,
        execution_task=m.task,
        last_evaluation=m.evaluation,
    )
    Evaluation.objects.filter(pk=m.evaluation.pk).update(
        summary_feedback=payload("evaluation.summary_feedback"),
        rework_instructions=payload("evaluation.rework_instructions"),
        confidence_level="yellow",
        criteria_results=[
            {
                "criterion": payload("evaluation.criterion"),
                "passed": False,
                "score": 0.5,
                "evidence": payload("evaluation.evidence"),
            }
        ],
        verifier_results=[
            {
                "name": payload("evaluation.verifier_name"),
                "command": payload("evaluation.verifier_command"),
                "passed": False,
                "exit_code": 1,
                "duration_s": 1.0,
                "output_tail": payload("evaluation.output_tail"),
            }
        ],
    )
    Task.objects.filter(pk=m.task.pk).update(
        summary=payload("task.summary"),
        error=payload("task.error"),
        question=payload("task.question"),
        status=Task.Status.PAUSED,
        daemon=m.daemon,
    )
    task_output_append(task=m.task, items=[{"seq": 2, "stream": "agent", "content": payload("output.content")}])
    ApprovalRequest.objects.filter(pk=m.approval.pk).update(description=payload("approval.description"))
    DirectiveEvent.objects.create(
        directive=m.directive, event_type="agent_note", message=payload("event.message"), severity="warn"
    )
    Chain.objects.filter(pk=m.chain.pk).update(name=payload("chain.name"), rationale=payload("chain.rationale"))
    Directive.objects.filter(pk=m.directive.pk).update(
        goal=payload("directive.goal"),
        pr_url='javascript:pwn("directive.pr_url")',
        pr_branch=payload("directive.pr_branch"),
    )
    Daemon.objects.filter(pk=m.daemon.pk).update(
        name=payload("daemon.name"), hostname=payload("daemon.hostname"), version=payload("daemon.version")
    )
    ContractFile.objects.filter(pk=m.file.pk).update(content=payload("file.content"))
    return w


def dashboard_pages(w: World) -> list[str]:
    m = w.mine
    d = m.directive.pk
    return [
        "/",
        f"/directives/{d}/",
        *(f"/directives/{d}/live/{part}/" for part in ("header", "dag", "grid", "events", "goals")),
        f"/directives/{d}/steps/{m.steps[0].pk}/",
        f"/directives/{d}/chain/",
        f"/tasks/{m.task.pk}/output/",
        "/approvals/",
        "/daemons/",
    ]


def admin_pages(w: World) -> list[str]:
    m = w.mine
    objects = [m.directive, m.steps[0], m.chain, m.evaluation, m.approval, m.task, m.contract, m.file, m.daemon]
    pages = []
    for obj in objects:
        meta = obj._meta
        pages.append(reverse(f"admin:{meta.app_label}_{meta.model_name}_changelist"))
        pages.append(reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk]))
    pages.append(reverse("admin:contracts_taskoutput_changelist"))
    pages.append(reverse("admin:directives_directiveevent_changelist"))
    return pages


def render_all(client: Client, urls: list[str]) -> dict[str, str]:
    pages = {}
    for url in urls:
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
        pages[url] = response.content.decode()
    return pages


class ActiveParts(HTMLParser):
    """What a browser would run or follow: script bodies, event-handler
    attributes and link targets."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.in_script = False
        self.scripts: list[str] = []
        self.handlers: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.in_script = tag == "script"
        for name, value in attrs:
            if name.startswith("on"):
                self.handlers.append(value or "")
            if name in ("href", "src", "action", "formaction", "hx-get", "hx-post"):
                self.links.append((value or "").strip())

    def handle_endtag(self, tag: str) -> None:
        self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script:
            self.scripts.append(data)


def assert_inert(pages: dict[str, str]) -> set[str]:
    """No payload runs anywhere; returns the fields seen (escaped) on some page."""
    for url, html in pages.items():
        parts = ActiveParts()
        parts.feed(html)
        assert not [s for s in parts.scripts if "pwn" in s], url
        assert not [h for h in parts.handlers if "pwn" in h], url
        assert not [link for link in parts.links if link.lower().startswith("javascript:") or "pwn" in link], url
        assert "<script>pwn(" not in html and "<img src=x" not in html, url
    return {field for field in AGENT_FIELDS if any(escaped(field) in html for html in pages.values())}


def test_payloads_in_every_agent_field_are_shown_as_text_on_the_dashboard(hostile):
    client = Client()
    client.force_login(hostile.alice)

    shown = assert_inert(render_all(client, dashboard_pages(hostile)))

    # The dashboard shows nearly all of them (that is the point of the test); the
    # rest are on admin pages below.
    # Shown only in the admin: chains and contract files have no dashboard page of their own.
    assert set(AGENT_FIELDS) - shown == {"chain.name", "chain.rationale", "directive.pr_branch", "file.content"}


def test_payloads_in_every_agent_field_are_shown_as_text_in_the_admin(hostile):
    client = Client()
    client.force_login(hostile.root)

    shown = assert_inert(render_all(client, admin_pages(hostile)))

    # The admin shows an evaluation's criteria and verifier results as JSON (quotes escaped
    # differently, still inert); the dashboard shows them as text.
    json_shown = {"evaluation.criterion", "evaluation.evidence", "evaluation.verifier_name"}
    assert set(AGENT_FIELDS) - shown == {*json_shown, "evaluation.verifier_command", "evaluation.output_tail"}


def test_every_agent_field_is_shown_somewhere_so_the_checks_above_can_fail(hostile):
    dashboard, admin = Client(), Client()
    dashboard.force_login(hostile.alice)
    admin.force_login(hostile.root)
    pages = {**render_all(dashboard, dashboard_pages(hostile)), **render_all(admin, admin_pages(hostile))}
    assert assert_inert(pages) == set(AGENT_FIELDS)


def test_a_javascript_pr_url_is_never_a_link(hostile):
    client = Client()
    client.force_login(hostile.alice)
    html = client.get(f"/directives/{hostile.mine.directive.pk}/").content.decode()
    assert "javascript:pwn(&quot;directive.pr_url&quot;)" in html  # shown, as text
    assert not re.search(r"<a[^>]+javascript:", html, re.IGNORECASE)


def test_the_api_serves_agent_text_as_json_that_browsers_do_not_sniff(hostile):
    client = bearer(hostile.keys["alice_key"])
    response = client.get(f"/api/v1/directives/{hostile.mine.directive.pk}/steps/{hostile.mine.steps[0].pk}/")
    assert response["Content-Type"] == "application/json"
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response.json()["name"] == payload("step.name")  # stored as sent: escaping is the renderer's job


@pytest.mark.django_db(transaction=True)
async def test_a_daemon_naming_itself_with_a_payload_is_shown_as_text_on_the_daemons_page():
    @db
    def create() -> tuple[Any, str]:
        alice = make_user("alice")
        return alice, make_token(alice, kind=ApiToken.Kind.DAEMON).plain

    alice, token = await create()
    socket = WebsocketCommunicator(application, "/ws/daemon/", headers=[(b"authorization", f"Bearer {token}".encode())])
    assert (await socket.connect())[0]
    await socket.send_json_to(
        hello_message(payload("daemon.name"), hostname=payload("daemon.hostname"), agents=[payload("agent")[:32]])
    )
    assert (await socket.receive_json_from(timeout=2))["type"] == "welcome"

    @db
    def page() -> str:
        client = Client()
        client.force_login(alice)
        return client.get("/daemons/").content.decode()

    html = await page()
    await socket.disconnect()
    await db(connections.close_all)()
    assert "<script>pwn(" not in html and "<img src=x" not in html
    assert escaped("daemon.name") in html
