"""Small inputs that must behave: DST days, boundary conflicts, timestamp forms, value types,
token expiry, Retry-After, cut-off bodies and late corrections.

Hand-built bodies go through the normaliser, the Parquet store and the DuckDB warehouse. Cases
that need HTTP run against the sandbox's small organisation or a scripted app on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import msgspec
import pytest
from fakeapi import serve
from robust_support import (
    PASSWORD,
    VA_LARGE,
    VA_SMALL,
    Reply,
    SmallOrg,
    apply_env,
    datapoints_path,
    issued_tokens,
    pipeline_env,
    serve_small_org,
    write_small_org,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from terralayr_etl.boundaries import resolve_outside_rows
from terralayr_etl.client import ApiClient
from terralayr_etl.config import Credentials, load_settings
from terralayr_etl.errors import MalformedResponseError
from terralayr_etl.fetching import fetch_window
from terralayr_etl import flows
from terralayr_etl.flows import run_nightly
from terralayr_etl.models import run_checks, run_models
from terralayr_etl.normalise import normalise_datapoints
from terralayr_etl.pipeline import FetchJob
from terralayr_etl.storage import ParquetStore
from terralayr_etl.timeutil import LOCAL_TZ, QUARTER_HOUR, isoformat_z, local_midnight
from terralayr_etl.warehouse import Warehouse
from terralayr_etl.windows import plan_windows

FETCHED_AT = datetime(2025, 11, 1, tzinfo=UTC)
ENDPOINT = f"/revenue-reporting/virtual-assets/{VA_SMALL}/datapoints"


def _body(points: list[tuple[str, object]], category: str = "revenue_wholesale") -> bytes:
    data = {category: [{"timestamp": timestamp, "value": value} for timestamp, value in points]}
    return msgspec.json.encode({"data": data, "metaData": [{"dataPointName": category, "unit": "EUR"}], "nextCursor": None})


def _normalise(body: bytes, resolution: str = "15min"):
    return normalise_datapoints(
        body,
        entity_type="virtual_asset",
        entity_id=VA_SMALL,
        resolution=resolution,
        run_id="small-inputs",
        fetched_at=FETCHED_AT,
        endpoint=ENDPOINT,
    )


def _quarter_hours_of(day: date) -> list[datetime]:
    start, end = local_midnight(day), local_midnight(day + timedelta(days=1))
    return [start + QUARTER_HOUR * index for index in range(int((end - start) / QUARTER_HOUR))]


def _load(data_dir: Path, table) -> Path:
    files = ParquetStore(data_dir).write_datapoints(table)
    with Warehouse(data_dir / "warehouse.duckdb") as warehouse:
        warehouse.load_datapoints(files)
    return data_dir / "warehouse.duckdb"


def _query(path: Path, sql: str, parameters: list | None = None) -> list[tuple]:
    connection = duckdb.connect(str(path), read_only=True)
    try:
        connection.execute("set TimeZone = 'UTC'")
        return connection.execute(sql, parameters or []).fetchall()
    finally:
        connection.close()


# DST days


@pytest.mark.parametrize("form", ["offsets", "utc"])
def test_autumn_dst_day_has_100_quarter_hours(form: str, tmp_path) -> None:
    instants = _quarter_hours_of(date(2025, 10, 26))
    assert len(instants) == 100
    if form == "offsets":
        timestamps = [instant.astimezone(LOCAL_TZ).isoformat() for instant in instants]
        assert timestamps[8] == "2025-10-26T02:00:00+02:00"
        assert timestamps[12] == "2025-10-26T02:00:00+01:00"
    else:
        timestamps = [isoformat_z(instant) for instant in instants]
    # Distinct values, so the two local 02:00 hours cannot be merged unnoticed.
    values = [round(1.0 + index * 0.25, 2) for index in range(100)]

    page = _normalise(_body(list(zip(timestamps, values, strict=True))))
    assert page.table.num_rows == 100
    assert page.duplicate_instants == 0
    assert page.table["period_start"].to_pylist() == instants

    warehouse = _load(tmp_path, page.table)
    assert _query(warehouse, "select count(distinct period_start) from datapoints") == [(100,)]
    hours = _query(warehouse, "select date_trunc('hour', period_start) as hour, count(*) from datapoints group by 1 order by 1")
    assert len(hours) == 25
    assert {count for _, count in hours} == {4}
    daily = _query(
        warehouse,
        "select cast(timezone('Europe/Berlin', period_start) as date), sum(value) from datapoints group by 1",
    )
    assert daily == [(date(2025, 10, 26), pytest.approx(sum(values)))]


def test_spring_dst_day_completeness_expects_92(tmp_path) -> None:
    instants = _quarter_hours_of(date(2025, 3, 30))
    page = _normalise(_body([(isoformat_z(instant), 2.5) for instant in instants]))
    assert page.table.num_rows == 92

    warehouse_path = _load(tmp_path, page.table)
    asset = {
        "id": VA_SMALL,
        "portfolioID": "b2d4f6a8-3333-4b5c-9d6e-000000000003",
        "start": "2025-01-01T00:00:00Z",
        "end": "2026-01-01T00:00:00Z",
        "ratedChargePower": 1000,
        "ratedDischargePower": 1000,
        "unitsPower": "kW",
        "energyCapacity": 2000,
        "unitsEnergy": "kWh",
    }
    with Warehouse(warehouse_path) as warehouse:
        warehouse.replace_virtual_assets([asset])
        warehouse.replace_entity_members([("virtual_asset", VA_SMALL, VA_SMALL)])
        run_models(warehouse.connection)
        run_checks(warehouse.connection)

    hours = _query(warehouse_path, "select count(distinct date_trunc('hour', period_start)) from datapoints")
    assert hours == [(23,)]
    completeness = _query(
        warehouse_path,
        "select period, expected, actual, status from check_results where check_name = 'completeness_15min'",
    )
    assert completeness == [(date(2025, 3, 30), 92.0, 92.0, "pass")]


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> SmallOrg:
    return write_small_org(tmp_path_factory.mktemp("small-inputs-config"), pipeline={"refetch_attempts": 1})


def _credentials(org: SmallOrg) -> Credentials:
    organisation = org.organisation
    return Credentials(username=organisation.username, password=organisation.password, organisation_id=organisation.id)


@pytest.mark.parametrize(("month_start", "quarter_hours"), [(date(2025, 10, 1), 2980), (date(2025, 3, 1), 2972)])
def test_month_quarter_hours_per_category(org: SmallOrg, month_start: date, quarter_hours: int) -> None:
    month_end = (month_start + timedelta(days=32)).replace(day=1)
    with serve_small_org(org) as (server, _):
        settings = load_settings(org.config_dir / "terralayr.toml", base_url=server.base_url)
        windows = plan_windows("15min", month_start, month_end, settings)
        with ApiClient(settings, _credentials(org)) as client:
            instants = []
            for entity_id in (VA_SMALL, VA_LARGE):
                for window in windows:
                    pages = client.fetch_datapoints("virtual_asset", entity_id, "15min", *window, ["revenue_wholesale"])
                    for raw in pages:
                        table = _normalise(raw.body).table
                        instants += [(entity_id, instant) for instant in table["period_start"].to_pylist()]

    assert windows[0][0] == local_midnight(month_start)
    assert windows[-1][1] == local_midnight(month_end)
    for entity_id in (VA_SMALL, VA_LARGE):
        own = [instant for owner, instant in instants if owner == entity_id]
        assert len(own) == quarter_hours
        assert len(set(own)) == quarter_hours


# Conflicts where windows meet


BOUNDARY = datetime(2025, 6, 18, tzinfo=UTC)


def _boundary_app() -> Starlette:
    """Data points with an inclusive end, and a different value at 2025-06-18T00:00Z per request."""

    async def authenticate(request: Request) -> JSONResponse:
        return JSONResponse({"access_token": "boundary-token", "expires_in": 3600})

    async def datapoints(request: Request) -> JSONResponse:
        start = datetime.fromisoformat(request.query_params["start"])
        end = datetime.fromisoformat(request.query_params["end"])
        points = []
        instant = start
        while instant <= end:
            if instant == BOUNDARY:
                value = 3.20 if start < BOUNDARY else 3.35
            else:
                value = round(1.0 + (instant - start) / QUARTER_HOUR / 100, 2)
            points.append({"timestamp": isoformat_z(instant), "value": value})
            instant += QUARTER_HOUR
        return JSONResponse({"data": {"revenue_wholesale": points}, "metaData": [], "nextCursor": None})

    return Starlette(
        routes=[
            Route("/auth/public/authenticate", authenticate, methods=["POST"]),
            Route("/revenue-reporting/virtual-assets/{entity_id}/datapoints", datapoints),
        ]
    )


@pytest.mark.parametrize("order", ["earlier first", "later first"])
def test_adjacent_windows_later_window_wins(order: str, org: SmallOrg, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    jobs = [
        FetchJob("virtual_asset", VA_SMALL, "15min", BOUNDARY - timedelta(days=1), BOUNDARY),
        FetchJob("virtual_asset", VA_SMALL, "15min", BOUNDARY, BOUNDARY + timedelta(days=1)),
    ]
    store = ParquetStore(tmp_path)
    with serve(_boundary_app()) as base_url:
        # An API that includes the end of each range, and a client that sends the window's end.
        settings = load_settings(org.config_dir / "terralayr.toml", base_url=base_url)
        settings = settings.model_copy(update={"api": settings.api.model_copy(update={"end_inclusive": False})})
        with ApiClient(settings, _credentials(org)) as client:
            fetch_order = jobs if order == "earlier first" else list(reversed(jobs))
            results = {job: fetch_window(client, store, job, "boundary-run") for job in fetch_order}

    with caplog.at_level(logging.WARNING, logger="terralayr_etl.boundaries"):
        report = resolve_outside_rows([results[job] for job in jobs], store)
    warehouse = tmp_path / "warehouse.duckdb"
    with Warehouse(warehouse) as loading:
        files = {path for result in results.values() for path in result.files} | set(report.files)
        loading.load_datapoints([Path(path) for path in sorted(files)])

    assert [result.outside_rows.num_rows for result in results.values()] == [1, 1]
    assert report.conflicts == 1
    assert report.dropped_rows == 1
    assert _query(warehouse, "select count(*), count(distinct period_start) from datapoints") == [(192, 192)]
    assert _query(warehouse, "select value from datapoints where period_start = ?", [BOUNDARY]) == [(3.35,)]
    conflicts = [record.getMessage() for record in caplog.records if "different values" in record.getMessage()]
    assert len(conflicts) == 1
    for part in (VA_SMALL, "revenue_wholesale", "2025-06-18T00:00:00+00:00", "3.2 from", "3.35 from"):
        assert part in conflicts[0]


# Timestamp forms


def test_timestamp_offsets_parse_to_utc_and_duplicate_detected() -> None:
    body = _body(
        [
            ("2025-03-29T23:45:00+01:00", 1.0),
            ("2025-03-30T03:00:00+02:00", 2.0),
            ("2025-03-30T01:00:00Z", 3.0),
        ]
    )
    page = _normalise(body)

    assert page.duplicate_instants == 1
    assert page.table["period_start"].to_pylist() == [
        datetime(2025, 3, 29, 22, 45, tzinfo=UTC),
        datetime(2025, 3, 30, 1, 0, tzinfo=UTC),
    ]
    assert page.table["value"].to_pylist() == [1.0, 3.0]


def test_naive_timestamp_rejected_with_value_named() -> None:
    body = _body([("2025-03-30T01:00:00Z", 1.0), ("2025-03-30T04:00:00", 2.0)])
    with pytest.raises(MalformedResponseError) as caught:
        _normalise(body)
    assert "'2025-03-30T04:00:00'" in str(caught.value)
    assert "has no UTC offset" in str(caught.value)


# Value types through Parquet into DuckDB


@pytest.mark.parametrize(
    ("case", "values"),
    [
        ("integers then floats", [index for index in range(300)] + [index + 0.5 for index in range(300)]),
        ("500 nulls first", [None] * 500 + [index * 1.25 for index in range(100)]),
    ],
)
def test_value_types_load_as_float64_without_new_nulls(case: str, values: list, tmp_path) -> None:
    start = datetime(2025, 1, 6, tzinfo=UTC)
    points = [(isoformat_z(start + QUARTER_HOUR * index), value) for index, value in enumerate(values)]
    page = _normalise(_body(points))
    assert str(page.table.schema.field("value").type) == "double"
    assert page.table["value"].null_count == values.count(None)

    warehouse = _load(tmp_path, page.table)
    stored = _query(warehouse, "select value from datapoints order by period_start")
    assert _query(warehouse, "select distinct typeof(value) from datapoints") == [("DOUBLE",)]
    assert _query(warehouse, "select count(*) - count(value) from datapoints") == [(values.count(None),)]
    assert [row[0] for row in stored] == [None if value is None else float(value) for value in values]


# Token expiry, Retry-After and cut-off bodies in whole runs


def _run(org: SmallOrg, server, data_dir: Path, **kwargs) -> dict:
    monkeypatch = pytest.MonkeyPatch()
    try:
        apply_env(monkeypatch, pipeline_env(org, server.base_url))
        return run_nightly(data_dir=data_dir, **kwargs)
    finally:
        monkeypatch.undo()


def test_token_expiry_one_authentication_per_lifetime(
    tmp_path_factory: pytest.TempPathFactory, prefect_harness, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """Scale a 60 s token in a run of several minutes down by 30.

    The sandbox issues tokens valid for 2 s and the client renews 0.5 s before that. 500 ms of
    latency with two requests in flight stretches the run to several token lifetimes. Every
    token must be used only within its lifetime, no request may get 401, and the client must
    authenticate once per lifetime, not once per thread.
    """
    lifetime_seconds, margin_seconds = 2, 0.5
    org = write_small_org(
        tmp_path_factory.mktemp("expiry-config"),
        api={"max_concurrency": 2, "token_refresh_margin_seconds": margin_seconds},
        sandbox={"token_lifetime_seconds": lifetime_seconds},
    )
    with serve_small_org(org, latency_ms=500, scripted=True) as (server, scripted):
        with caplog.at_level(logging.DEBUG):
            started = time.monotonic()
            summary = _run(org, server, tmp_path / "data", start=date(2024, 10, 26), end=date(2024, 10, 28))
            elapsed = time.monotonic() - started
        tokens = issued_tokens(server.inner_app)
        served = list(scripted.served)

    authentications = summary["report"]["fetch_stats"]["authentications"]
    assert summary["status"] == "success"
    assert elapsed > 3 * lifetime_seconds
    assert [item.status for item in served if item.status == 401] == []
    assert authentications == len(tokens)
    assert authentications >= 3
    assert authentications <= math.ceil(elapsed / (lifetime_seconds - margin_seconds)) + 1
    uses: dict[str, list[float]] = {}
    for item in served:
        if item.token:
            uses.setdefault(item.token, []).append(item.received_at)
    assert set(uses) <= set(tokens)
    for moments in uses.values():
        assert max(moments) - min(moments) < lifetime_seconds
    assert PASSWORD not in caplog.text
    for token in tokens:
        assert token not in caplog.text


def test_waiting_windows_add_threads_not_requests(
    tmp_path_factory: pytest.TempPathFactory, prefect_harness, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """pipeline.windows_waiting_for_cpu adds fetch threads for windows that wait for a CPU.
    With two requests allowed and four windows allowed to wait, six threads fetch, and the
    sandbox still never handles more than two requests at once."""
    org = write_small_org(
        tmp_path_factory.mktemp("waiting-config"),
        api={"max_concurrency": 2},
        pipeline={"windows_waiting_for_cpu": 4, "windows_per_task": 1},
    )
    with serve_small_org(org, latency_ms=100, scripted=True) as (server, scripted):
        with caplog.at_level(logging.INFO, logger="terralayr_etl.fetching"):
            summary = _run(org, server, tmp_path / "data", start=date(2024, 10, 26), end=date(2024, 10, 28))

    thread_names = {record.threadName for record in caplog.records if record.name == "terralayr_etl.fetching"}
    assert summary["status"] == "success"
    assert len(thread_names) == 6
    assert scripted.max_in_flight == 2


def test_entrypoint_flow_caps_running_fetch_batches(
    tmp_path_factory: pytest.TempPathFactory, prefect_harness, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deployment that starts the nightly flow from its entrypoint gets Prefect's default
    thread pool, which has no limit. The flow still runs at most api.max_concurrency plus
    pipeline.windows_waiting_for_cpu fetch batches at a time (here 2 + 1)."""
    org = write_small_org(
        tmp_path_factory.mktemp("entrypoint-config"),
        api={"max_concurrency": 2},
        pipeline={"windows_waiting_for_cpu": 1, "windows_per_task": 1},
    )
    lock = threading.Lock()
    active = [0]
    max_active = [0]
    real_fetch_batch = flows.fetch_batch

    def counting_fetch_batch(*args, **kwargs):
        with lock:
            active[0] += 1
            max_active[0] = max(max_active[0], active[0])
        try:
            return real_fetch_batch(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(flows, "fetch_batch", counting_fetch_batch)
    with serve_small_org(org, latency_ms=50) as (server, _):
        apply_env(monkeypatch, pipeline_env(org, server.base_url))
        summary = flows.nightly(start="2024-10-26", end="2024-10-28", data_dir=str(tmp_path / "data"))

    assert summary["status"] == "success"
    assert summary["windows"] > 10
    assert max_active[0] == 3


def test_retry_after_waits_and_cap_is_reported(org: SmallOrg, prefect_harness, tmp_path, caplog) -> None:
    """VA-S's daily window gets 429 with Retry-After 2, VA-L's with Retry-After 3600, which the
    configured maximum of 3 s cuts. The cut is reported in the run summary and the runs table."""
    data_dir = tmp_path / "data"
    small, large = datapoints_path("virtual_asset", VA_SMALL), datapoints_path("virtual_asset", VA_LARGE)
    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.script(small, Reply(status=429, headers={"Retry-After": "2"}), query_contains="resolution=daily")
        scripted.script(large, Reply(status=429, headers={"Retry-After": "3600"}), query_contains="resolution=daily")
        with caplog.at_level(logging.WARNING):
            summary = _run(org, server, data_dir, start=date(2024, 10, 26), end=date(2024, 10, 28))
        small_times = [item.received_at for item in scripted.served_to(small) if "resolution=daily" in item.query]
        large_times = [item.received_at for item in scripted.served_to(large) if "resolution=daily" in item.query]

    cap = org.settings.retry.max_retry_after_seconds
    assert summary["status"] == "success"
    assert len(small_times) == 2
    assert small_times[1] - small_times[0] >= 2.0
    assert len(large_times) == 2
    assert cap <= large_times[1] - large_times[0] < cap + 2
    assert summary["report"]["fetch_stats"]["retry_after_capped"] == 1
    assert summary["retries"] >= 2
    stored = _query(data_dir / "warehouse.duckdb", "select retries, report from runs")
    assert stored[0][0] == summary["retries"]
    assert json.loads(stored[0][1])["fetch_stats"]["retry_after_capped"] == 1
    reported = [record for record in caplog.records if "were cut to it" in record.getMessage()]
    assert len(reported) == 1


def test_cut_off_bodies_refetched_never_loaded_short(org: SmallOrg, prefect_harness, tmp_path) -> None:
    """VA-S's 15-minute response is cut mid-body under the full Content-Length (the client
    retries), VA-L's is cut with a matching Content-Length (the payload is quarantined and
    fetched again). Both windows load every period."""
    data_dir = tmp_path / "data"
    small, large = datapoints_path("virtual_asset", VA_SMALL), datapoints_path("virtual_asset", VA_LARGE)
    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.script(small, Reply(cut_off=True), query_contains="resolution=15min")
        scripted.script(large, Reply(truncate=True), query_contains="resolution=15min")
        summary = _run(org, server, data_dir, start=date(2024, 10, 26), end=date(2024, 10, 28))
        small_requests = [item for item in scripted.served_to(small) if "resolution=15min" in item.query]
        large_requests = [item for item in scripted.served_to(large) if "resolution=15min" in item.query]

    assert summary["status"] == "success"
    assert len(small_requests) == 2
    assert len(large_requests) == 2
    rows = _query(
        data_dir / "warehouse.duckdb",
        "select entity_id, count(*), count(distinct category) from datapoints "
        "where resolution = '15min' and entity_type = 'virtual_asset' group by 1 order by 1",
    )
    assert rows == [(VA_SMALL, (96 + 100) * 46, 46), (VA_LARGE, (96 + 100) * 46, 46)]
    quarantined = list(Path(summary["quarantine_dir"]).glob("*.json"))
    assert [json.loads(path.read_text())["request"]["path"] for path in quarantined] == [large]


def test_late_correction_replaced_once_by_nightly_run(tmp_path_factory: pytest.TempPathFactory, prefect_harness, tmp_path) -> None:
    org = write_small_org(
        tmp_path_factory.mktemp("correction-config"),
        pipeline={"lookback_days": 3, "fetch_revenue_buckets": False},
    )
    corrected_at = datetime(2024, 10, 26, 10, 15, tzinfo=UTC)
    path = datapoints_path("virtual_asset", VA_SMALL)
    served_value = {"value": 10.0}

    def set_value(request_path: str, query: str, body: bytes) -> bytes:
        if request_path != path or "resolution=15min" not in query:
            return body
        document = msgspec.json.decode(body)
        for point in document["data"]["revenue_wholesale"]:
            if point["timestamp"] == isoformat_z(corrected_at):
                point["value"] = served_value["value"]
        return msgspec.json.encode(document)

    data_dir = tmp_path / "data"
    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.rewrite_all(set_value)
        first = _run(org, server, data_dir, start=date(2024, 10, 26), end=date(2024, 10, 28), resolutions=["15min"])
        before = _stored_values(data_dir, corrected_at)
        served_value["value"] = 12.5
        second = _run(org, server, data_dir, end=date(2024, 10, 29), resolutions=["15min"])

    # The changed value breaks the revenue identities of that period, so checks fail; every
    # window still loads.
    assert first["failed_windows"] == []
    assert second["failed_windows"] == []
    assert second["start"] == "2024-10-24"
    assert before == [10.0]
    assert _stored_values(data_dir, corrected_at) == [12.5]
    parquet = duckdb.execute(
        "select value from read_parquet(?, hive_partitioning = true) "
        "where entity_id = ? and category = 'revenue_wholesale' and period_start = ?",
        [str(data_dir / "parquet" / "datapoints" / "resolution=15min" / "**" / "*.parquet"), VA_SMALL, corrected_at],
    ).fetchall()
    assert parquet == [(12.5,)]


def _stored_values(data_dir: Path, instant: datetime) -> list[float]:
    rows = _query(
        data_dir / "warehouse.duckdb",
        "select value from datapoints where entity_id = ? and resolution = '15min' "
        "and category = 'revenue_wholesale' and period_start = ?",
        [VA_SMALL, instant],
    )
    return [row[0] for row in rows]
