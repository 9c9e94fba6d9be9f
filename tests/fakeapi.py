"""A scriptable fake of the terralayr API for client tests, served by uvicorn on 127.0.0.1.

It serves the paths of ``config/terralayr.toml`` with simple data: data points carry one
value per period of the requested resolution, and the value is the period's index within
the request. Tests change its limits through attributes and queue scripted replies (an
error status, a ``Retry-After`` header, a body cut off mid-way) that a path sends before
its normal handling.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from terralayr_etl.config import Credentials, Settings, load_settings
from terralayr_etl.timeutil import QUARTER_HOUR, isoformat_z, local_day_of, local_midnight

USERNAME = "analyst@example.test"
PASSWORD = "fake-password-4f9c"
ORGANISATION_ID = "0107bfa9-7682-551c-90f0-69e878587d78"

PERIOD_BY_RESOLUTION = {"raw": QUARTER_HOUR, "15min": QUARTER_HOUR, "hourly": timedelta(hours=1)}


@dataclass
class ScriptedReply:
    """A reply a path sends once, before its normal handling."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    cut_off: bool = False
    """Send half the normal body under a Content-Length of the whole, then drop the connection."""


@dataclass
class RecordedRequest:
    method: str
    path: str
    params: dict[str, str]
    authorization: str | None
    received_at: float
    """``time.monotonic()`` when the request arrived."""


class _CutOffBody(Exception):
    """Raised inside the ASGI app so that uvicorn drops the connection mid-body."""


