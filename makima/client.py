"""A small client of the makima REST API, on ``urllib`` from the standard library.

It never imports Django or the server's modules: the ``makima`` command line
uses it on worker machines that have neither the server's settings nor its
database.

It rides out a short outage of the server (a deploy, a restarted daphne, a
proxy answering 502/503/504 meanwhile) by retrying: see ``Client.request``.
"""

from __future__ import annotations

import errno
import http.client
import json
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

API_PREFIX = "/api/v1"
# Lists are read in pages of this many rows (the server's maximum).
PAGE_SIZE = 500

#: Seconds the client keeps retrying while the server is unavailable (0: never retry).
DEFAULT_RETRY_FOR = 60.0
RETRY_FIRST_DELAY = 0.5
RETRY_MAX_DELAY = 5.0
#: A ``Retry-After`` is honoured but never below this, so that a proxy that
#: always says 0 is not hammered for the whole budget.
RETRY_MIN_DELAY = 0.1
#: Methods whose repetition does not change the outcome: retried even when the
#: server may have applied the first attempt (read timeout, 504, dropped connection).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
#: Answers of a server (or its proxy) that is restarting.
UNAVAILABLE_STATUSES = frozenset({502, 503, 504})
#: Connection errors raised before the request reached the server.
NOT_SENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


