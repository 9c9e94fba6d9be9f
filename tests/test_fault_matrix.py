"""The nightly flow under each sandbox fault mode ends with the warehouse of a fault-free run.

Each run fetches two local days, one of them the 25-hour DST day 2024-10-27, for the small
organisation of ``robust_support`` into a fresh data dir. The warehouse and the Parquet
dataset are compared with the fault-free run by content: an ordered hash of every table's
rows without lineage columns (see ``robust_support.warehouse_digest``). Rows of the category
that the ``unknown`` mode injects are left out, because the fault-free API never sends it.
Rates are raised above the defaults so that each mode fires several times in a run of about
thirty requests, and the test checks that it did.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date, timedelta

import duckdb
import pytest
from robust_support import (
    VA_LARGE,
    SmallOrg,
    apply_env,
    parquet_digest,
    pipeline_env,
    serve_small_org,
    warehouse_digest,
    write_small_org,
)

from terralayr_etl.flows import run_nightly
from terralayr_etl.sandbox.fault_bodies import UNKNOWN_CATEGORY
from terralayr_etl.timeutil import local_midnight

pytestmark = pytest.mark.slow

START, END = date(2024, 10, 26), date(2024, 10, 28)

FAULT_SPECS = {
    "expiry": "expiry=0.25",
    "429": "429=0.3",
    "429date": "429date=0.3",
    "500": "500=0.3",
    "502": "502=0.3",
    "503": "503=0.3",
    "reset": "reset=0.3",
    "truncate": "truncate=0.3",
    "slow": "slow=0.15:2.5",
    "missing": "missing=0.3",
    "unknown": "unknown=0.3",
    "strings": "strings=0.3",
    "all": "all,429=0.08,429date=0.05,500=0.05,502=0.05,503=0.05,reset=0.05,truncate=0.08,slow=0.03:2.5,"
    "missing=0.08,unknown=0.08,strings=0.08,expiry=0.4",
}
"""Spec per mode. ``slow`` waits longer than the client's 1.5 s read timeout."""


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> SmallOrg:
    # Short timeouts make the slow mode time out.
    return write_small_org(
        tmp_path_factory.mktemp("fault-config"),
        api={"timeout_seconds": 1.5, "connect_timeout_seconds": 1.0},
    )


@pytest.fixture(scope="module")
def serial_org(tmp_path_factory: pytest.TempPathFactory) -> SmallOrg:
    # One request at a time, for the expiry mode. The latency alone then spreads the run's 27
    # GET requests over about 0.9 s (two runs), past three lifetimes of its token, however fast
    # the machine is. A request repeated with a new token still has the whole lifetime.
    return write_small_org(
        tmp_path_factory.mktemp("fault-config-serial"),
        api={"timeout_seconds": 1.5, "connect_timeout_seconds": 1.0, "max_concurrency": 1},
    )


def _run(org: SmallOrg, data_dir, *, faults: str | None, latency_ms: float = 0, end: date = END, start: date | None = START):
    with serve_small_org(org, faults=faults, latency_ms=latency_ms) as (server, _):
        monkeypatch = pytest.MonkeyPatch()
        try:
            apply_env(monkeypatch, pipeline_env(org, server.base_url))
            summary = run_nightly(start=start, end=end, data_dir=data_dir)
        finally:
            monkeypatch.undo()
        plan = server.inner_app.state.fault_plan
        return summary, (plan.counts() if plan else {})


@pytest.fixture(scope="module")
def fault_free(org: SmallOrg, tmp_path_factory: pytest.TempPathFactory, prefect_harness) -> Iterator[dict]:
    data_dir = tmp_path_factory.mktemp("fault-free")
    summary, _ = _run(org, data_dir, faults=None)
    assert summary["status"] == "success"
    yield {
        "data_dir": data_dir,
        "summary": summary,
        "warehouse": warehouse_digest(data_dir / "warehouse.duckdb"),
        "parquet": parquet_digest(data_dir),
    }


def _categories_of_failed_checks(data_dir) -> set[str]:
    connection = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    try:
        rows = connection.execute("select distinct category from check_results where status <> 'pass'").fetchall()
    finally:
        connection.close()
    return {row[0] for row in rows}


