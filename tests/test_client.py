"""ApiClient against a real HTTP server on 127.0.0.1: auth, retries, windows and cursors."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from httpcore._backends.sync import SyncStream
from fakeapi import PASSWORD, USERNAME, FakeApi, ScriptedReply, make_credentials, make_settings, serve

from terralayr_etl.timeutil import local_day_of
from terralayr_etl.categories import CATEGORY_NAMES
from terralayr_etl.client import SOCKET_READ_BYTES, ApiClient, RawResponse, _next_cursor
from terralayr_etl.config import Settings
from terralayr_etl.errors import ApiError, AuthenticationError, InvalidEntityIdError, MalformedResponseError
from terralayr_etl.responses import MAX_REAUTHENTICATIONS
from terralayr_etl.retries import parse_retry_after
from terralayr_etl.windows import plan_windows

VA_ID = "38421b10-96fe-569f-8d56-bff0ee2dc95b"
VA_PATH = f"/revenue-reporting/virtual-assets/{VA_ID}/datapoints"
AUTH_PATH = "/auth/public/authenticate"
QUARTER_HOUR = timedelta(minutes=15)
ONE_DAY = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC))


@pytest.fixture(scope="module")
def served_fake() -> Iterator[FakeApi]:
    api = FakeApi()
    with serve(api.app) as base_url:
        api.base_url = base_url
        yield api


@pytest.fixture
def fake(served_fake: FakeApi) -> FakeApi:
    served_fake.reset()
    return served_fake


@pytest.fixture
def client(fake: FakeApi) -> Iterator[ApiClient]:
    with ApiClient(make_settings(fake.base_url), make_credentials()) as api_client:
        yield api_client


def with_api(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"api": settings.api.model_copy(update=changes)})


def timestamps_of(pages: list[RawResponse], category: str = "revenue_wholesale") -> list[datetime]:
    found = []
    for page in pages:
        for point in json.loads(page.body)["data"][category]:
            found.append(datetime.fromisoformat(point["timestamp"]))
    return found


def quarter_hours(start: datetime, end: datetime) -> list[datetime]:
    return [start + QUARTER_HOUR * index for index in range(int((end - start) / QUARTER_HOUR))]


def run_concurrently(count: int, call: Callable[[], Any]) -> list[Any]:
    barrier = threading.Barrier(count)

    def start_together() -> Any:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(start_together) for _ in range(count)]
        return [future.result(timeout=30) for future in futures]


def fetch_one_day(api_client: ApiClient) -> list[RawResponse]:
    return api_client.fetch_datapoints("virtual_asset", VA_ID, "15min", *ONE_DAY)


def request_gap_seconds(fake: FakeApi, path: str) -> float:
    first, second = fake.requests_to(path)[:2]
    return second.received_at - first.received_at


# Authentication


def test_client_reuses_token_across_requests(fake: FakeApi, client: ApiClient) -> None:
    for _ in range(5):
        fetch_one_day(client)

    headers = {recorded.authorization for recorded in fake.requests_to(VA_PATH)}
    assert fake.authentications == 1
    assert client.stats.authentications == 1
    assert len(headers) == 1


def test_client_token_expiry_reauthenticates_once_for_8_threads(fake: FakeApi) -> None:
    fake.token_lifetime_seconds = 2
    settings = with_api(make_settings(fake.base_url), token_refresh_margin_seconds=0)

    with ApiClient(settings, make_credentials()) as api_client:
        fetch_one_day(api_client)
        time.sleep(2.2)
        results = run_concurrently(8, lambda: fetch_one_day(api_client))

    assert all(len(pages) == 1 for pages in results)
    assert fake.authentications == 2
    assert api_client.stats.authentications == 2
    # The client renews before the server's expiry, so no request was sent with an expired token.
    assert len(fake.requests_to(VA_PATH)) == 9


def test_client_401_on_data_request_reauthenticates_once(fake: FakeApi, client: ApiClient) -> None:
    fetch_one_day(client)
    fake.revoke_tokens()

    results = run_concurrently(8, lambda: fetch_one_day(client))

    assert all(len(pages) == 1 for pages in results)
    assert fake.authentications == 2
    assert client.stats.authentications == 2


def test_client_second_401_reauthenticates_again(fake: FakeApi, client: ApiClient) -> None:
    # A server that ends tokens early can reject the new token too when the request queues.
    fetch_one_day(client)
    fake.script(VA_PATH, ScriptedReply(401), ScriptedReply(401))

    pages = fetch_one_day(client)

    assert len(pages) == 1
    assert fake.authentications == 3
    assert len(fake.requests_to(VA_PATH)) == 4


def test_client_repeated_401_raises_api_error(fake: FakeApi, client: ApiClient) -> None:
    fetch_one_day(client)
    fake.script(VA_PATH, *[ScriptedReply(401)] * (MAX_REAUTHENTICATIONS + 1))

    with pytest.raises(ApiError) as raised:
        fetch_one_day(client)

    assert raised.value.status_code == 401
    assert f"re-authenticating {MAX_REAUTHENTICATIONS} times" in str(raised.value)
    assert fake.authentications == 1 + MAX_REAUTHENTICATIONS
    assert len(fake.requests_to(VA_PATH)) == 1 + 1 + MAX_REAUTHENTICATIONS


def test_client_wrong_password_raises_authentication_error(fake: FakeApi, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong_password = "wrong-secret-7f3a1c"

    with ApiClient(make_settings(fake.base_url), make_credentials(wrong_password)) as api_client:
        with pytest.raises(AuthenticationError) as raised:
            fetch_one_day(api_client)

    message = str(raised.value)
    assert USERNAME in message
    assert fake.base_url in message
    assert "TERRALAYR_USERNAME" in message
    assert "TERRALAYR_PASSWORD" in message
    assert wrong_password not in message
    assert wrong_password not in caplog.text
    assert len(fake.requests_to(AUTH_PATH)) == 1
    assert fake.requests_to(VA_PATH) == []


def test_client_logs_no_token_or_password(fake: FakeApi, client: ApiClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    fetch_one_day(client)
    fake.revoke_tokens()
    fetch_one_day(client)

    tokens = {recorded.authorization.removeprefix("Bearer ") for recorded in fake.requests_to(VA_PATH)}
    assert len(tokens) == 2
    for token in tokens:
        assert token not in caplog.text
    assert PASSWORD not in caplog.text


def test_client_authenticate_503_is_retried(fake: FakeApi, client: ApiClient) -> None:
    fake.script(AUTH_PATH, ScriptedReply(503))

    pages = fetch_one_day(client)

    assert len(timestamps_of(pages)) == 96
    assert client.stats.retries == 1
    assert fake.authentications == 1


# Retries


def test_client_429_waits_retry_after_seconds(fake: FakeApi, client: ApiClient) -> None:
    fake.script(VA_PATH, ScriptedReply(429, {"Retry-After": "2"}))

    pages = fetch_one_day(client)

    assert len(timestamps_of(pages)) == 96
    assert request_gap_seconds(fake, VA_PATH) >= 2.0
    assert client.stats.retries == 1


def test_client_429_waits_retry_after_http_date(fake: FakeApi, client: ApiClient) -> None:
    # HTTP dates have whole seconds, so the requested wait is between 1 and 2 s from now.
    retry_at = datetime.fromtimestamp(math.ceil(time.time()) + 1, UTC)
    fake.script(VA_PATH, ScriptedReply(429, {"Retry-After": format_datetime(retry_at, usegmt=True)}))

    fetch_one_day(client)

    assert request_gap_seconds(fake, VA_PATH) >= 0.9
    assert client.stats.retries == 1


def test_client_caps_long_retry_after(fake: FakeApi, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="terralayr_etl.client")
    fake.script(VA_PATH, ScriptedReply(429, {"Retry-After": "3600"}))
    settings = make_settings(fake.base_url, max_retry_after_seconds=0.3)

    with ApiClient(settings, make_credentials()) as api_client:
        started = time.monotonic()
        fetch_one_day(api_client)
        elapsed = time.monotonic() - started

    assert 0.3 <= elapsed < 5
    assert api_client.stats.retry_after_capped == 1
    capped = [record.getMessage() for record in caplog.records if "max_retry_after_seconds" in record.getMessage()]
    assert len(capped) == 1
    assert VA_PATH in capped[0]
    assert "3600 s" in capped[0]


@pytest.mark.parametrize(
    ("header", "expected_seconds"),
    [
        ("2", 2.0),
        (" 0.5 ", 0.5),
        ("-3", 0.0),
        ("Mon, 01 Jan 2024 12:00:30 GMT", 30.0),
        ("Mon, 01 Jan 2024 11:59:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after_seconds_and_dates(header: str | None, expected_seconds: float | None) -> None:
    now = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)

    assert parse_retry_after(header, now) == expected_seconds


def test_client_retry_after_past_total_timeout(fake: FakeApi) -> None:
    fake.script(VA_PATH, ScriptedReply(503, {"Retry-After": "3"}))
    settings = make_settings(fake.base_url, total_timeout_seconds=1.0)

    with ApiClient(settings, make_credentials()) as api_client:
        started = time.monotonic()
        with pytest.raises(ApiError) as raised:
            fetch_one_day(api_client)
        elapsed = time.monotonic() - started

    assert raised.value.status_code == 503
    assert "after 1 attempt " in str(raised.value)
    assert elapsed < 1.0
    assert len(fake.requests_to(VA_PATH)) == 1


def test_client_retries_500_and_503(fake: FakeApi, client: ApiClient) -> None:
    fake.script(VA_PATH, ScriptedReply(500), ScriptedReply(503))

    pages = fetch_one_day(client)

    assert timestamps_of(pages) == quarter_hours(*ONE_DAY)
    assert client.stats.retries == 2
    assert len(fake.requests_to(VA_PATH)) == 3


def test_client_retries_cut_off_body(fake: FakeApi, client: ApiClient) -> None:
    fake.script(VA_PATH, ScriptedReply(cut_off=True))

    pages = fetch_one_day(client)

    assert timestamps_of(pages) == quarter_hours(*ONE_DAY)
    assert client.stats.retries == 1
    assert len(fake.requests_to(VA_PATH)) == 2


def test_client_gives_up_after_configured_attempts(fake: FakeApi) -> None:
    fake.script(VA_PATH, *[ScriptedReply(503)] * 3)

    with ApiClient(make_settings(fake.base_url, attempts=3), make_credentials()) as api_client:
        with pytest.raises(ApiError) as raised:
            fetch_one_day(api_client)

    assert raised.value.status_code == 503
    assert VA_PATH in str(raised.value)
    assert "after 3 attempts" in str(raised.value)
    assert "retry.attempts" in str(raised.value)
    assert len(fake.requests_to(VA_PATH)) == 3


def test_client_404_is_not_retried(fake: FakeApi, client: ApiClient) -> None:
    fake.script(VA_PATH, ScriptedReply(404))

    with pytest.raises(ApiError) as raised:
        fetch_one_day(client)

    assert raised.value.status_code == 404
    assert "scripted HTTP 404" in str(raised.value)
    assert len(fake.requests_to(VA_PATH)) == 1
    assert client.stats.retries == 0


def test_client_connection_refused_raises_api_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    settings = make_settings(f"http://127.0.0.1:{port}", attempts=2)

    with ApiClient(settings, make_credentials()) as api_client:
        with pytest.raises(ApiError) as raised:
            fetch_one_day(api_client)

    assert "ConnectError" in str(raised.value)
    assert "after 2 attempts" in str(raised.value)
    assert PASSWORD not in str(raised.value)
    assert api_client.stats.retries == 1


def test_client_bounds_requests_in_flight(fake: FakeApi) -> None:
    fake.delay_seconds = 0.1
    settings = with_api(make_settings(fake.base_url), max_concurrency=2)

    with ApiClient(settings, make_credentials()) as api_client:
        run_concurrently(6, lambda: fetch_one_day(api_client))

    assert fake.max_in_flight == 2


def test_client_reads_in_large_chunks(
    fake: FakeApi, client: ApiClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """httpcore has no setting for its read size, so client.py sets the class attribute its
    HTTP/1.1 connections read. If httpcore stopped reading it, this test would see 64 KiB reads."""
    requested_sizes: list[int] = []
    original_read = SyncStream.read

    def recording_read(stream: SyncStream, max_bytes: int, timeout: float | None = None) -> bytes:
        requested_sizes.append(max_bytes)
        return original_read(stream, max_bytes, timeout)

    monkeypatch.setattr(SyncStream, "read", recording_read)
    start = datetime(2024, 3, 1, tzinfo=UTC)
    categories = CATEGORY_NAMES[:20]
    pages = client.fetch_datapoints("virtual_asset", VA_ID, "15min", start, start + timedelta(days=7), categories)

    assert sum(len(page.body) for page in pages) > 4 * 64 * 1024
    assert requested_sizes
    assert set(requested_sizes) == {SOCKET_READ_BYTES}


# Windows and cursors


def test_client_20_days_in_7_day_windows_exact(fake: FakeApi, client: ApiClient) -> None:
    windows = plan_windows("15min", date(2024, 10, 20), date(2024, 11, 9), client.settings)

    pages = [page for window in windows for page in client.fetch_datapoints("virtual_asset", VA_ID, "15min", *window)]

    found = timestamps_of(pages)
    expected = quarter_hours(datetime(2024, 10, 19, 22, tzinfo=UTC), datetime(2024, 11, 8, 23, tzinfo=UTC))
    assert len(expected) == 20 * 96 + 4
    assert sorted(found) == expected
    assert len(found) == len(set(found))
    assert client.stats.windows_split == 0
    for recorded in fake.requests_to(VA_PATH):
        first = local_day_of(datetime.fromisoformat(recorded.params["start"]))
        last = local_day_of(datetime.fromisoformat(recorded.params["end"]))
        assert (last - first).days + 1 <= 7


def test_client_halves_windows_server_rejects(fake: FakeApi, client: ApiClient) -> None:
    fake.max_range_days = 3
    windows = plan_windows("15min", date(2024, 10, 20), date(2024, 11, 9), client.settings)

    pages = [page for window in windows for page in client.fetch_datapoints("virtual_asset", VA_ID, "15min", *window)]

    found = timestamps_of(pages)
    expected = quarter_hours(datetime(2024, 10, 19, 22, tzinfo=UTC), datetime(2024, 11, 8, 23, tzinfo=UTC))
    assert sorted(found) == expected
    assert len(found) == len(set(found))
    assert client.stats.windows_split > 0
    for page in pages:
        assert page.window_end - page.window_start <= timedelta(days=3)
        assert timestamps_of([page]) == quarter_hours(page.window_start, page.window_end)


def test_client_follows_cursor_to_last_page(fake: FakeApi, client: ApiClient) -> None:
    fake.page_max_points = 100
    window = (datetime(2024, 1, 7, 23, tzinfo=UTC), datetime(2024, 1, 14, 23, tzinfo=UTC))

    pages = client.fetch_datapoints("virtual_asset", VA_ID, "15min", *window)

    assert len(pages) == math.ceil(7 * 96 / 100)
    assert timestamps_of(pages) == quarter_hours(*window)
    assert "cursor" not in pages[0].params
    assert [page.params.get("cursor") for page in pages[1:]] == [str(100 * index) for index in range(1, len(pages))]
    assert all((page.window_start, page.window_end) == window for page in pages)
    assert all(page.endpoint == VA_PATH for page in pages)


@pytest.mark.parametrize(
    "body",
    [
        '{"data":{},"nextCursor":null}',
        '{"data": {},\n  "nextCursor" : null\n}\n',
        '{"nextCursor":null}',
        '{"data":{},"nextCursor":"200"}',
        '{"data":{},"nextCursor":7}',
        '{"data":{"nextCursor":null},"nextCursor":"300"}',
        '{"nextCursor":"400","data":{"a":{"nextCursor":null}}}',
        '{"nextCursor":"500","x\\"nextCursor":null}',
        '{"nextCursor":"600","nextCursor":null}',
        '{"data":{},"metaData":[]}',
    ],
)
def test_next_cursor_agrees_with_a_full_parse(body: str) -> None:
    expected = json.loads(body).get("nextCursor")

    cursor = _next_cursor(VA_PATH, {}, body.encode())

    assert cursor == (None if expected is None else str(expected))


def test_next_cursor_null_ending_skips_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the body was parsed")

    monkeypatch.setattr("terralayr_etl.client.msgspec.json.decode", no_parse)

    assert _next_cursor(VA_PATH, {}, b'{"data":{"revenue_fcr":[]},"metaData":[],"nextCursor":null}') is None
    with pytest.raises(AssertionError, match="parsed"):
        _next_cursor(VA_PATH, {}, b'{"data":{},"nextCursor":"200"}')


@pytest.mark.parametrize("body", ['{"data":{},"nextCursor":"2', "<html>busy</html>", '["nextCursor", null]'])
def test_next_cursor_rejects_a_body_without_an_object(body: str) -> None:
    with pytest.raises(MalformedResponseError, match="nextCursor a string or null"):
        _next_cursor(VA_PATH, {}, body.encode())


def test_client_sends_categories_and_resolution(fake: FakeApi, client: ApiClient) -> None:
    portfolio_id = "e98432cc-fa6c-53c4-ad5b-0ac76728ab06"
    categories = ["revenue_fcr", "capacity_fcr"]

    pages = client.fetch_datapoints("portfolio", portfolio_id, "hourly", *ONE_DAY, categories=categories)

    sent = pages[0].params
    assert sent["datapoints"] == "revenue_fcr,capacity_fcr"
    assert sent["resolution"] == "hourly"
    assert sent["start"] == "2024-01-01T00:00:00Z"
    assert sent["end"] == "2024-01-01T23:45:00Z"
    assert pages[0].endpoint == f"/revenue-reporting/portfolios/{portfolio_id}/datapoints"
    assert set(json.loads(pages[0].body)["data"]) == {"revenue_fcr", "capacity_fcr"}


def test_client_rejects_unsafe_entity_id_before_request(fake: FakeApi, client: ApiClient) -> None:
    with pytest.raises(InvalidEntityIdError):
        client.fetch_datapoints("virtual_asset", "../organisations", "15min", *ONE_DAY)

    assert fake.requests == []


# Virtual assets and revenue buckets


def test_client_lists_virtual_assets_with_explicit_window(fake: FakeApi, client: ApiClient) -> None:
    assets = client.list_virtual_assets(*ONE_DAY)

    recorded = fake.requests_to(f"/organisations/{make_credentials().organisation_id}/virtual-assets")
    assert assets == fake.virtual_assets_body
    assert recorded[0].params == {"start": "2024-01-01T00:00:00Z", "end": "2024-01-02T00:00:00Z"}


def test_client_virtual_assets_object_body_is_malformed(fake: FakeApi, client: ApiClient) -> None:
    fake.virtual_assets_body = {"items": []}

    with pytest.raises(MalformedResponseError, match="not an array of objects"):
        client.list_virtual_assets(*ONE_DAY)


def test_client_fetches_revenue_buckets_with_exclusive_end(fake: FakeApi, client: ApiClient) -> None:
    start, end = datetime(2024, 10, 25, 22, tzinfo=UTC), datetime(2024, 10, 28, 23, tzinfo=UTC)

    response = client.fetch_revenue_buckets(VA_ID, "tolling", start, end)

    buckets = json.loads(response.body)
    assert response.endpoint == f"/revenue-reporting/{VA_ID}/tolling"
    assert response.params == {"start": "2024-10-25T22:00:00Z", "end": "2024-10-28T23:00:00Z"}
    assert [bucket["start"] for bucket in buckets] == [
        "2024-10-25T22:00:00Z",
        "2024-10-26T22:00:00Z",
        "2024-10-27T23:00:00Z",
    ]
