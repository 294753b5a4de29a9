"""A person's way through the dashboard, in a real browser against a real
server: sign in, write a directive and its chain by hand, start it, watch the
steps change live as a daemon works, answer the approval a marginal evaluation
asks for, and see the directive complete."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import expect

from tests.browser.conftest import Dashboard
from tests.browser.helpers import label, node, whole
from tests.browser.scenario import Scenario

pytestmark = [pytest.mark.browser, pytest.mark.slow]

A = "A"
B = "B <img src=x onerror=window.__xss=1>"
C = "C"


async def test_signing_in_through_the_form_lands_on_the_directives_list(dashboard):
    board = dashboard
    page = board.page
    await board.sign_in()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Directives")
    await expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="Directives")).to_have_attribute(
        "aria-current", "page"
    )
    await expect(page.get_by_text("No directives yet")).to_be_visible()
    await expect(page.get_by_role("link", name="New directive")).to_be_visible()
    await board.assert_clean()


async def add_step(board: Dashboard, name: str, *, plan: str, phase: int, depends_on: str | None = None) -> None:
    form = board.page.locator("#add-step")
    await form.get_by_label(label("Name")).fill(name)
    await form.get_by_label(label("Task plan")).fill(plan)
    await form.get_by_label(label("Phase (order index)")).fill(str(phase))
    if depends_on is not None:
        await form.get_by_label(depends_on, exact=True).check()
    await form.get_by_role("button", name="Add step").click()
    names = board.page.locator("table.chain-steps tbody tr strong")
    await expect(names.filter(has_text=whole(name))).to_have_count(1)


async def test_a_hand_made_directive_runs_live_waits_for_approval_and_completes(dashboard, start_daemon):
    board = dashboard
    page = board.page
    scenario = Scenario(yellow={B})
    daemon = await start_daemon(scenario)
    await board.sign_in()

    # A new directive, through the form.
    await page.get_by_role("link", name="New directive").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("New directive")
    await page.get_by_label(label("Title")).fill("Browser flow")
    await page.get_by_label(label("Goal")).fill("Add a greeting module, its tests and its docs.")
    await page.get_by_label(label("Acceptance criteria")).fill("It greets\nIt is tested")
    await page.get_by_label(label("Repository URL")).fill("/srv/repos/browser.git")
    await page.get_by_label(label("Agent")).select_option("scripted")
    await page.get_by_label(label("Autonomy level")).select_option("guided")
    await page.get_by_label(label("Evaluation mode")).select_option("agent")
    await page.get_by_role("button", name="Create and add steps by hand").click()

    # Its chain, by hand: A; B after A; C after B.
    await expect(page).to_have_url(re.compile(r"/directives/[0-9a-f-]{36}/chain/$"))
    directive_url = page.url.removesuffix("chain/")
    await add_step(board, A, plan="Write the greeting module.", phase=0)
    await add_step(board, B, plan="Test the greeting module.", phase=1, depends_on=A)
    await add_step(board, C, plan="Document the greeting module.", phase=2, depends_on=B)
    rows = page.locator("table.chain-steps tbody tr")
    await expect(rows).to_have_count(3)
    await expect(rows.locator("strong")).to_have_text([A, B, C])
    await expect(rows.nth(1).locator("td").nth(3)).to_have_text(A)
    await expect(rows.nth(2).locator("td").nth(3)).to_have_text(B)
    await board.screenshot("chain-editor.png")

    # Started from the page; from here on the page is never reloaded.
    await page.get_by_role("button", name="Start directive").click()
    await expect(page).to_have_url(directive_url)
    await board.set_marker()
    await expect(page.locator("#live-header .status")).to_contain_text("active")
    await expect(node(page, A).locator(".state")).to_contain_text("running")
    await expect(node(page, B).locator(".state")).to_contain_text("pending")
    await board.screenshot("directive-page.png")

    scenario.release(A)
    await expect(node(page, A).locator(".state")).to_contain_text("passed")
    await expect(node(page, B).locator(".state")).to_contain_text("running")
    scenario.release(B)
    await expect(node(page, B).locator(".state")).to_contain_text("awaiting approval")
    await expect(node(page, C).locator(".state")).to_contain_text("pending")
    # The navigation bar's badge is a live region too: it counts the new approval without a reload.
    await expect(page.locator("#nav-approvals-badge")).to_have_text("1")
    await board.assert_not_reloaded()

    # The step panel opens in place and points to the inbox.
    await node(page, B).click()
    panel = page.locator("#step-panel")
    await expect(panel.get_by_role("heading", level=2)).to_have_text(B)
    await expect(panel).to_contain_text("Waiting for approval")
    await board.assert_not_reloaded()
    await board.screenshot("directive-page-awaiting-approval.png")

    # The approvals inbox: one waits (the nav badge says so); approve it with a note.
    await page.get_by_role("navigation", name="Main").get_by_role("link", name=re.compile("^Approvals")).click()
    await expect(page.locator("#nav-approvals-badge")).to_have_text("1")
    approval = page.locator("article.approval")
    await expect(approval).to_have_count(1)
    await expect(approval.get_by_role("heading", level=2)).to_contain_text(B)
    await expect(approval).to_contain_text("0.65")
    await board.screenshot("inbox.png")
    await approval.get_by_label(re.compile("^Note")).fill("Fine for a first version.")
    await approval.get_by_role("button", name="Approve").click()
    await expect(page.get_by_text(re.compile("^Approved"))).to_be_visible()
    await expect(page.locator("#nav-approvals-badge")).to_have_count(0)
    await expect(page.locator("article.approval")).to_have_count(0)

    # Back to the directive: C runs after the approval, and the directive completes live.
    await page.get_by_role("link", name="Recently answered").click()
    await expect(page.locator("article.approval")).to_contain_text("Fine for a first version.")
    await page.locator("article.approval").get_by_role("link", name="Browser flow").click()
    await expect(page).to_have_url(directive_url)
    await board.set_marker()
    await expect(node(page, B).locator(".state")).to_contain_text("passed")
    await expect(node(page, C).locator(".state")).to_contain_text("running")
    scenario.release(C)
    await expect(node(page, C).locator(".state")).to_contain_text("passed")
    await expect(page.locator("#live-header .status")).to_contain_text("completed")
    await expect(page.locator("#live-header")).to_contain_text("3 of 3 steps done")
    await board.assert_not_reloaded()
    await board.screenshot("directive-page-completed.png")

    assert scenario.executed == [A, B, C]
    assert scenario.evaluations == {A: 1, B: 1, C: 1}
    assert not scenario.unexpected, scenario.unexpected
    assert not daemon.errors, daemon.errors
    await board.assert_clean()