class _CutOffResponse(Response):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = str(len(self.body)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": self.status_code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", declared)],
            }
        )
        await send({"type": "http.response.body", "body": self.body[: len(self.body) // 2], "more_body": True})
        raise _CutOffBody("scripted cut-off body")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class FakeApi:
    """The fake's state and Starlette app. Attributes may be changed while it serves."""

    def __init__(self) -> None:
        self.base_url = ""
        self._lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/auth/public/authenticate", self._authenticate, methods=["POST"]),
                Route("/organisations/{organisation_id}/virtual-assets", self._virtual_assets),
                Route("/revenue-reporting/{kind}/{entity_id}/datapoints", self._datapoints),
                Route("/revenue-reporting/{virtual_asset_id}/{product}", self._revenue_buckets),
            ]
        )
        self.reset()

    def reset(self) -> None:
        """Restore the default limits and forget tokens, scripts and recorded requests."""
        with self._lock:
            self.token_lifetime_seconds: float = 3600
            self.max_range_days: float = 7
            """Longest accepted ``end - start`` of a data-point request, in elapsed days."""
            self.page_max_points: int = 100_000
            self.delay_seconds: float = 0.0
            """Delay in seconds before each data-point response."""
            self.virtual_assets_body: Any = [
                {"id": "38421b10-96fe-569f-8d56-bff0ee2dc95b", "portfolioID": "e98432cc-fa6c-53c4-ad5b-0ac76728ab06"}
            ]
            self._tokens: dict[str, float] = {}
            self._scripts: dict[str, deque[ScriptedReply]] = {}
            self.requests: list[RecordedRequest] = []
            self.authentications = 0
            self.in_flight = 0
            self.max_in_flight = 0

    def script(self, path: str, *replies: ScriptedReply) -> None:
        """Queue replies that ``path`` sends, one per request, before its normal handling."""
        with self._lock:
            self._scripts.setdefault(path, deque()).extend(replies)

    def revoke_tokens(self) -> None:
        """Forget every issued token, as a server restart would."""
        with self._lock:
            self._tokens.clear()

    def requests_to(self, path: str) -> list[RecordedRequest]:
        with self._lock:
            return [recorded for recorded in self.requests if recorded.path == path]

    async def _authenticate(self, request: Request) -> Response:
        scripted = self._record_and_script(request, b"")
        if scripted is not None:
            return scripted
        body = await request.json()
        if body.get("username") != USERNAME or body.get("password") != PASSWORD:
            return _error(401, "invalid_credentials", "username or password is not correct")

        token = f"token-{uuid.uuid4().hex}"
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_lifetime_seconds
            self.authentications += 1
        payload = {
            "access_token": token,
            "expires_in": self.token_lifetime_seconds,
            "id_token": "id",
            "refresh_token": "refresh",
            "scope": "read",
            "token_type": "Bearer",
        }
        return JSONResponse(payload)

    async def _virtual_assets(self, request: Request) -> Response:
        return self._handle(request, lambda: JSONResponse(self.virtual_assets_body))

    async def _datapoints(self, request: Request) -> Response:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_seconds)
            return self._handle(request, lambda: self._datapoints_body(request))
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _revenue_buckets(self, request: Request) -> Response:
        return self._handle(request, lambda: self._buckets_body(request))

    def _handle(self, request: Request, build: Any) -> Response:
        """Record the request, then send a scripted reply, a 401 or the normal response."""
        rejection = self._check_token(request)
        response = rejection or build()
        scripted = self._record_and_script(request, response.body)
        if scripted is not None:
            return scripted
        return response

    def _record_and_script(self, request: Request, normal_body: bytes) -> Response | None:
        with self._lock:
            self.requests.append(
                RecordedRequest(
                    request.method,
                    request.url.path,
                    dict(request.query_params),
                    request.headers.get("authorization"),
                    time.monotonic(),
                )
            )
            queue = self._scripts.get(request.url.path)
            reply = queue.popleft() if queue else None
        if reply is None:
            return None
        if reply.cut_off:
            return _CutOffResponse(normal_body, status_code=200)
        return _error(reply.status, "scripted", f"scripted HTTP {reply.status}", reply.headers)

    def _check_token(self, request: Request) -> Response | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        with self._lock:
            expiry = self._tokens.get(token)
        if scheme != "Bearer" or expiry is None or time.monotonic() >= expiry:
            return _error(401, "invalid_token", "the access token is unknown or expired; authenticate again")
        return None

    def _datapoints_body(self, request: Request) -> Response:
        query = request.query_params
        start = datetime.fromisoformat(query["start"])
        end = datetime.fromisoformat(query["end"])
        # Like the sandbox, the limit counts the local delivery days the inclusive range touches.
        days = (local_day_of(end) - local_day_of(start)).days + 1
        if days > self.max_range_days:
            message = f"the range touches {days} delivery days; at most {self.max_range_days:g} are allowed"
            return _error(400, "range_too_large", message)
        period = PERIOD_BY_RESOLUTION.get(query.get("resolution", ""))
        if period is None:
            message = f"resolution {query.get('resolution')!r} is not served by the fake"
            return _error(400, "invalid_resolution", message)

        categories = query.get("datapoints", "revenue_wholesale").split(",")
        count = int((end - start) / period) + 1
        offset = int(query.get("cursor", "0"))
        stop = min(offset + self.page_max_points, count)
        points = [{"timestamp": isoformat_z(start + period * index), "value": index} for index in range(offset, stop)]
        payload = {
            "data": {category: points for category in categories},
            "metaData": [{"dataPointName": category, "unit": "EUR"} for category in categories],
            "nextCursor": str(stop) if stop < count else None,
        }
        return JSONResponse(payload)

    def _buckets_body(self, request: Request) -> Response:
        start = datetime.fromisoformat(request.query_params["start"])
        end = datetime.fromisoformat(request.query_params["end"])
        buckets = []
        day: date = local_day_of(start)
        while local_midnight(day) < end:
            if local_midnight(day) >= start:
                bucket_end = local_midnight(day + timedelta(days=1))
                bucket = {
                    "start": isoformat_z(local_midnight(day)),
                    "end": isoformat_z(bucket_end),
                    "revenue": 1.5,
                    "currency": "EUR",
                }
                buckets.append(bucket)
            day += timedelta(days=1)
        return JSONResponse(buckets)


@contextmanager
def serve(app: Starlette) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread on a free 127.0.0.1 port; yield its URL."""
    # IPPROTO_TCP is explicit because asyncio turns on TCP_NODELAY only for sockets whose
    # proto is IPPROTO_TCP; with proto 0 every keep-alive reply waits about 40 ms for an ACK.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # log_config=None leaves the logging setup to pytest; the cut-off replies raise inside
    # the app on purpose, so uvicorn's error log is silenced.
    config = uvicorn.Config(app, log_config=None, log_level="critical", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()

    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fake API server did not start within 10 s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


def make_settings(base_url: str, **retry_overrides: float) -> Settings:
    """Return the project settings pointed at ``base_url``, with retry waits short enough for tests."""
    settings = load_settings(base_url=base_url)
    retry = {
        "wait_initial_seconds": 0.01,
        "wait_max_seconds": 0.05,
        "wait_jitter_seconds": 0.01,
        "max_retry_after_seconds": 5.0,
        "total_timeout_seconds": 30.0,
        **retry_overrides,
    }
    return settings.model_copy(update={"retry": settings.retry.model_copy(update=retry)})


def make_credentials(password: str = PASSWORD) -> Credentials:
    return Credentials(username=USERNAME, password=password, organisation_id=ORGANISATION_ID)