@pytest.mark.parametrize("mode", list(FAULT_SPECS))
def test_fault_mode_ends_with_fault_free_warehouse(
    mode: str, org: SmallOrg, serial_org: SmallOrg, fault_free: dict, tmp_path
) -> None:
    data_dir = tmp_path / "data"
    run_org = serial_org if mode == "expiry" else org
    summary, counts = _run(run_org, data_dir, faults=FAULT_SPECS[mode], latency_ms=20 if mode in ("expiry", "all") else 0)

    injected = {name: count for name, count in counts.items() if count}
    if mode == "all":
        assert len(injected) >= 4, injected
    else:
        assert injected.get(mode, 0) > 0, f"the {mode} fault never fired: {counts}"
    assert summary["failed_windows"] == []
    # Completeness covers documented categories only, so an injected unknown category that
    # only some windows carry fails no check either.
    assert _categories_of_failed_checks(data_dir) == set()
    assert summary["status"] == "success"
    assert summary["missing_categories"] == {}

    excluded = (UNKNOWN_CATEGORY,)
    assert warehouse_digest(data_dir / "warehouse.duckdb", exclude_categories=excluded) == fault_free["warehouse"]
    assert parquet_digest(data_dir, exclude_categories=excluded) == fault_free["parquet"]


def test_fault_unknown_category_kept_and_reported(org: SmallOrg, fault_free: dict, tmp_path) -> None:
    data_dir = tmp_path / "data"
    summary, counts = _run(org, data_dir, faults="unknown=0.5")
    assert counts["unknown"] > 0

    assert summary["unknown_categories"] == [UNKNOWN_CATEGORY]
    connection = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    try:
        stored = connection.execute("select count(*) from datapoints where category = ?", [UNKNOWN_CATEGORY]).fetchone()[0]
        report = json.loads(connection.execute("select report from runs").fetchone()[0])
    finally:
        connection.close()
    assert stored > 0
    assert report["unknown_categories"] == [UNKNOWN_CATEGORY]


def test_fault_truncate_quarantines_payload_with_request(org: SmallOrg, fault_free: dict, tmp_path) -> None:
    data_dir = tmp_path / "data"
    summary, counts = _run(org, data_dir, faults="truncate=0.4")
    assert counts["truncate"] > 0
    assert summary["status"] == "success"

    records = sorted((data_dir / "quarantine" / summary["run_id"]).glob("*.json"))
    assert len(records) == counts["truncate"]
    for path in records:
        record = json.loads(path.read_text())
        body = (path.parent / record["body_file"]).read_bytes()
        assert record["request"]["path"].startswith(("/revenue-reporting/", "/organisations/"))
        assert "start" in record["request"]["params"]
        assert record["error_type"] == "MalformedResponseError"
        assert len(body) == record["body_bytes"]
        assert "authorization" not in path.read_text().lower()
    assert summary["report"]["quarantined_payloads"] == counts["truncate"]
    assert summary["report"]["refetches"] >= 1


def test_fault_corrections_replace_values_in_lookback(org: SmallOrg, fault_free: dict, tmp_path) -> None:
    """First run, then corrections start, then an incremental run whose lookback covers both
    days: the warehouse equals one run over the same days against a sandbox that serves the
    corrected values. The lookback also fetches three earlier days, first served after the
    corrections started and so uncorrected in both."""
    corrected_dir = tmp_path / "corrected"
    with serve_small_org(org, faults="corrections") as (server, _):
        monkeypatch = pytest.MonkeyPatch()
        try:
            apply_env(monkeypatch, pipeline_env(org, server.base_url))
            first = run_nightly(start=START, end=END, data_dir=corrected_dir)
            plan = server.inner_app.state.fault_plan
            plan.arm_corrections()
            second = run_nightly(end=END, data_dir=corrected_dir)
        finally:
            monkeypatch.undo()
        corrected_days = plan.corrections.corrected_days
    assert first["status"] == "success"
    assert second["status"] == "success"
    assert second["incremental"] is True
    assert second["start"] == (END - timedelta(days=1 + org.settings.pipeline.lookback_days)).isoformat()
    assert {START, START + timedelta(days=1)} <= set(corrected_days)

    reference_dir = tmp_path / "reference"
    with serve_small_org(org, faults="corrections") as (server, _):
        plan = server.inner_app.state.fault_plan
        engine = server.engine
        for day in sorted(corrected_days):
            engine.datapoints("virtual_asset", VA_LARGE, "daily", local_midnight(day), local_midnight(day + timedelta(days=1)))
        plan.arm_corrections()
        monkeypatch = pytest.MonkeyPatch()
        try:
            apply_env(monkeypatch, pipeline_env(org, server.base_url))
            reference = run_nightly(start=date.fromisoformat(second["start"]), end=END, data_dir=reference_dir)
        finally:
            monkeypatch.undo()
    assert reference["status"] == "success"

    corrected = warehouse_digest(corrected_dir / "warehouse.duckdb")
    expected = warehouse_digest(reference_dir / "warehouse.duckdb")
    assert corrected["datapoints"] != fault_free["warehouse"]["datapoints"]
    assert corrected == expected
    assert parquet_digest(corrected_dir) == parquet_digest(reference_dir)
