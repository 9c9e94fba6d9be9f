"""The nightly flow end to end: sandbox over HTTP, Parquet, DuckDB and a real Prefect run."""

from __future__ import annotations

import json
from datetime import date

import duckdb
import polars as pl
import pytest

from terralayr_etl.flows import run_nightly
from terralayr_etl.timeutil import quarter_hours_in_day

pytestmark = pytest.mark.slow

SPRING = (date(2024, 3, 30), date(2024, 4, 1))
AUTUMN = (date(2024, 10, 26), date(2024, 10, 29))


def _connect(data_dir):
    connection = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    connection.execute("set TimeZone = 'UTC'")
    return connection


def _table_counts(data_dir) -> dict[str, int]:
    connection = _connect(data_dir)
    try:
        return {
            table: connection.execute(f"select count(*) from {table}").fetchone()[0]
            for table in ("datapoints", "revenue_buckets", "virtual_assets", "entity_members")
        }
    finally:
        connection.close()


@pytest.fixture(scope="module")
def two_dst_windows(tmp_path_factory, prefect_harness, sandbox):
    """Run the flow over a window with each DST change day, twice over the same data dir."""
    data_dir = tmp_path_factory.mktemp("e2e")
    monkeypatch = pytest.MonkeyPatch()
    organisation = sandbox.organisation
    monkeypatch.setenv("TERRALAYR_BASE_URL", sandbox.base_url)
    monkeypatch.setenv("TERRALAYR_USERNAME", organisation.username)
    monkeypatch.setenv("TERRALAYR_PASSWORD", organisation.password)
    monkeypatch.setenv("TERRALAYR_ORGANISATION_ID", organisation.id)
    try:
        summaries = [run_nightly(start=start, end=end, data_dir=data_dir) for start, end in (SPRING, AUTUMN)]
        counts_after_first = _table_counts(data_dir)
        rerun = run_nightly(start=AUTUMN[0], end=AUTUMN[1], data_dir=data_dir)
        counts_after_rerun = _table_counts(data_dir)
    finally:
        monkeypatch.undo()
    return data_dir, summaries, rerun, counts_after_first, counts_after_rerun


def test_flow_quarter_hours_per_local_day(two_dst_windows):
    data_dir, *_ = two_dst_windows
    connection = _connect(data_dir)
    try:
        frame = connection.sql(
            """
            select d.entity_id, d.category,
                   cast(timezone('Europe/Berlin', d.period_start) as date) as local_day,
                   count(*) as quarter_hours
            from datapoints d
            where d.resolution = '15min' and d.entity_type = 'virtual_asset'
            group by all
            """
        ).to_arrow_table()
    finally:
        connection.close()

    frame = pl.from_arrow(frame)
    days = set(frame["local_day"].to_list())
    assert date(2024, 3, 31) in days
    assert date(2024, 10, 27) in days
    assert frame["entity_id"].n_unique() >= 2
    expected = frame.with_columns(
        pl.col("local_day").map_elements(quarter_hours_in_day, return_dtype=pl.Int64).alias("expected")
    )
    wrong = expected.filter(pl.col("quarter_hours") != pl.col("expected"))
    assert wrong.is_empty(), wrong.head(10)
    assert set(expected.filter(pl.col("local_day") == date(2024, 3, 31))["quarter_hours"]) == {92}
    assert set(expected.filter(pl.col("local_day") == date(2024, 10, 27))["quarter_hours"]) == {100}


def test_flow_every_check_passes(two_dst_windows):
    data_dir, summaries, rerun, *_ = two_dst_windows
    for summary in [*summaries, rerun]:
        assert summary["checks"]["failed"] == 0, summary["checks"]
        assert summary["checks"]["passed"] > 0
    connection = _connect(data_dir)
    try:
        failed = connection.execute("select count(*) from check_results where status <> 'pass'").fetchone()[0]
        checks = {row[0] for row in connection.execute("select distinct check_name from check_results").fetchall()}
    finally:
        connection.close()
    assert failed == 0
    assert len(checks) >= 7


def test_flow_rerun_keeps_row_counts(two_dst_windows):
    *_, counts_after_first, counts_after_rerun = two_dst_windows
    assert counts_after_first["datapoints"] > 0
    assert counts_after_first == counts_after_rerun


def test_flow_lands_all_entity_types_and_resolutions(two_dst_windows):
    data_dir, *_ = two_dst_windows
    connection = _connect(data_dir)
    try:
        pairs = set(connection.execute("select distinct entity_type, resolution from datapoints").fetchall())
        runs = connection.execute("select status, requests, rows from runs order by started_at").fetchall()
    finally:
        connection.close()
    for entity_type in ("virtual_asset", "portfolio", "fleet", "physical_asset"):
        for resolution in ("15min", "hourly", "daily"):
            assert (entity_type, resolution) in pairs
    assert [status for status, *_ in runs] == ["success", "success", "success"]
    assert all(requests > 0 and rows > 0 for _, requests, rows in runs)


def test_flow_parquet_matches_warehouse(two_dst_windows):
    data_dir, *_ = two_dst_windows
    parquet = pl.scan_parquet(str(data_dir / "parquet" / "datapoints" / "**" / "*.parquet"), hive_partitioning=True)
    parquet_rows = parquet.select(pl.len()).collect().item()
    keys = parquet.select("entity_type", "entity_id", "category", "period_start", "resolution").unique().select(pl.len()).collect().item()
    assert parquet_rows == keys
    assert parquet_rows == _table_counts(data_dir)["datapoints"]


def test_flow_run_parameters_give_request_paths(two_dst_windows):
    data_dir, *_ = two_dst_windows
    connection = _connect(data_dir)
    try:
        (parameters,) = connection.execute("select parameters from runs order by started_at limit 1").fetchone()
    finally:
        connection.close()
    templates = json.loads(parameters)["datapoint_paths"]
    parquet = pl.scan_parquet(str(data_dir / "parquet" / "datapoints" / "**" / "*.parquet"), hive_partitioning=True)
    stored = parquet.select("entity_type", "entity_id", "endpoint").unique().collect()

    assert stored.height > 0
    for entity_type, entity_id, endpoint in stored.iter_rows():
        assert templates[entity_type].format(entity_id=entity_id) == endpoint
