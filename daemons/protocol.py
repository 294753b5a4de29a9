"""The daemon websocket protocol (``docs/protocol.md``, version 1): error codes,
frame decoding and one schema per daemon → server message type.

Pure functions without database access: the consumer decodes a frame with
:func:`decode_frame`, checks it with :func:`validate_message` and hands the
cleaned payload to a service. Every schema failure names the offending field
(``items[3].seq: must be a positive integer``). Fields a schema does not know
are ignored, so that newer daemons can add fields without breaking older servers.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

PROTOCOL_VERSION = 1
SERVER_VERSION = "0.1.0"


class CloseCode:
    """Websocket close codes the gateway uses."""

    TOO_LARGE = 1009
    INTERNAL_ERROR = 1011
    UNAUTHORIZED = 4401
    REPLACED = 4409


class ErrorCode(StrEnum):
    BAD_JSON = "bad_json"
    UNKNOWN_TYPE = "unknown_type"
    INVALID = "invalid"
    HELLO_REQUIRED = "hello_required"
    NOT_YOUR_TASK = "not_your_task"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"


class ProtocolError(Exception):
    """A message the server refuses; answered with an ``error`` message."""

    def __init__(self, code: ErrorCode, message: str, *, ref: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


def error_message(code: ErrorCode | str, message: str, ref: Any = None) -> dict[str, Any]:
    """The ``error`` message sent to a daemon."""
    return {"type": "error", "code": str(code), "message": message, "ref": ref}


# --------------------------------------------------------------------------- field checks
# A check takes (value, path) and returns the cleaned value or raises Invalid.


class Invalid(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


Check = Callable[[Any, str], Any]
MISSING = object()


def string(*, max_length: int, allow_empty: bool = True, nullable: bool = False) -> Check:
    def check(value: Any, path: str) -> Any:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            raise Invalid(path, "must be a string" + (" or null" if nullable else ""))
        if not allow_empty and not value.strip():
            raise Invalid(path, "must not be empty")
        if len(value) > max_length:
            raise Invalid(path, f"must be at most {max_length} characters")
        return value

    return check


def integer(*, minimum: int | None = None, maximum: int | None = None, nullable: bool = False) -> Check:
    def check(value: Any, path: str) -> Any:
        if value is None and nullable:
            return None
        # bool is an int subclass in Python but not an integer in JSON terms.
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(path, "must be an integer" + (" or null" if nullable else ""))
        if minimum is not None and value < minimum:
            raise Invalid(path, f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise Invalid(path, f"must be at most {maximum}")
        return value

    return check


def number(*, minimum: float | None = None, maximum: float | None = None, nullable: bool = False) -> Check:
    def check(value: Any, path: str) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise Invalid(path, "must be a number" + (" or null" if nullable else ""))
        if minimum is not None and value < minimum:
            raise Invalid(path, f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise Invalid(path, f"must be at most {maximum}")
        return value

    return check


def boolean() -> Check:
    def check(value: Any, path: str) -> Any:
        if not isinstance(value, bool):
            raise Invalid(path, "must be true or false")
        return value

    return check


def uuid_string() -> Check:
    def check(value: Any, path: str) -> Any:
        if not isinstance(value, str):
            raise Invalid(path, "must be a UUID string")
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise Invalid(path, "must be a UUID string") from None

    return check


def one_of(*choices: str) -> Check:
    def check(value: Any, path: str) -> Any:
        if value not in choices:
            raise Invalid(path, f"must be one of {', '.join(choices)}")
        return value

    return check


def list_of(item: Check, *, max_items: int, min_items: int = 0, nullable: bool = False) -> Check:
    def check(value: Any, path: str) -> Any:
        if value is None and nullable:
            return None
        if not isinstance(value, list):
            raise Invalid(path, "must be a list" + (" or null" if nullable else ""))
        if len(value) < min_items:
            raise Invalid(path, f"must hold at least {min_items} item{'s' if min_items != 1 else ''}")
        if len(value) > max_items:
            raise Invalid(path, f"must hold at most {max_items} items")
        return [item(element, f"{path}[{index}]") for index, element in enumerate(value)]

    return check


@dataclass(frozen=True)
class Field:
    check: Check
    required: bool = True
    default: Any = None


def obj(fields: Mapping[str, Field]) -> Check:
    """An object with known fields; unknown fields are dropped."""

    def check(value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise Invalid(path, "must be an object")
        cleaned: dict[str, Any] = {}
        for name, field in fields.items():
            field_path = f"{path}.{name}" if path else name
            raw = value.get(name, MISSING)
            if raw is MISSING:
                if field.required:
                    raise Invalid(field_path, "is required")
                cleaned[name] = field.default() if callable(field.default) else field.default
                continue
            cleaned[name] = field.check(raw, field_path)
        return cleaned

    return check


# --------------------------------------------------------------------------- message schemas

# Limits follow the model columns (a longer value would fail on PostgreSQL) or
# protect the server (list sizes).
MAX_RUNNING_TASKS = 1000
MAX_OUTPUT_ITEMS = 200
MAX_SEQ = 2**31 - 1  # TaskOutput.seq is an integer column
MAX_COST_USD = 99_999_999  # Task.cost_usd: 12 digits, 4 of them decimals
MAX_TEXT = 1_000_000
OUTPUT_STREAMS = ("stdout", "stderr", "agent", "system")
FINISHED_STATUSES = ("done", "failed", "interrupted")

task_ids = list_of(uuid_string(), max_items=MAX_RUNNING_TASKS)

verifier_result = obj(
    {
        "name": Field(string(max_length=500, nullable=True), required=False),
        "command": Field(string(max_length=10_000, nullable=True), required=False),
        "passed": Field(boolean()),
        "exit_code": Field(integer(nullable=True), required=False),
        "duration_s": Field(number(minimum=0, nullable=True), required=False),
        "output_tail": Field(string(max_length=MAX_TEXT, nullable=True), required=False),
    }
)

output_item = obj(
    {
        "seq": Field(integer(minimum=1, maximum=MAX_SEQ)),
        "stream": Field(one_of(*OUTPUT_STREAMS)),
        "content": Field(string(max_length=MAX_TEXT)),
    }
)

SCHEMAS: dict[str, Check] = {
    "hello": obj(
        {
            "protocol": Field(integer()),
            "name": Field(string(max_length=200, allow_empty=False)),
            "hostname": Field(string(max_length=255), required=False, default=""),
            "version": Field(string(max_length=64), required=False, default=""),
            "max_concurrent_tasks": Field(integer(minimum=0, maximum=10_000)),
            "agents": Field(list_of(string(max_length=32, allow_empty=False), max_items=100)),
            "running_tasks": Field(task_ids, required=False, default=list),
        }
    ),
    "ack": obj(
        {
            "command_id": Field(uuid_string()),
            "ok": Field(boolean()),
            "error": Field(string(max_length=10_000, nullable=True), required=False),
        }
    ),
    "heartbeat": obj({"running_tasks": Field(task_ids)}),
    "task_started": obj(
        {
            "task_id": Field(uuid_string()),
            "branch": Field(string(max_length=300, nullable=True), required=False),
            "base_commit": Field(string(max_length=64, nullable=True), required=False),
        }
    ),
    "task_output": obj(
        {
            "task_id": Field(uuid_string()),
            "items": Field(list_of(output_item, max_items=MAX_OUTPUT_ITEMS)),
        }
    ),
    "task_paused": obj(
        {
            "task_id": Field(uuid_string()),
            "question": Field(string(max_length=MAX_TEXT)),
        }
    ),
    "task_progress": obj(
        {
            "task_id": Field(uuid_string()),
            "cost_usd": Field(number(minimum=0, maximum=MAX_COST_USD)),
        }
    ),
    "task_finished": obj(
        {
            "id": Field(string(max_length=200, allow_empty=False)),
            "task_id": Field(uuid_string()),
            "status": Field(one_of(*FINISHED_STATUSES)),
            "exit_code": Field(integer(minimum=-(2**31), maximum=2**31 - 1, nullable=True), required=False),
            "summary": Field(string(max_length=MAX_TEXT, nullable=True), required=False),
            "error": Field(string(max_length=MAX_TEXT, nullable=True), required=False),
            "branch": Field(string(max_length=300, nullable=True), required=False),
            "commit_sha": Field(string(max_length=64, nullable=True), required=False),
            "cost_usd": Field(number(minimum=0, maximum=MAX_COST_USD, nullable=True), required=False),
            "verifier_results": Field(list_of(verifier_result, max_items=1000, nullable=True), required=False),
        }
    ),
}

MESSAGE_TYPES = frozenset(SCHEMAS)


def decode_frame(text: str) -> dict[str, Any]:
    """A frame's JSON object. Raises ``bad_json`` for text that is not JSON and
    ``invalid`` for JSON that is not an object with a string ``type``."""
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(ErrorCode.BAD_JSON, "the frame is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError(ErrorCode.INVALID, "a message must be a JSON object")
    ref = message_ref(message)
    if "type" not in message:
        raise ProtocolError(ErrorCode.INVALID, "type: is required", ref=ref)
    if not isinstance(message["type"], str):
        raise ProtocolError(ErrorCode.INVALID, "type: must be a string", ref=ref)
    return message


def message_ref(message: Any) -> Any:
    """The message's ``id``, echoed as ``ref`` in errors about it."""
    if isinstance(message, dict):
        ref = message.get("id")
        if isinstance(ref, str | int) and not isinstance(ref, bool):
            return ref
    return None


def validate_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """The cleaned payload of a decoded message, by its type's schema."""
    kind = message["type"]
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}", ref=message_ref(message))
    try:
        cleaned = schema(message, "")
    except Invalid as exc:
        raise ProtocolError(ErrorCode.INVALID, str(exc), ref=message_ref(message)) from None
    if kind == "hello" and cleaned["protocol"] != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.INVALID,
            f"protocol: version {cleaned['protocol']} is not supported; this server speaks {PROTOCOL_VERSION}",
            ref=message_ref(message),
        )
    return cleaned


class TokenBucket:
    """A rate limit (of a socket, or of a token): ``burst`` messages at once, refilled at ``rate`` a second."""

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
