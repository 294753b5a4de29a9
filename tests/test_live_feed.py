"""State changes are pushed to the directive's channel-layer group after commit.

These tests commit for real (``transaction=True``): the push happens when the
outermost transaction commits, which a test wrapped in one never does."""

from __future__ import annotations

import asyncio

import pytest
from channels.layers import get_channel_layer
from django.db import transaction

from directives.models import Directive
from directives.services import directive_group, directive_start
from makima.state import Actor
from tests.factories import make_directive, make_steps


@pytest.fixture
def listener():
    """A channel-layer consumer stand-in, on one event loop of its own (the
    Redis layer binds its receive queues to the loop that first used them)."""
    layer = get_channel_layer()
    loop = asyncio.new_event_loop()
    channel = loop.run_until_complete(layer.new_channel())

    def join(directive_id):
        loop.run_until_complete(layer.group_add(directive_group(directive_id), channel))

    def receive_all():
        messages = []
        while True:
            try:
                messages.append(loop.run_until_complete(asyncio.wait_for(layer.receive(channel), timeout=0.3)))
            except TimeoutError:
                return messages

    yield join, receive_all
    loop.close()


pytestmark = pytest.mark.django_db(transaction=True)


def test_a_transition_is_pushed_to_the_directive_group_after_commit(alice, listener):
    join, receive_all = listener
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"})
    join(directive.pk)

    with transaction.atomic():
        directive_start(directive=directive, actor=Actor.for_user(alice))
        assert receive_all() == []  # nothing before the commit

    events = [event for m in receive_all() for event in m["events"]]
    assert any(e["event_type"] == "directive_active" and e["data"]["to"] == Directive.Status.ACTIVE for e in events)
    assert all(e["directive"] == str(directive.pk) for e in events)


def test_steps_added_in_a_batch_are_pushed_too(alice, listener):
    join, receive_all = listener
    directive = make_directive(alice)
    join(directive.pk)

    make_steps(directive, {"name": "A"}, {"name": "B", "depends_on": ["A"]})

    events = [event for m in receive_all() for event in m["events"]]
    added = [e["data"]["name"] for e in events if e["event_type"] == "step_added"]
    assert sorted(added) == ["A", "B"]


def test_one_transaction_sends_one_message_per_directive(alice, listener):
    join, receive_all = listener
    directive = make_directive(alice)
    join(directive.pk)

    make_steps(directive, {"name": "A"}, {"name": "B"}, {"name": "C"})  # one transaction

    messages = receive_all()
    assert len(messages) == 1
    assert messages[0]["type"] == "directive.events"
    assert sorted(e["data"]["name"] for e in messages[0]["events"] if e["event_type"] == "step_added") == [
        "A",
        "B",
        "C",
    ]


def test_a_rolled_back_change_is_not_pushed(alice, listener):
    join, receive_all = listener
    directive = make_directive(alice)
    join(directive.pk)

    with pytest.raises(RuntimeError), transaction.atomic():
        make_steps(directive, {"name": "A"})
        raise RuntimeError("changed my mind")
    make_steps(directive, {"name": "B"})

    events = [event for m in receive_all() for event in m["events"]]
    assert [e["data"]["name"] for e in events if e["event_type"] == "step_added"] == ["B"]


def test_events_of_a_block_are_held_and_pushed_together_when_it_ends(alice, listener):
    from directives.services import events_pushed_at_the_end, step_transition

    join, receive_all = listener
    directive = make_directive(alice)
    [step] = make_steps(directive, {"name": "A"})
    join(directive.pk)

    with events_pushed_at_the_end():
        directive_start(directive=directive, actor=Actor.for_user(alice))  # commits several transactions
        with transaction.atomic():
            step_transition(step=Directive.objects.get().steps.get(pk=step.pk), to="skipped")
        assert receive_all() == []  # committed, and held

    [message] = receive_all()
    kinds = [event["event_type"] for event in message["events"]]
    assert "directive_active" in kinds and "step_skipped" in kinds


def test_a_failing_block_still_pushes_what_it_committed(alice, listener):
    from directives.services import events_pushed_at_the_end

    join, receive_all = listener
    directive = make_directive(alice)
    make_steps(directive, {"name": "A"})
    join(directive.pk)

    with pytest.raises(RuntimeError), events_pushed_at_the_end():
        directive_start(directive=directive, actor=Actor.for_user(alice))
        raise RuntimeError("after the commit")

    events = [event for m in receive_all() for event in m["events"]]
    assert "directive_active" in [e["event_type"] for e in events]


def test_a_start_through_the_api_queues_the_spawn_before_it_pushes_the_live_feed(alice, listener):
    from django.db.models.signals import post_save
    from rest_framework.test import APIClient

    from daemons.models import Daemon, DaemonCommand
    from tests.factories import make_daemon, make_token

    join, receive_all = listener
    daemon = make_daemon(alice, name="box")
    Daemon.objects.filter(pk=daemon.pk).update(
        status=Daemon.Status.CONNECTED, connection_id="c", capabilities=["scripted"], max_concurrent_tasks=4
    )
    directive = make_directive(alice, agent="scripted")
    make_steps(directive, {"name": "A"})
    join(directive.pk)
    order: list[str] = []
    layer = get_channel_layer()
    original = layer.group_send

    async def group_send(group, message):
        order.append(message["type"])
        return await original(group, message)

    def command_saved(sender, instance, created, **kwargs):
        if created:
            order.append(instance.command_type)

    layer.group_send = group_send
    post_save.connect(command_saved, sender=DaemonCommand)
    try:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {make_token(alice).plain}")
        assert client.post(f"/api/v1/directives/{directive.pk}/start/").status_code == 200
    finally:
        layer.group_send = original
        post_save.disconnect(command_saved, sender=DaemonCommand)
    # The spawn is queued and its daemon woken before the one push of the request's events.
    assert order == ["spawn_task", "outbox.wake", "directive.events"]
    kinds = [event["event_type"] for m in receive_all() for event in m["events"]]
    assert {"directive_active", "task_starting", "command_queued"} <= set(kinds)
