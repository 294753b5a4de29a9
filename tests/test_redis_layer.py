"""The Redis channel layer with makima's settings: an idle receive waits, it
does not fail (redis-py's default 5 s read timeout equals channels_redis's
5 s BZPOPMIN wait, which used to drop every socket idle for 5 s with 1011)."""

from __future__ import annotations

import asyncio

import pytest
from channels.layers import get_channel_layer
from django.conf import settings

pytestmark = pytest.mark.skipif(not settings.REDIS_URL, reason="needs REDIS_URL (runs in the PostgreSQL + Redis pass)")


async def test_a_receive_idle_for_longer_than_the_blocking_wait_keeps_waiting_and_then_gets_its_message():
    layer = get_channel_layer()
    channel = await layer.new_channel()

    async def send_later() -> None:
        await asyncio.sleep(7)  # longer than channels_redis's 5 s BZPOPMIN
        await layer.send(channel, {"type": "late.message"})

    sender = asyncio.create_task(send_later())
    message = await asyncio.wait_for(layer.receive(channel), timeout=15)
    await sender

    assert message == {"type": "late.message"}
