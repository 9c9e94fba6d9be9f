"""The terralayr API client: one pooled ``httpx.Client`` shared by the fetch threads.

Authentication lives in ``terralayr_etl.auth``, the retry rules in ``terralayr_etl.retries``
and window planning in ``terralayr_etl.windows``. This module sends the requests, follows
continuation cursors and halves windows the API rejects as too long.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx
import msgspec
import stamina
from httpcore._sync.http11 import HTTP11Connection

from terralayr_etl import __version__
from terralayr_etl.auth import BearerTokenAuth
from terralayr_etl.config import ENTITY_TYPES, Credentials, Settings
from terralayr_etl.errors import ApiError, ConfigError, MalformedResponseError, RangeTooLargeError
from terralayr_etl.fetch_stats import FetchStats
from terralayr_etl.ids import validate_entity_id
from terralayr_etl.responses import TransientResponseError, check_response
from terralayr_etl.retries import RetryPolicy, describe_failure
from terralayr_etl.timeutil import isoformat_z, split_window
from terralayr_etl.windows import datapoint_request_range, plan_bucket_windows, plan_windows

__all__ = ["REVENUE_PRODUCTS", "ApiClient", "FetchStats", "RawResponse", "plan_bucket_windows", "plan_windows"]

logger = logging.getLogger("terralayr_etl.client")

SOCKET_READ_BYTES = 1024 * 1024
"""Bytes each read of a response requests from the socket, in place of httpcore's 64 KiB.

