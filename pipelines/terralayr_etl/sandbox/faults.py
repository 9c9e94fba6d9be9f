"""Deterministic fault injection for the sandbox API: the ASGI middleware.

``parse_fault_spec`` turns a spec such as ``"429=0.1,500=0.05,seed=7"`` into a ``FaultPlan``
(``terralayr_etl.sandbox.fault_plan``), and ``FaultMiddleware`` applies the plan to every HTTP
request. docs/faults.md describes each mode and what the pipeline is expected to do about it.

Example:
    plan = parse_fault_spec("429=0.1,truncate=0.05", seed=7)
    app.add_middleware(FaultMiddleware, plan=plan)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import msgspec

from terralayr_etl.sandbox import fault_bodies
from terralayr_etl.sandbox.fault_plan import (
    STATUS_MODES,
    FaultPlan,
    LateCorrections,
    RequestFaults,
    corrected_days_served,
    parse_fault_spec,
)

__all__ = ["FaultMiddleware", "FaultPlan", "LateCorrections", "parse_fault_spec"]

logger = logging.getLogger("terralayr_etl.sandbox.faults")

RETRY_AFTER_SECONDS = 1
DOCUMENTED_AUTHENTICATE_PATH = "/auth/public/authenticate"

_STATUS_ERRORS = {
    "429": (429, "rate_limited", f"too many requests; retry after {RETRY_AFTER_SECONDS} s"),
    "429date": (429, "rate_limited", "too many requests; retry after the time in Retry-After"),
    "500": (500, "internal_error", "the server failed to answer the request"),
    "502": (502, "bad_gateway", "an upstream service sent no valid answer"),
    "503": (503, "service_unavailable", "the service is temporarily unavailable"),
}

# Set when the reset mode cut a response on purpose, for _InjectedResetFilter.
_reset_injected: ContextVar[bool] = ContextVar("reset_injected", default=False)


class _InjectedResetFilter(logging.Filter):
    """Drop uvicorn's error line for a response that the reset mode cut on purpose."""

    # The message uvicorn 0.55 logs on "uvicorn.error" when an ASGI app returns mid-body.
    MESSAGE = "ASGI callable returned without completing response."

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_reset_injected.get() and record.getMessage() == self.MESSAGE)


def _quiet_injected_resets() -> None:
    uvicorn_logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(existing, _InjectedResetFilter) for existing in uvicorn_logger.filters):
        uvicorn_logger.addFilter(_InjectedResetFilter())


