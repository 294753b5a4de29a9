"""Agent and user text is shown as text: payloads in a directive's title, a
step's name, a task's output lines and an evaluation's feedback render
verbatim in the step graph, the step panel and the output, and never run."""

from __future__ import annotations

import pytest
from playwright.async_api import expect

from tests.browser.helpers import node
from tests.browser.scenario import Scenario

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SCRIPT = "<script>window.__xss=1</script>"
IMG = "<img src=x onerror=window.__xss=1>"
ATTRIBUTE = '"><svg onload=window.__xss=1>'
FIRST = f"Fetch {SCRIPT}"
SECOND = f"Render {ATTRIBUTE}"


async def test_payloads_in_names_and_output_render_as_text_and_never_run(dashboard, rest, start_daemon):
    board = dashboard
    page = board.page
    scenario = Scenario(output=["plain line", SCRIPT, IMG, ATTRIBUTE], feedback=f"Looks fine {IMG}")
    await start_daemon(scenario)
    directive = await rest(
        "POST",
        "/api/v1/directives/",
        {
            "title": f"Escape {IMG}",
            "goal": f"Show {SCRIPT} as text.",
            "acceptance_criteria": ["Nothing runs"],
            "repository_url": "/srv/repos/xss.git",
            "agent": "scripted",
            "evaluation_mode": "agent",
            "autonomy_level": "guided",
        },
    )
    await rest(
        "POST",
        f"/api/v1/directives/{directive['id']}/steps/batch/",
        {
            "steps": [
                {"name": FIRST, "task_plan": "Fetch it.", "order_index": 0},
                {"name": SECOND, "task_plan": "Render it.", "depends_on": [FIRST], "order_index": 1},
            ]
        },
    )

    await board.sign_in()
    await page.goto(f"/directives/{directive['id']}/")
    await board.set_marker()
    await expect(page.get_by_role("heading", level=1)).to_have_text(f"Escape {IMG}")

    await rest("POST", f"/api/v1/directives/{directive['id']}/start/")
    first = node(page, FIRST)
    await expect(first.locator(".state")).to_contain_text("running")
    await expect(first.locator("title")).to_have_text(f"{FIRST}: running")

    # The panel opens in place and polls the running task's output.
    await first.click()
    panel = page.locator("#step-panel")
    await expect(panel.get_by_role("heading", level=2)).to_have_text(FIRST)
    output = panel.locator(".output").first
    await expect(output.locator(".line")).to_have_text(["plain line", SCRIPT, IMG, ATTRIBUTE])
    await board.screenshot("xss-output.png")

    scenario.release(FIRST)
    second = node(page, SECOND)
    await expect(second.locator(".state")).to_contain_text("running")
    scenario.release(SECOND)
    await expect(page.locator("#live-header .status")).to_contain_text("completed")
    await expect(node(page, FIRST).locator("title")).to_have_text(f"{FIRST}: passed")
    await expect(node(page, SECOND).locator("title")).to_have_text(f"{SECOND}: passed")

    # The finished task keeps its output, still as text.
    await expect(panel.locator(".output").first.locator(".line")).to_have_text(["plain line", SCRIPT, IMG, ATTRIBUTE])
    await expect(panel.locator(".evaluation").first).to_contain_text(f"Looks fine {IMG}")
    await board.assert_not_reloaded()

    # None of the payloads became an element.
    assert await page.locator("img[src='x']").count() == 0
    assert await page.locator("svg[onload]").count() == 0
    assert await page.locator("#directive-page script").count() == 0
    assert not scenario.unexpected, scenario.unexpected
    await board.assert_clean()
