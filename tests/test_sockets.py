"""A frame sent after the peer closed is dropped: daphne's transport raises
``Disconnected`` then, which used to end the consumer with a traceback (seen
when a flooding daemon closed while its answers were still being sent)."""

from __future__ import annotations

from typing import Any

import pytest
from autobahn.exception import Disconnected

from daemons.consumers import DaemonConsumer
from directives.consumers import DirectiveLiveConsumer


@pytest.mark.parametrize("consumer_class", [DaemonConsumer, DirectiveLiveConsumer])
async def test_a_frame_sent_after_the_peer_went_away_is_dropped_and_no_more_are_tried(consumer_class):
    consumer = consumer_class()
    tried: list[dict[str, Any]] = []

    async def closed_transport(message: dict[str, Any]) -> None:
        tried.append(message)
        raise Disconnected("Attempt to send on a closed protocol")

    consumer.base_send = closed_transport
    await consumer.send_json({"type": "error", "code": "rate_limited"})
    await consumer.send_json({"type": "error", "code": "rate_limited"})

    assert consumer.peer_gone
    assert len(tried) == 1


async def test_other_send_failures_are_not_hidden():
    consumer = DaemonConsumer()

    async def broken(message: dict[str, Any]) -> None:
        raise RuntimeError("a bug")

    consumer.base_send = broken
    with pytest.raises(RuntimeError):
        await consumer.send_json({"type": "welcome"})
    assert not consumer.peer_gone


async def test_the_daemon_gateway_answers_through_the_same_guard():
    consumer = DaemonConsumer()
    tried: list[dict[str, Any]] = []

    async def closed_transport(message: dict[str, Any]) -> None:
        tried.append(message)
        raise Disconnected("Attempt to send on a closed protocol")

    consumer.base_send = closed_transport
    await consumer._error("rate_limited", "too many messages; this one was dropped")
    assert consumer.peer_gone and len(tried) == 1
