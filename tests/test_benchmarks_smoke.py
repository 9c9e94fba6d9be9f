"""Smoke tests of the benchmark harness: its quick workloads and its helpers. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from datetime import datetime
from pathlib import Path

import pytest

from benchmarks.config_dir import dump_toml, write_config_dir
from benchmarks.workloads import stage_durations, stage_peak_rss
from terralayr_etl.config import PROJECT_ROOT, load_settings
from terralayr_etl.sandbox.organisation import synthetic_organisation

LOG = """\
2026-01-01 10:00:00,000 INFO prefect.flow_runs: Beginning flow run 'x' for flow 'nightly'
2026-01-01 10:00:00,500 INFO prefect.flow_runs: Planned 1,210 request windows for 3 entities
2026-01-01 10:00:01,000 INFO prefect.flow_runs: Fetched 605 of 1,210 windows
2026-01-01 10:00:02,500 INFO prefect.flow_runs: Fetched 1,210 of 1,210 windows
2026-01-01 10:00:03,000 INFO prefect.task_runs: Loaded 1,234,560 rows from 4 Parquet files
2026-01-01 10:00:03,000 INFO prefect.task_runs: Finished in state Completed()
2026-01-01 10:00:05,000 INFO prefect.flow_runs: Finished in state Completed()
"""


def test_stage_durations_from_log_lines():
    stages = stage_durations(LOG)

    assert stages["discover_s"] == 0.5
    assert stages["fetch_s"] == 2.0
    assert stages["load_s"] == 0.5
    assert stages["flow_s"] == 5.0


RUN_LOG = LOG.replace(
    "2026-01-01 10:00:05,000 INFO prefect.flow_runs: Finished in state Completed()\n",
    "2026-01-01 10:00:04,000 INFO prefect.task_runs: Built 19 SQL models from /sql in 0.9 s\n"
    "2026-01-01 10:00:04,250 INFO prefect.task_runs: Checks: 62,758 comparisons, 62,758 passed, 0 failed\n"
    "2026-01-01 10:00:05,000 INFO prefect.flow_runs: Finished in state Completed()\n",
)


def test_stage_durations_of_models_and_checks():
    stages = stage_durations(RUN_LOG)

    assert stages["models_s"] == 1.0
    assert stages["checks_s"] == 0.25


def test_stage_durations_missing_marker_is_none():
    stages = stage_durations(LOG)

    assert stages["models_s"] is None
    assert stages["checks_s"] is None


def test_stage_peak_rss_places_samples_in_stages():
    start = datetime(2026, 1, 1, 10, 0, 0).timestamp()
    samples = [(start - 1.0, 150.0), (start + 1.5, 300.0), (start + 2.0, 280.0), (start + 2.8, 420.0)]

    peaks = stage_peak_rss(LOG, samples)

    assert peaks["startup_mb"] == 150.0
    assert peaks["fetch_mb"] == 300.0
    assert peaks["load_mb"] == 420.0
    assert peaks["models_mb"] is None


def test_dump_toml_round_trips_settings():
    with (PROJECT_ROOT / "config" / "terralayr.toml").open("rb") as handle:
        settings = tomllib.load(handle)

    assert tomllib.loads(dump_toml(settings)) == settings


def test_config_dir_lists_synthetic_entities(tmp_path: Path):
    organisation = synthetic_organisation(12, seed=1)

    written = write_config_dir(tmp_path, 12)
    settings = load_settings(tmp_path / "terralayr.toml")

    assert written.organisation_id == organisation.id
    assert {fleet.id: fleet.portfolio_ids for fleet in settings.fleets} == organisation.fleets
    assert {asset.id: asset.virtual_asset_ids for asset in settings.physical_assets} == organisation.physical_assets
    assert settings.api.paths == load_settings().api.paths


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_benchmarks_quick_run_writes_every_result(tmp_path: Path):
    output = tmp_path / "results.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--output", str(output), "--work-dir", str(tmp_path / "work")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    results = json.loads(output.read_text())
    for key in ("wall_s", "network_floor_s", "values", "peak_rss_mb"):
        assert key in results["W1"]
    assert results["W1"]["values"] > 0
    assert results["W1"]["requests"] > 0
    assert results["W1"]["check_failures"] == 0
    # W1 is measured on its second run, against a sandbox that serves from its cache.
    assert results["W1"]["sandbox_cache"] is True
    assert results["W1"]["cold"]["values"] == results["W1"]["values"]
    assert results["W2"]["values_per_s"] > 0
    assert len(results["W2"]["replays_values_per_s"]) == 3
    assert results["W2"]["values_per_s"] == sorted(results["W2"]["replays_values_per_s"])[1]
    # The replay loads the recorded responses of the W1 range, so it must land the same rows.
    assert results["W2"]["values"] == results["W1"]["values"]
    assert results["W3"]["rss_30d_mb"] > 0
    assert results["W3"]["rss_360d_mb"] > 0
    assert results["W3"]["long"]["values"] > results["W3"]["short"]["values"]
    assert results["W4"]["wall_s"] > 0
    assert results["W4"]["status"] == "success"
    assert set(results["targets"]) == {"W1", "W2", "W3", "W4"}
