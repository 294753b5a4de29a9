"""Frame decoding, message schemas and the rate limiter, without a socket."""

from __future__ import annotations

import uuid

import pytest

from daemons.consumers import allow_rfc_close_codes_in_daphne
from daemons.protocol import ErrorCode, ProtocolError, TokenBucket, decode_frame, validate_message


def test_a_frame_is_decoded_to_its_object():
    assert decode_frame('{"type": "heartbeat", "running_tasks": []}') == {"type": "heartbeat", "running_tasks": []}


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("nope", ErrorCode.BAD_JSON),
        ("[1]", ErrorCode.INVALID),
        ('"hello"', ErrorCode.INVALID),
        ("{}", ErrorCode.INVALID),
    ],
)
def test_a_frame_that_is_not_an_object_with_a_type_is_refused(text, code):
    with pytest.raises(ProtocolError) as excinfo:
        decode_frame(text)
    assert excinfo.value.code == code


def test_validation_normalises_ids_drops_unknown_fields_and_fills_defaults():
    task_id = uuid.uuid4()
    cleaned = validate_message(
        {
            "type": "hello",
            "protocol": 1,
            "name": "box",
            "max_concurrent_tasks": 1,
            "agents": ["scripted"],
            "running_tasks": [str(task_id).upper()],
            "future_field": True,
        }
    )
    assert cleaned == {
        "protocol": 1,
        "name": "box",
        "hostname": "",
        "version": "",
        "max_concurrent_tasks": 1,
        "agents": ["scripted"],
        "running_tasks": [str(task_id)],
    }


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        (
            {"type": "task_progress", "task_id": str(uuid.uuid4()), "cost_usd": float("nan")},
            "cost_usd: must be a number",
        ),
        ({"type": "task_started", "task_id": str(uuid.uuid4()), "branch": "b" * 301}, "branch: must be at most 300"),
        ({"type": "hello", "protocol": 1, "name": " ", "max_concurrent_tasks": 1, "agents": []}, "name: must not be"),
        ({"type": "task_paused", "task_id": str(uuid.uuid4())}, "question: is required"),
        (
            {
                "type": "task_output",
                "task_id": str(uuid.uuid4()),
                "items": [{"seq": 2**31, "stream": "stdout", "content": ""}],
            },
            "items[0].seq: must be at most",
        ),
    ],
)
def test_schema_errors_name_the_field(message, problem):
    with pytest.raises(ProtocolError) as excinfo:
        validate_message(message)
    assert excinfo.value.code == ErrorCode.INVALID
    assert excinfo.value.message.startswith(problem)


def test_the_token_bucket_allows_a_burst_then_refills_at_its_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2, burst=3, clock=lambda: now[0])

    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] += 100
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_daphne_sends_the_protocols_close_codes_as_they_are():
    """autobahn refuses 1009 from applications; daphne would close with 1011 instead."""
    from daphne.ws_protocol import WebSocketProtocol

    allow_rfc_close_codes_in_daphne()
    allow_rfc_close_codes_in_daphne()  # idempotent
    sent: list[tuple[str, int]] = []

    class Socket:
        def sendCloseFrame(self, code, isReply):
            sent.append(("frame", code))

        def sendClose(self, code):
            sent.append(("close", code))

    for code in (1009, 4401, 4409, None):
        WebSocketProtocol.serverClose(Socket(), code=code)

    assert sent == [("frame", 1009), ("close", 4401), ("close", 4409), ("close", 1000)]