A response body of 1 to 2 MB took 16 to 32 reads, each through h11's Python code. Fetching the
90-day benchmark's 726 windows (746 MB) from a sandbox on 127.0.0.1 used 1.63 to 1.75 CPU
seconds in the client with 64 KiB reads and 1.14 to 1.17 with 1 MiB (docs/benchmarks.md). httpcore has no setting
for it, so this sets the class attribute its HTTP/1.1 connections read, for every synchronous
httpx client in the process. ``tests/test_client.py`` checks that httpcore still reads it.
"""
HTTP11Connection.READ_NUM_BYTES = SOCKET_READ_BYTES

REVENUE_PRODUCTS = ("wholesale", "ancillary", "tolling", "vba")
"""Products with a revenue-bucket endpoint; the names match ``api.paths.revenue_<product>``."""


@dataclass(frozen=True)
class RawResponse:
    """One response body as the API sent it, with the request that produced it."""

    body: bytes
    endpoint: str
    """Request path without the query string."""
    params: dict[str, str]
    window_start: datetime
    """Start of the half-open UTC window this response covers, after any halving."""
    window_end: datetime
    fetched_at: datetime


class _PageInfo(msgspec.Struct):
    nextCursor: str | int | None = None  # noqa: N815 (the API's field name)


class ApiClient:
    """Synchronous, thread-safe client of the terralayr API.

    All threads share one pooled ``httpx.Client``. At most ``api.max_concurrency`` requests
    are in flight at once, and a request waiting for a retry does not hold a slot.

    Example::

        with ApiClient(load_settings(), load_credentials()) as client:
            pages = client.fetch_datapoints("virtual_asset", va_id, "15min", start, end)
    """

    def __init__(self, settings: Settings, credentials: Credentials, *, transport: httpx.BaseTransport | None = None):
        self.settings = settings
        self.stats = FetchStats()
        self._credentials = credentials
        api = settings.api
        self._request_slots = threading.BoundedSemaphore(api.max_concurrency)
        auth = BearerTokenAuth(
            base_url=api.base_url,
            authenticate_path=api.paths.authenticate,
            credentials=credentials,
            refresh_margin_seconds=api.token_refresh_margin_seconds,
            stats=self.stats,
        )
        self._http = httpx.Client(
            base_url=api.base_url,
            auth=auth,
            timeout=httpx.Timeout(api.timeout_seconds, connect=api.connect_timeout_seconds),
            limits=httpx.Limits(max_connections=api.max_concurrency, max_keepalive_connections=api.max_concurrency),
            headers={"Accept": "application/json", "User-Agent": f"terralayr-etl/{__version__}"},
            transport=transport,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the pooled connections."""
        self._http.close()

    def list_virtual_assets(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Return the organisation's virtual assets whose lifetime overlaps ``[start, end]``.

        Both bounds are always sent, because without them the API uses a window from the
        previous day through one year ahead.
        """
        _check_window(start, end)
        path = self.settings.api.paths.virtual_assets.format(organisation_id=self._credentials.organisation_id)
        parameters = self.settings.api.parameters
        params = {parameters.start: isoformat_z(start), parameters.end: isoformat_z(end)}
        response = self._get(path, params)
        return _json_array_of_objects(path, params, response.content)

    def verify_access(self, day_start: datetime, day_end: datetime) -> int:
        """Authenticate and list the organisation's virtual assets in ``[day_start, day_end]``.

        A cheap call that fails early with AuthenticationError for wrong credentials or
        ApiError for a wrong organisation id or an unreachable API. Returns the asset count.
        """
        return len(self.list_virtual_assets(day_start, day_end))

    def fetch_datapoints(
        self,
        entity_type: str,
        entity_id: str,
        resolution: str,
        start: datetime,
        end: datetime,
        categories: Sequence[str] | None = None,
    ) -> list[RawResponse]:
        """Fetch the data points of one entity in the planned window ``[start, end)``.

        Follows ``nextCursor`` until it is null. When the API rejects the window as too long,
        halves it at a quarter-hour boundary and fetches each half the same way. Returns every
        page's body in time order.
        """
        entity_id = validate_entity_id(entity_id, what=f"{entity_type} id")
        path = self._datapoints_path(entity_type, entity_id)
        _check_window(start, end)

        parameters = self.settings.api.parameters
        fixed_params = {parameters.resolution: self._resolution_token(resolution)}
        if categories:
            fixed_params[parameters.datapoints] = ",".join(categories)
        return self._fetch_window(path, fixed_params, start, end, f"{entity_type} {entity_id}")

    def fetch_revenue_buckets(self, virtual_asset_id: str, product: str, start: datetime, end: datetime) -> RawResponse:
        """Fetch the daily revenue buckets of one product whose start lies in ``[start, end)``."""
        virtual_asset_id = validate_entity_id(virtual_asset_id, what="virtual asset id")
        if product not in REVENUE_PRODUCTS:
            raise ValueError(f"unknown revenue product {product!r}; use one of {list(REVENUE_PRODUCTS)}")
        _check_window(start, end)

        path = self.settings.api.paths.revenue(product).format(virtual_asset_id=virtual_asset_id)
        parameters = self.settings.api.parameters
        # Buckets are selected by their start in [start, end), so the end is sent unchanged.
        params = {parameters.start: isoformat_z(start), parameters.end: isoformat_z(end)}
        response = self._get(path, params)
        _json_array_of_objects(path, params, response.content)
        return RawResponse(response.content, path, params, start, end, datetime.now(UTC))

    def _datapoints_path(self, entity_type: str, entity_id: str) -> str:
        if entity_type not in ENTITY_TYPES:
            raise ValueError(f"unknown entity type {entity_type!r}; use one of {list(ENTITY_TYPES)}")
        return self.settings.api.paths.datapoints(entity_type).format(entity_id=entity_id)

    def _resolution_token(self, resolution: str) -> str:
        try:
            return self.settings.api.resolutions[resolution]
        except KeyError:
            raise ConfigError(
                f"resolution {resolution!r} has no token in api.resolutions "
                f"(configured: {sorted(self.settings.api.resolutions)}); add it to config/terralayr.toml"
            ) from None

    def _fetch_window(
        self, path: str, fixed_params: dict[str, str], start: datetime, end: datetime, entity: str
    ) -> list[RawResponse]:
        try:
            return self._fetch_pages(path, fixed_params, start, end)
        except RangeTooLargeError as exc:
            try:
                first, second = split_window(start, end)
            except ValueError:
                raise RangeTooLargeError(
                    f"{exc}; the window {isoformat_z(start)} to {isoformat_z(end)} for {entity} is one "
                    "quarter-hour and cannot be split further, so check the API's range limit",
                    status_code=exc.status_code,
                    url=exc.url,
                ) from None

        self.stats.add("windows_split")
        logger.info(
            "API rejected the window %s to %s for %s as too long; fetching it as two halves split at %s",
            isoformat_z(start),
            isoformat_z(end),
            entity,
            isoformat_z(first[1]),
        )
        return self._fetch_window(path, fixed_params, *first, entity) + self._fetch_window(
            path, fixed_params, *second, entity
        )

    def _fetch_pages(
        self, path: str, fixed_params: dict[str, str], start: datetime, end: datetime
    ) -> list[RawResponse]:
        parameters = self.settings.api.parameters
        request_start, request_end = datapoint_request_range(start, end, self.settings)
        params = {
            parameters.start: isoformat_z(request_start),
            parameters.end: isoformat_z(request_end),
            **fixed_params,
        }

        pages: list[RawResponse] = []
        seen_cursors: set[str] = set()
        page_params = params
        while True:
            response = self._get(path, page_params)
            pages.append(RawResponse(response.content, path, page_params, start, end, datetime.now(UTC)))

            cursor = _next_cursor(path, page_params, response.content)
            if cursor is None:
                return pages
            if cursor in seen_cursors:
                raise MalformedResponseError(
                    f"GET {path} returned the continuation cursor {cursor!r} a second time, so paging would "
                    "never end; check that the server at api.base_url implements the cursor contract",
                    body=response.content,
                    endpoint=path,
                    params=page_params,
                )
            seen_cursors.add(cursor)
            page_params = {**params, parameters.cursor: cursor}

    def _get(self, path: str, params: dict[str, str]) -> httpx.Response:
        """Send a GET with retries, and return the 2xx response or raise a project error."""
        retry = self.settings.retry
        policy = RetryPolicy(retry, self.stats, "GET", path)
        try:
            # The policy returns every wait itself, so stamina's own backoff settings are unused.
            attempts = stamina.retry_context(on=policy, attempts=retry.attempts, timeout=retry.total_timeout_seconds)
            for attempt in attempts:
                with attempt:
                    return self._send_once(path, params)
        except TransientResponseError as exc:
            raise ApiError(
                f"{exc.method} {exc.path} failed with HTTP {exc.status_code} after "
                f"{_attempts(policy.attempts_made)} in {policy.elapsed_seconds():.1f} s: {exc.server_message}; "
                f"{_fix_for_status(exc.status_code)}",
                status_code=exc.status_code,
                url=path,
            ) from None
        except httpx.HTTPError as exc:
            # Raised from None: the httpx exception references the request, and the request
            # that failed may be the authenticate call with the password in its body.
            raise ApiError(
                f"GET {path} failed after {_attempts(policy.attempts_made)} in {policy.elapsed_seconds():.1f} s "
                f"({describe_failure(exc, path)}); check that {self.settings.api.base_url} is reachable, "
                "or raise api.timeout_seconds or retry.attempts",
                url=path,
            ) from None
        raise AssertionError("stamina.retry_context ended without an attempt")

    def _send_once(self, path: str, params: dict[str, str]) -> httpx.Response:
        with self._request_slots:
            self.stats.add("requests")
            response = self._http.get(path, params=params)
        check_response("GET", path, response)
        return response


def _check_window(start: datetime, end: datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError(f"window bounds must be timezone-aware UTC datetimes, got {start!r} and {end!r}")
    if end <= start:
        raise ValueError(f"window end {end.isoformat()} must be after its start {start.isoformat()}")


def _attempts(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


def _fix_for_status(status_code: int) -> str:
    if status_code == 429:
        return "the API is rate-limiting this client; lower api.max_concurrency or retry later"
    return "the API is unavailable; retry later, or raise retry.attempts or retry.total_timeout_seconds"


# A body whose last member is "nextCursor": null has no next page. In valid JSON those bytes
# at the end can only be the last member of the top-level object: the quote before the key
# follows "{" or ",", so it opens a string, and the quote after it closes one. Matching them
# spares a second parse of the whole body (0.4 CPU seconds for W1's 746 MB). Any other body
# is decoded in full. Either way the normaliser decodes and checks the whole body later.
_NULL_CURSOR_AT_END = re.compile(rb'[{,][ \t\r\n]*"nextCursor"[ \t\r\n]*:[ \t\r\n]*null[ \t\r\n]*}[ \t\r\n]*\Z')
_CURSOR_TAIL_BYTES = 64


def _next_cursor(path: str, params: dict[str, str], body: bytes) -> str | None:
    if _NULL_CURSOR_AT_END.search(body, max(0, len(body) - _CURSOR_TAIL_BYTES)):
        return None
    try:
        page = msgspec.json.decode(body, type=_PageInfo)
    except msgspec.DecodeError as exc:
        raise MalformedResponseError(
            f"GET {path} returned a body that is not a JSON object with nextCursor a string or null ({exc}); "
            "check that api.base_url points at the terralayr API",
            body=body,
            endpoint=path,
            params=params,
        ) from None
    if page.nextCursor is None:
        return None
    return str(page.nextCursor)


def _json_array_of_objects(path: str, params: dict[str, str], body: bytes) -> list[dict[str, Any]]:
    try:
        items = json.loads(body)
    except ValueError as exc:
        raise MalformedResponseError(
            f"GET {path} returned a body that is not valid JSON ({exc}); "
            "check that api.base_url points at the terralayr API",
            body=body,
            endpoint=path,
            params=params,
        ) from None
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise MalformedResponseError(
            f"GET {path} returned JSON that is not an array of objects (got {type(items).__name__}); "
            "check that api.base_url points at the terralayr API",
            body=body,
            endpoint=path,
            params=params,
        )
    return items
