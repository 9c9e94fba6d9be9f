"""The nightly flow with skip_checks: the data lands, the models and checks are left out."""

from __future__ import annotations

import json
from datetime import date

import duckdb
import pytest

from terralayr_etl.flows import run_nightly

pytestmark = pytest.mark.slow


def test_flow_skip_checks_loads_without_models(tmp_path, prefect_harness, sandbox_env):
    summary = run_nightly(start=date(2024, 10, 20), end=date(2024, 10, 21), data_dir=tmp_path, skip_checks=True)

    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"), read_only=True)
    try:
        datapoints = connection.execute("select count(*) from datapoints").fetchone()[0]
        buckets = connection.execute("select count(*) from revenue_buckets").fetchone()[0]
        tables = {row[0] for row in connection.execute("select table_name from information_schema.tables").fetchall()}
        check_summary = json.loads(connection.execute("select check_summary from runs").fetchone()[0])
    finally:
        connection.close()

    assert summary["status"] == "success"
    assert summary["checks"]["skipped"] is True
    assert datapoints > 0
    assert datapoints + buckets == summary["rows_loaded"]
    assert "check_results" not in tables
    assert check_summary["skipped"] is True
