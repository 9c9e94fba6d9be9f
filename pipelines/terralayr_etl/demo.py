"""The demo: the sandbox on a free 127.0.0.1 port, the nightly flow against it, a summary."""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import duckdb

from terralayr_etl.cli import exit_code, print_checks
from terralayr_etl.config import load_settings
from terralayr_etl.run_report import describe_recovered_problems
from terralayr_etl.sandbox.organisation import load_organisation
from terralayr_etl.sandbox.server import SandboxServer


def run_demo(*, start: date, end: date, data_dir: Path, faults: str | None = None) -> int:
    """Run the pipeline against the sandbox for local days ``[start, end)``; return the exit status."""
    organisation = load_organisation()
    settings = load_settings()
    with SandboxServer(settings, organisation, faults=faults) as sandbox:
        # The sandbox's demo credentials travel like real ones: through the environment.
        os.environ["TERRALAYR_BASE_URL"] = sandbox.base_url
        os.environ["TERRALAYR_USERNAME"] = organisation.username
        os.environ["TERRALAYR_PASSWORD"] = organisation.password
        os.environ["TERRALAYR_ORGANISATION_ID"] = organisation.id
        print(f"Sandbox serving organisation {organisation.id} on {sandbox.base_url}", flush=True)

        from terralayr_etl.flows import run_nightly

        summary = run_nightly(start=start, end=end, data_dir=data_dir, settings=load_settings())

    print_summary(summary, data_dir)
    return exit_code(summary)


def print_summary(summary: dict, data_dir: Path) -> None:
    """Print entities, rows per resolution, check results and the output paths."""
    warehouse_path = data_dir / "warehouse.duckdb"
    connection = duckdb.connect(str(warehouse_path), read_only=True)
    try:
        connection.execute("set TimeZone = 'UTC'")
        entities = connection.execute(
            "select entity_type, count(distinct entity_id) from datapoints group by 1 order by 1"
        ).fetchall()
        resolutions = connection.execute(
            "select resolution, count(*) from datapoints group by 1 order by min(period_start), 1"
        ).fetchall()
        buckets = connection.execute("select count(*) from revenue_buckets").fetchone()[0]
    finally:
        connection.close()

    checks = summary["checks"]
    print()
    print(f"Run {summary['run_id']} ({summary['status']}): local days {summary['start']} to {summary['end']} (end exclusive)")
    print(f"  {summary['windows']:,} request windows, {summary['requests']:,} requests, {summary['retries']:,} retries")
    print("Entities:")
    for entity_type, count in entities:
        print(f"  {entity_type:<16} {count:>6}")
    print("Rows in datapoints per resolution:")
    for resolution, count in resolutions:
        print(f"  {resolution:<16} {count:>10,}")
    print(f"Rows in revenue_buckets: {buckets:,}")
    for line in describe_recovered_problems(summary.get("report") or {}):
        print(line)
    print_checks(checks["by_check"], checks["passed"], checks["failed"])
    print(f"Parquet dataset: {(data_dir / 'parquet').resolve()}")
    print(f"DuckDB warehouse: {warehouse_path.resolve()}")