class ApiError(Exception):
    """The server answered with an error status.

    ``detail`` is the server's explanation; ``errors`` holds the field errors
    of a 400 (``{field: [messages]}``), when the server sent any.
    """

    def __init__(self, status: int, detail: str, errors: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.errors = errors or {}


class Unreachable(Exception):
    """No answer from the server: refused connection, unknown host, timeout."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


class Transient(Exception):
    """A failure that may pass if the request is sent again (internal to ``Client``).

    ``sent`` is False when the request certainly did not reach the server, so
    that sending it again is safe whatever its method."""

    def __init__(self, error: ApiError | Unreachable, *, sent: bool, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.sent = sent
        self.retry_after = retry_after

    def describe(self) -> str:
        if isinstance(self.error, ApiError):
            status = self.error.status
            return f"{status} {http.client.responses.get(status, 'error')}"
        return self.error.reason


class Client:
    """JSON over HTTP with ``Authorization: Bearer <api_key>``.

    ``retry_for`` is how many seconds ``request`` keeps retrying while the
    server is unavailable (0: never); ``notify`` is told, in one line, about
    each retry. ``sleep`` and ``clock`` are there for tests."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        retry_for: float = DEFAULT_RETRY_FOR,
        notify: Callable[[str], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retry_for = retry_for
        self.notify = notify
        self.sleep = sleep
        self.clock = clock

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        """Send a request to ``/api/v1{path}``; return the decoded JSON answer
        (``None`` for an empty one). Raises ``ApiError`` or ``Unreachable``.

        While the server is unavailable the request is sent again, after 0.5 s,
        1 s, 2 s, … (at most 5 s, each ±25 % so that many agents do not come
        back at once; a 503's ``Retry-After`` in seconds instead, at least
        0.1 s), for up to
        ``retry_for`` seconds from the first attempt; then the last error is
        raised. (An attempt under way when the budget runs out still gets its
        full ``timeout``.) What is retried:

        - a refused connection, an unreachable host or network, a temporary DNS
          failure, a connection timeout: the request never reached the server,
          so any method;
        - 502 and 503, any method too: a proxy answers them when it could not
          hand the request to the server (down, restarting); makima's API
          itself never answers them. The rare 502 of a server that died
          mid-request is the accepted risk;
        - 504, a read timeout, a connection dropped before the answer: the
          server may have applied the request, so only the idempotent methods
          (GET, HEAD, OPTIONS, PUT, DELETE), never POST or PATCH.

        Other answers (4xx included: 429 too) are never retried.
        """
        url = f"{self.base_url}{API_PREFIX}{path}"
        if query:
            url = f"{url}?{urllib.parse.urlencode(query)}"
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        start = self.clock()
        attempt = 0
        while True:
            request = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                return self.send(request)
            except Transient as transient:
                delay = self.retry_delay(method, transient, attempt, start)
                if delay is None:
                    raise transient.error from None
                if self.notify is not None:
                    self.notify(f"server unavailable ({transient.describe()}), retrying in {delay:.1f} s")
                self.sleep(delay)
                attempt += 1

    def retry_delay(self, method: str, transient: Transient, attempt: int, start: float) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` to give up."""
        if transient.sent and method.upper() not in IDEMPOTENT_METHODS:
            return None
        remaining = start + self.retry_for - self.clock()
        if remaining <= 0:
            return None
        if transient.retry_after is not None:
            delay = max(transient.retry_after, RETRY_MIN_DELAY)
        else:
            delay = min(RETRY_FIRST_DELAY * 2**attempt * random.uniform(0.75, 1.25), RETRY_MAX_DELAY)
        return min(delay, remaining)

    def send(self, request: urllib.request.Request) -> Any:
        """One attempt. Raises ``ApiError`` or ``Unreachable``, or ``Transient``
        wrapping one of them when another attempt may succeed."""
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            error = error_from_response(exc.code, exc.read())
            if exc.code not in UNAVAILABLE_STATUSES:
                raise error from None
            retry_after = retry_after_seconds(exc.headers.get("Retry-After")) if exc.code == 503 else None
            raise Transient(error, sent=exc.code == 504, retry_after=retry_after) from None
        except urllib.error.URLError as exc:
            # urllib wraps in URLError what fails while connecting and sending;
            # what fails after (waiting for, reading the answer) comes bare.
            reason = exc.reason
            error = self.unreachable(reason)
            if not_sent(reason):
                raise Transient(error, sent=False) from None
            if isinstance(reason, ConnectionError):  # reset or closed while sending
                raise Transient(error, sent=True) from None
            raise error from None  # an unknown host, a certificate refused: not an outage
        except (OSError, http.client.IncompleteRead) as exc:
            raise Transient(self.unreachable(exc), sent=True) from None
        except http.client.HTTPException as exc:  # not an HTTP server
            raise self.unreachable(exc) from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(status, f"the answer is not JSON: is {self.base_url} a makima server?") from None

    def unreachable(self, reason: object) -> Unreachable:
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {self.timeout:g} s"
        return Unreachable(self.base_url, str(reason) or type(reason).__name__)

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def get_all(self, path: str, **query: Any) -> list[Any]:
        """Every row of a paginated list (``{"results", "next", …}``), page by page.

        Pages are asked for by number rather than by following ``next``, whose
        host may be wrong behind a proxy."""
        rows: list[Any] = []
        page = 1
        while True:
            answer = self.get(path, **query, page=page, page_size=PAGE_SIZE)
            if not isinstance(answer, dict):  # an unpaginated list
                return rows + list(answer or [])
            rows.extend(answer.get("results", []))
            if not answer.get("next"):
                return rows
            page += 1


def not_sent(reason: object) -> bool:
    """Whether a connection error shows that the request never reached the server."""
    if isinstance(reason, socket.gaierror):
        return reason.errno == socket.EAI_AGAIN  # an unknown host is a mistake, not an outage
    if isinstance(reason, TimeoutError):
        return True  # while connecting (or sending a body the server was not reading)
    return isinstance(reason, OSError) and reason.errno in NOT_SENT_ERRNOS


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` given in seconds; ``None`` when absent or an HTTP date."""
    try:
        seconds = float(value or "")
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds != float("inf") else None


def error_from_response(status: int, raw: bytes) -> ApiError:
    """An ``ApiError`` from an error answer: the server's JSON ``{"detail",
    "errors"}`` when it sent one, else the start of whatever it sent."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        errors = payload.get("errors")
        detail = payload.get("detail")
        return ApiError(
            status,
            str(detail) if detail else json.dumps(payload),
            errors if isinstance(errors, dict) else None,
        )
    return ApiError(status, text[:300] or "(empty answer)")
