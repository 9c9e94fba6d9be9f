"""API responses with an error status turned into project exceptions.

The API reports errors as ``{"error": {"code": "<snake_case>", "message": "<sentence>"}}``
with the HTTP status. A body of another shape still yields a message from its first characters.
"""

from __future__ import annotations

import json

import httpx

from terralayr_etl.errors import ApiError, RangeTooLargeError

RETRY_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
"""Statuses after which the same request may succeed later."""

MAX_REAUTHENTICATIONS = 3
"""Re-authentications per request before its 401 is reported as an error."""

_MAX_MESSAGE_CHARS = 300

_FIX_BY_STATUS = {
    400: "check the request parameters and the api settings in config/terralayr.toml",
    401: f"the token was rejected even after re-authenticating {MAX_REAUTHENTICATIONS} times; check that TERRALAYR_USERNAME may read this endpoint",
    403: "check that the account in TERRALAYR_USERNAME has access to this resource",
    404: "check the id and the path templates in api.paths of config/terralayr.toml",
}
_DEFAULT_FIX = "check the request and the api settings in config/terralayr.toml"


class TransientResponseError(Exception):
    """A response whose status means the same request may succeed later."""

    def __init__(self, method: str, path: str, status_code: int, server_message: str, retry_after: str | None):
        super().__init__(f"{method} {path} returned HTTP {status_code}: {server_message}")
        self.method = method
        self.path = path
        self.status_code = status_code
        self.server_message = server_message
        self.retry_after = retry_after


def error_details(response: httpx.Response) -> tuple[str | None, str]:
    """Return the error code (None when absent) and message of an error response."""
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = error.get("code")
        message = error.get("message")
        return (str(code) if code is not None else None), _shorten(str(message or response.reason_phrase))

    text = response.content.decode("utf-8", errors="replace")
    return None, _shorten(text) or response.reason_phrase or "no message"


def check_response(method: str, path: str, response: httpx.Response) -> None:
    """Raise the project exception for an error status, or return for a 2xx response.

    Raises TransientResponseError for statuses worth retrying, RangeTooLargeError for a 400
    with code ``range_too_large``, and ApiError for every other status outside 2xx.
    """
    if response.is_success:
        return

    status = response.status_code
    code, message = error_details(response)
    if status in RETRY_STATUS_CODES:
        raise TransientResponseError(method, path, status, message, response.headers.get("Retry-After"))

    if status == 400 and code == "range_too_large":
        raise RangeTooLargeError(
            f"{method} {path} was rejected as too long a range: {message}",
            status_code=status,
            url=path,
        )

    code_part = f" ({code})" if code else ""
    fix = _FIX_BY_STATUS.get(status, _DEFAULT_FIX)
    raise ApiError(
        f"{method} {path} was rejected with HTTP {status}{code_part}: {message}; {fix}",
        status_code=status,
        url=path,
    )


def _shorten(text: str) -> str:
    collapsed = " ".join(text.split())
    if len(collapsed) <= _MAX_MESSAGE_CHARS:
        return collapsed
    return collapsed[:_MAX_MESSAGE_CHARS] + "..."
