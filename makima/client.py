"""A small client of the makima REST API, on ``urllib`` from the standard library.

It never imports Django or the server's modules: the ``makima`` command line
uses it on worker machines that have neither the server's settings nor its
database.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

API_PREFIX = "/api/v1"
# Lists are read in pages of this many rows (the server's maximum).
PAGE_SIZE = 500


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


class Client:
    """JSON over HTTP with ``Authorization: Bearer <api_key>``."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        """Send one request to ``/api/v1{path}``; return the decoded JSON answer
        (``None`` for an empty one). Raises ``ApiError`` or ``Unreachable``."""
        url = f"{self.base_url}{API_PREFIX}{path}"
        if query:
            url = f"{url}?{urllib.parse.urlencode(query)}"
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            raise error_from_response(exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                reason = f"no answer within {self.timeout:g} s"
            raise Unreachable(self.base_url, str(reason)) from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(status, f"the answer is not JSON: is {self.base_url} a makima server?") from None

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
