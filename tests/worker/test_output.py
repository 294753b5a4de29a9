"""Output batching (seq, limits, flushing), the progress throttle and frame fitting."""

from __future__ import annotations

import asyncio
import json

from makima.worker.output import (
    MAX_FRAME_BYTES,
    OutputBatcher,
    Throttle,
    clip,
    fit_report,
    frame_size,
)

TASK = "6f1c2b8e-0000-4000-8000-000000000001"


class Wire:
    """A fake connection: records what was sent; ``up`` decides whether sending works."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.up = True

    async def send(self, message: dict) -> bool:
        if not self.up:
            return False
        self.messages.append(json.loads(json.dumps(message)))
        return True

    @property
    def items(self) -> list[dict]:
        return [item for m in self.messages for item in m["items"]]


async def test_seq_starts_at_one_and_grows_by_one_across_batches():
    wire = Wire()
    batcher = OutputBatcher(TASK, wire.send, max_items=3)
    for n in range(7):
        batcher.add("stdout", f"line {n}")
    await batcher.close()

    assert [m["type"] for m in wire.messages] == ["task_output"] * 3
    assert {m["task_id"] for m in wire.messages} == {TASK}
    assert [len(m["items"]) for m in wire.messages] == [3, 3, 1]
    assert [i["seq"] for i in wire.items] == list(range(1, 8))
    assert [i["content"] for i in wire.items] == [f"line {n}" for n in range(7)]


async def test_a_batch_holds_at_most_200_items_and_64_kib():
    wire = Wire()
    batcher = OutputBatcher(TASK, wire.send)
    for _ in range(450):
        batcher.add("stdout", "x")
    for _ in range(10):
        batcher.add("stderr", "y" * 10_000)
    await batcher.close()

    assert max(len(m["items"]) for m in wire.messages) == 200
    for message in wire.messages:
        assert sum(len(i["content"].encode()) for i in message["items"]) <= 64 * 1024
    assert len(wire.items) == 460
    assert [i["seq"] for i in wire.items] == list(range(1, 461))


async def test_a_full_batch_goes_out_at_once_and_a_partial_one_after_the_interval():
    wire = Wire()
    batcher = OutputBatcher(TASK, wire.send, max_items=5, interval_s=0.3)
    pump = asyncio.create_task(batcher.run())
    try:
        for n in range(5):
            batcher.add("stdout", str(n))
        await asyncio.sleep(0.05)
        assert len(wire.items) == 5  # full: sent without waiting for the interval

        batcher.add("stdout", "lonely")
        await asyncio.sleep(0.05)
        assert len(wire.items) == 5  # not yet
        await asyncio.sleep(0.4)
        assert [i["content"] for i in wire.items][-1] == "lonely"
    finally:
        await batcher.close()
        pump.cancel()


async def test_close_flushes_everything_pending():
    wire = Wire()
    batcher = OutputBatcher(TASK, wire.send, interval_s=60)
    pump = asyncio.create_task(batcher.run())
    batcher.add("stdout", "a")
    batcher.add("stdout", "b")

    assert await batcher.close() is True
    await asyncio.wait_for(pump, 1)

    assert [i["content"] for i in wire.items] == ["a", "b"]
    assert not batcher.pending


async def test_lines_that_could_not_be_sent_stay_pending_and_go_out_later_with_their_seq():
    wire = Wire()
    batcher = OutputBatcher(TASK, wire.send)
    batcher.add("stdout", "before")
    await batcher.flush()
    wire.up = False
    batcher.add("stdout", "during")

    assert await batcher.close() is False
    assert len(batcher.pending) == 1

    wire.up = True
    assert await batcher.flush() is True
    assert [(i["seq"], i["content"]) for i in wire.items] == [(1, "before"), (2, "during")]


async def test_the_backlog_while_disconnected_is_bounded_keeping_the_newest_lines():
    wire = Wire()
    wire.up = False
    batcher = OutputBatcher(TASK, wire.send, max_backlog_bytes=1000)
    for n in range(100):
        batcher.add("stdout", f"{n:019d}")  # 19 bytes each

    assert batcher.pending_bytes <= 1000
    wire.up = True
    await batcher.flush()
    assert wire.items[-1]["seq"] == 100
    assert len(wire.items) < 100


async def test_streams_map_to_the_servers_and_text_is_made_storable():
    wire = Wire()
    batcher = OutputBatcher(TASK, wire.send, max_line_bytes=100)
    batcher.add("assistant", "thinking")
    batcher.add("tool", "Bash ls")
    batcher.add("weird", "?")
    batcher.add("stderr", "nul\x00byte and a lone \udc80 surrogate")
    batcher.add("stdout", "é" * 500)
    await batcher.close()

    assert [i["stream"] for i in wire.items] == ["agent", "agent", "system", "stderr", "stdout"]
    assert "\x00" not in wire.items[3]["content"]
    wire.items[3]["content"].encode("utf-8")  # no lone surrogate left
    long = wire.items[4]["content"]
    assert long.startswith("é" * 50) and "more bytes" in long
    assert len(long.encode()) < 200


async def test_progress_goes_out_at_most_once_per_interval_and_the_latest_value_wins():
    sent: list[float] = []

    async def send(value: float) -> None:
        sent.append(value)

    throttle = Throttle(send, interval_s=0.3)
    throttle.update(0.01)
    await asyncio.sleep(0.05)
    for value in (0.02, 0.03, 0.04):
        throttle.update(value)
    await asyncio.sleep(0.1)
    assert sent == [0.01]
    await asyncio.sleep(0.35)
    assert sent == [0.01, 0.04]
    throttle.update(0.04)  # unchanged: nothing new to say
    await asyncio.sleep(0.4)
    assert sent == [0.01, 0.04]
    throttle.cancel()


def test_clip_keeps_the_requested_end_and_says_how_much_went():
    text = "a" * 50 + "b" * 50
    assert clip(text, 1000) == text
    head = clip(text, 60, keep="head")
    tail = clip(text, 60, keep="tail")
    assert len(head) <= 60 and head.startswith("aaa") and "cut" in head
    assert len(tail) <= 60 and tail.endswith("bbb") and "cut" in tail
    assert clip(None) is None


def test_a_huge_report_is_fitted_under_the_frame_limit():
    report = {
        "type": "task_finished",
        "id": "r",
        "task_id": TASK,
        "status": "failed",
        "summary": "s" * 3_000_000,
        "error": "e" * 3_000_000 + "THE END",
        "verifier_results": [
            {"name": f"v{n}", "command": "pytest", "passed": False, "output_tail": "o" * 50_000} for n in range(300)
        ],
    }

    fitted = fit_report(report)

    assert frame_size(fitted) < MAX_FRAME_BYTES
    assert fitted["error"].endswith("THE END")
    assert len(fitted["verifier_results"]) == 300
    assert fitted["status"] == "failed"