def _with_content_length(headers: Sequence[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    kept = [(name, value) for name, value in headers if name.lower() != b"content-length"]
    return [*kept, (b"content-length", str(length).encode())]


async def _send_body(send, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _with_content_length(headers, len(body))})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send, status: int, code: str, message: str, extra_headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = msgspec.json.encode({"error": {"code": code, "message": message}})
    await _send_body(send, status, [(b"content-type", b"application/json"), *extra_headers], body)


def _retry_after_date() -> str:
    # HTTP dates have whole seconds, so round up: the client waits between 1 and 2 s.
    now = datetime.now(UTC)
    target = now.replace(microsecond=0) + timedelta(seconds=RETRY_AFTER_SECONDS + (1 if now.microsecond else 0))
    return format_datetime(target, usegmt=True)


def bearer_token(scope: dict[str, Any]) -> str | None:
    """Return the Bearer token of an ASGI request scope, or None without one."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ResponseRecorder:
    """ASGI ``send`` that stores the response and, with ``forward``, also passes it on."""

    def __init__(self, forward=None):
        self.forward = forward
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))
        if self.forward is not None:
            await self.forward(message)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class FaultMiddleware:
    """Pure ASGI middleware that injects the faults of a FaultPlan into HTTP responses.

    The authenticate endpoint is never faulted, but with ``expiry`` the middleware records
    the tokens it issues and rejects a request whose token is older than the plan's lifetime
    with 401 ``invalid_token``.
    """

    def __init__(self, app, plan: FaultPlan, *, authenticate_path: str = DOCUMENTED_AUTHENTICATE_PATH):
        self.app = app
        self.plan = plan
        self.authenticate_path = authenticate_path
        if "reset" in plan.rates:
            _quiet_injected_resets()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.plan.modes:
            await self.app(scope, receive, send)
            return
        if scope["path"] == self.authenticate_path:
            await self._authenticate(scope, receive, send)
            return

        method = scope["method"]
        path = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        token = bearer_token(scope)
        if token is not None and self.plan.token_expired(token):
            # An expired token is not an attempt, so the drawn faults stay independent of timing.
            self.plan.record("expiry", method, path, query, self.plan.next_attempt(method, path, query))
            lifetime = self.plan.token_lifetime_seconds
            message = f"the access token expired after {lifetime:g} s (sandbox fault: expiry); authenticate again"
            await _send_error(send, 401, "invalid_token", message)
            return

        faults = self.plan.begin_request(method, path, query)
        if faults.failure in STATUS_MODES:
            self.plan.record(faults.failure, method, path, query, faults.attempt)
            await self._send_status_fault(send, faults.failure)
            return
        if faults.failure == "slow":
            self.plan.record("slow", method, path, query, faults.attempt)
            await asyncio.sleep(self.plan.slow_seconds)

        served: list[int] = []
        recorded = False

        async def send_and_record(message) -> None:
            # Count a corrected response before the client can see it, so a caller that reads
            # counts() right after its response never misses it.
            nonlocal recorded
            if served and not recorded and message["type"] == "http.response.start":
                recorded = True
                self.plan.record("corrections", method, path, query, faults.attempt)
            await send(message)

        context_token = corrected_days_served.set(served)
        try:
            if faults.failure in ("reset", "truncate") or faults.content:
                recorder = ResponseRecorder()
                await self.app(scope, receive, recorder)
                await self._send_changed(send_and_record, recorder, faults, method, path, query)
            else:
                await self.app(scope, receive, send_and_record)
        finally:
            corrected_days_served.reset(context_token)
        if served and not recorded:
            self.plan.record("corrections", method, path, query, faults.attempt)

    async def _authenticate(self, scope, receive, send) -> None:
        if self.plan.token_lifetime_seconds is None:
            await self.app(scope, receive, send)
            return
        recorder = ResponseRecorder(forward=send)
        await self.app(scope, receive, recorder)
        if recorder.status != 200:
            return
        try:
            token = msgspec.json.decode(recorder.body).get("access_token")
        except (msgspec.DecodeError, AttributeError):
            return
        if isinstance(token, str):
            self.plan.note_token(token)

    async def _send_status_fault(self, send, mode: str) -> None:
        status, code, message = _STATUS_ERRORS[mode]
        headers: list[tuple[bytes, bytes]] = []
        if mode == "429":
            headers.append((b"retry-after", str(RETRY_AFTER_SECONDS).encode()))
        elif mode == "429date":
            headers.append((b"retry-after", _retry_after_date().encode()))
        await _send_error(send, status, code, f"{message} (sandbox fault: {mode})", headers)

    async def _send_changed(self, send, recorder: ResponseRecorder, faults: RequestFaults, method: str, path: str, query: str) -> None:
        body = recorder.body
        if recorder.status == 200:
            for mode in faults.content:
                changed = self._change_content(mode, body, method, path, query, faults.attempt)
                if changed is not None:
                    body = changed
                    self.plan.record(mode, method, path, query, faults.attempt)

        if faults.failure == "truncate" and recorder.status == 200:
            cut = fault_bodies.truncate(body, 0.1 + 0.8 * self.plan.draw("truncate/cut", method, path, query, faults.attempt))
            if cut is not None:
                body = cut
                self.plan.record("truncate", method, path, query, faults.attempt)
        elif faults.failure == "reset" and body:
            self.plan.record("reset", method, path, query, faults.attempt)
            _reset_injected.set(True)
            await send(
                {
                    "type": "http.response.start",
                    "status": recorder.status,
                    "headers": _with_content_length(recorder.headers, len(body)),
                }
            )
            # Returning before the last body message makes the server close the connection.
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            return

        await _send_body(send, recorder.status, recorder.headers, body)

    def _change_content(self, mode: str, body: bytes, method: str, path: str, query: str, attempt: int) -> bytes | None:
        if mode == "strings":
            return fault_bodies.numbers_as_strings(body)
        choice = self.plan.draw(f"{mode}/choice", method, path, query, attempt)
        if mode == "missing":
            dropped = fault_bodies.drop_category(body, choice)
            if dropped is None:
                return None
            logger.debug("The missing fault dropped %s from %s", dropped[1], path)
            return dropped[0]
        return fault_bodies.add_unknown_category(body, int(choice * 2**32))
