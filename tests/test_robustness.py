"""Robustness of the nightly flow: quarantine, failed windows, missing categories, unsafe ids,
incremental starts, Prefect retries, the warehouse lock and the CLI's user errors.

Every run goes against the sandbox's small organisation on 127.0.0.1, behind
``ScriptedReplies`` where a test needs one window to misbehave.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import subprocess
import sys
import threading
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs

import duckdb
import msgspec
import pytest
from robust_support import (
    FLEET,
    PORTFOLIO,
    VA_LARGE,
    VA_SMALL,
    Reply,
    SmallOrg,
    apply_env,
    cli_env,
    datapoints_path,
    harness_api_url,
    pipeline_env,
    run_cli,
    serve_small_org,
    wait_for,
    warehouse_digest,
    write_small_org,
)

from terralayr_etl import batches, flows, models, storage
from terralayr_etl.client import ApiClient
from terralayr_etl.categories import CATEGORY_NAMES
from terralayr_etl.config import Credentials, load_settings
from terralayr_etl.errors import ApiError, DiskFullError, MalformedResponseError, TerralayrError
from terralayr_etl.models import ModelError
from terralayr_etl.flows import run_nightly
from terralayr_etl.pipeline import Discovery, Entity, FetchJob, plan_jobs, plan_starts
from terralayr_etl.quarantine import Quarantine
from terralayr_etl.run_report import failure_line
from terralayr_etl.storage import ParquetStore
from terralayr_etl.timeutil import local_midnight
from terralayr_etl.warehouse import Warehouse

pytestmark = pytest.mark.slow

START, END = date(2024, 10, 26), date(2024, 10, 28)
VA_SMALL_PATH = datapoints_path("virtual_asset", VA_SMALL)
VA_LARGE_PATH = datapoints_path("virtual_asset", VA_LARGE)


@pytest.fixture(scope="module")
def org(tmp_path_factory: pytest.TempPathFactory) -> SmallOrg:
    return write_small_org(
        tmp_path_factory.mktemp("robust-config"),
        retry={"attempts": 2},
        pipeline={"refetch_attempts": 2},
    )


def _connect(data_dir: Path) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    connection.execute("set TimeZone = 'UTC'")
    return connection


def _count(data_dir: Path, where: str, parameters: list | None = None) -> int:
    connection = _connect(data_dir)
    try:
        return connection.execute(f"select count(*) from datapoints where {where}", parameters or []).fetchone()[0]
    finally:
        connection.close()


def _run(org: SmallOrg, server, data_dir: Path, **kwargs) -> dict:
    monkeypatch = pytest.MonkeyPatch()
    try:
        apply_env(monkeypatch, pipeline_env(org, server.base_url))
        return run_nightly(data_dir=data_dir, **kwargs)
    finally:
        monkeypatch.undo()


def credentials_of(org: SmallOrg) -> Credentials:
    organisation = org.organisation
    return Credentials(username=organisation.username, password=organisation.password, organisation_id=organisation.id)


def _query_of(served) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(served.query).items()}


def test_failed_run_records_loaded_rows(
    org: SmallOrg, prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that fails in the SQL models, after its load committed, is marked failed with the
    rows it loaded, which stay in the warehouse."""
    sql_dir = tmp_path / "sql"
    (sql_dir / "marts").mkdir(parents=True)
    (sql_dir / "marts" / "mart_broken.sql").write_text("select * from datapoints join missing_table using (entity_id)")
    monkeypatch.setattr(models, "DEFAULT_SQL_DIR", sql_dir)
    data_dir = tmp_path / "data"
    with serve_small_org(org) as (server, _), pytest.raises(ModelError, match="mart_broken.sql"):
        _run(org, server, data_dir, start=START, end=END)

    connection = _connect(data_dir)
    try:
        status, rows = connection.execute("select status, rows from runs").fetchone()
        stored = connection.execute(
            "select (select count(*) from datapoints) + (select count(*) from revenue_buckets)"
        ).fetchone()[0]
    finally:
        connection.close()
    assert status == "failed"
    assert stored > 0
    assert rows == stored


def test_flow_syncs_folders_before_load(org: SmallOrg, prefect_harness, tmp_path: Path, monkeypatch) -> None:
    """The renames of a run's Parquet files reach the disk before the load reads the files."""
    events: list[str] = []
    real_sync, real_load = ParquetStore.sync_folders, Warehouse.load_datapoints

    def recording_sync(store: ParquetStore) -> int:
        synced = real_sync(store)
        events.append(f"synced {synced}")
        return synced

    def recording_load(warehouse: Warehouse, files) -> int:
        events.append("load")
        return real_load(warehouse, files)

    monkeypatch.setattr(ParquetStore, "sync_folders", recording_sync)
    monkeypatch.setattr(Warehouse, "load_datapoints", recording_load)
    with serve_small_org(org) as (server, _):
        _run(org, server, tmp_path / "data", start=START, end=END)

    assert events[-1] == "load"
    assert events[-2].startswith("synced ")
    assert int(events[-2].removeprefix("synced ")) > 0


def test_flow_full_disk_at_fsync(
    org: SmallOrg, prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fetch's files are fsynced and renamed on a background thread. A full disk there
    fails the run before its load, leaves no temp file, and a re-run loads every row once."""
    real_fsync = storage.os.fsync
    fsync_threads: set[str] = set()

    def full_disk(descriptor: int) -> None:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):
            fsync_threads.add(threading.current_thread().name)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    data_dir = tmp_path / "data"
    with serve_small_org(org) as (server, _):
        monkeypatch.setattr(storage.os, "fsync", full_disk)
        with pytest.raises(TerralayrError, match="no space left on the device while writing .*free disk space"):
            _run(org, server, data_dir, start=START, end=END)
        monkeypatch.setattr(storage.os, "fsync", real_fsync)
        assert fsync_threads == {"parquet-commit_0"}
        assert not [path for path in (data_dir / "parquet").rglob("*") if path.is_file()]
        connection = _connect(data_dir)
        try:
            assert connection.execute("select status, rows from runs").fetchall() == [("failed", 0)]
            assert connection.execute("select count(*) from datapoints").fetchone()[0] == 0
        finally:
            connection.close()

        summary = _run(org, server, data_dir, start=START, end=END)

    assert summary["status"] == "success"
    connection = _connect(data_dir)
    try:
        stored, keys, buckets = connection.execute(
            "select count(*), count(distinct (entity_type, entity_id, resolution, category, period_start)),"
            " (select count(*) from revenue_buckets) from datapoints"
        ).fetchone()
    finally:
        connection.close()
    assert stored == keys > 0
    assert stored + buckets == summary["rows_loaded"]


def test_flow_full_disk_at_write(
    org: SmallOrg, prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while a window's file is written stops the run at once, instead of failing
    window after window, and names the file."""
    written_entities: list[str] = []

    def full_disk(table, *args, **kwargs) -> None:
        written_entities.append(table["entity_id"][0].as_py())
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.pq, "write_table", full_disk)
    data_dir = tmp_path / "data"
    with serve_small_org(org) as (server, _), pytest.raises(DiskFullError) as caught:
        _run(org, server, data_dir, start=START, end=END)

    assert re.search(r"while writing /\S+\.parquet; free disk space there and rerun", str(caught.value))
    # Each entity's windows of these two days make one batch, which stops at its first write.
    # Without the stop, every window of a batch would try its write.
    assert written_entities
    assert len(written_entities) == len(set(written_entities))
    assert not [path for path in (data_dir / "parquet").rglob("*") if path.is_file()]
    connection = _connect(data_dir)
    try:
        status, report = connection.execute("select status, report from runs").fetchone()
    finally:
        connection.close()
    assert status == "failed"
    assert json.loads(report)["error"].startswith("DiskFullError: no space left on the device while writing ")


def test_flow_interrupt_behind_prefect_error(
    org: SmallOrg, prefect_harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefect can fail with an error of its own while it handles Ctrl+C. The run then records
    the interrupt first, and the interrupt carries the note that names the run."""

    def interrupted_load(*args, **kwargs) -> int:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise ValueError("Task run is not set")  # noqa: B904, as Prefect raises it

    monkeypatch.setattr(flows, "load_task", interrupted_load)
    data_dir = tmp_path / "data"
    with serve_small_org(org) as (server, _), pytest.raises(ValueError, match="Task run is not set") as caught:
        _run(org, server, data_dir, start=START, end=END)

    interrupt = caught.value.__context__
    assert isinstance(interrupt, KeyboardInterrupt)
    connection = _connect(data_dir)
    try:
        run_id, status, report = connection.execute("select run_id, status, report from runs").fetchone()
    finally:
        connection.close()
    assert status == "failed"
    assert json.loads(report)["error"] == "KeyboardInterrupt; then ValueError: Task run is not set"
    assert [note for note in interrupt.__notes__ if run_id in note]
    assert [note for note in caught.value.__notes__ if run_id in note]


# Quarantine and failed windows


def test_flow_malformed_window_quarantined_and_left_out(org: SmallOrg, prefect_harness, tmp_path) -> None:
    data_dir = tmp_path / "data"
    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.script(VA_SMALL_PATH, *[Reply(truncate=True)] * 3, query_contains="resolution=hourly")
        summary = _run(org, server, data_dir, start=START, end=END)
        served = [item for item in scripted.served_to(VA_SMALL_PATH) if "resolution=hourly" in item.query]

    assert summary["status"] == "failed"
    assert len(served) == 3
    assert len(summary["failed_windows"]) == 1
    failed = summary["failed_windows"][0]
    assert (failed["entity_id"], failed["resolution"], failed["product"]) == (VA_SMALL, "hourly", None)
    assert failed["error_type"] == "MalformedResponseError"

    # No partial window: nothing of the failed window, everything of the others.
    assert _count(data_dir, "entity_id = ? and resolution = 'hourly'", [VA_SMALL]) == 0
    assert _count(data_dir, "entity_id = ? and resolution = 'hourly'", [VA_LARGE]) > 0
    assert _count(data_dir, "entity_id = ? and resolution = '15min'", [VA_SMALL]) > 0

    folder = data_dir / "quarantine" / summary["run_id"]
    assert summary["quarantine_dir"] == str(folder)
    payloads = sorted(folder.glob("*-hourly-*Z.json"))
    assert len(payloads) == 3
    for attempt, path in enumerate(payloads, start=1):
        record = json.loads(path.read_text())
        assert record["attempt"] == attempt
        assert record["request"]["path"] == VA_SMALL_PATH
        assert record["request"]["params"]["resolution"] == "hourly"
        assert record["error_type"] == "MalformedResponseError"
        assert (folder / record["body_file"]).stat().st_size == record["body_bytes"] > 0
    assert len(list(folder.glob("*-failed.json"))) == 1
    for path in folder.iterdir():
        assert b"Bearer" not in path.read_bytes()

    assert str(folder) in failure_line(summary)
    connection = _connect(data_dir)
    try:
        status, failed_windows = connection.execute("select status, failed_windows from runs").fetchone()
        watermarks = {row[0] for row in connection.execute("select entity_id || '/' || resolution from watermarks").fetchall()}
    finally:
        connection.close()
    assert status == "failed"
    assert [window["window"] for window in json.loads(failed_windows)] == [failed["window"]]
    assert f"{VA_SMALL}/hourly" not in watermarks
    assert f"{VA_LARGE}/hourly" in watermarks


def test_flow_refetches_malformed_body_with_valid_ending(org: SmallOrg, prefect_harness, tmp_path) -> None:
    """A body with a broken start and a valid null cursor at its end passes the client's look
    at its end. The normaliser rejects it, and the window is fetched again."""
    data_dir = tmp_path / "data"

    def break_start(body: bytes) -> bytes:
        return b"[" + body[1:]

    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.script(VA_SMALL_PATH, Reply(rewrite=break_start), query_contains="resolution=hourly")
        summary = _run(org, server, data_dir, start=START, end=END)
        served = [item for item in scripted.served_to(VA_SMALL_PATH) if "resolution=hourly" in item.query]

    assert summary["status"] == "success"
    assert len(served) == 2
    assert _count(data_dir, "entity_id = ? and resolution = 'hourly'", [VA_SMALL]) > 0
    (payload,) = (data_dir / "quarantine" / summary["run_id"]).glob("*-hourly-*Z.json")
    record = json.loads(payload.read_text())
    assert record["error_type"] == "MalformedResponseError"
    assert (payload.parent / record["body_file"]).read_bytes()[:1] == b"["


def test_window_retry_refetches_and_errors_fail_window(org: SmallOrg, prefect_harness, tmp_path) -> None:
    """The client makes 2 attempts per request. VA-S's daily window gets two 500s, so its first
    fetch fails and the window retry fetches it. VA-L's daily window gets 500 on every attempt
    of every fetch and is reported as failed, never loaded as an empty window."""
    data_dir = tmp_path / "data"
    task_runs = 1 + batches.WINDOW_RETRIES
    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.script(VA_SMALL_PATH, Reply(status=500), Reply(status=500), query_contains="resolution=daily")
        scripted.script(VA_LARGE_PATH, *[Reply(status=500)] * (2 * task_runs), query_contains="resolution=daily")
        summary = _run(org, server, data_dir, start=START, end=END)
        small = [item.status for item in scripted.served_to(VA_SMALL_PATH) if "resolution=daily" in item.query]
        large = [item.status for item in scripted.served_to(VA_LARGE_PATH) if "resolution=daily" in item.query]

    assert small == [500, 500, 200]
    assert large == [500] * (2 * task_runs)
    assert _count(data_dir, "entity_id = ? and resolution = 'daily'", [VA_SMALL]) > 0
    assert _count(data_dir, "entity_id = ? and resolution = 'daily'", [VA_LARGE]) == 0
    assert summary["status"] == "failed"
    assert [(window["entity_id"], window["error_type"]) for window in summary["failed_windows"]] == [(VA_LARGE, "ApiError")]
    assert "HTTP 500" in summary["failed_windows"][0]["error"]


def test_prefect_fetch_tasks_never_share_results(org: SmallOrg, prefect_harness, tmp_path) -> None:
    """Each task run fetches its own windows: a job listed twice is requested twice, and every
    result carries its own job and only rows of its own entity and window."""
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    days = [(local_midnight(START), local_midnight(START + timedelta(days=1))),
            (local_midnight(START + timedelta(days=1)), local_midnight(END))]
    jobs = [FetchJob("virtual_asset", entity_id, "hourly", *window) for entity_id in (VA_SMALL, VA_LARGE) for window in days]
    jobs.append(jobs[0])
    store = ParquetStore(tmp_path / "data")

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=4))
    def fetch_jobs(run_id: str) -> list:
        return flows._fetch_all(run_id, jobs, org.settings.pipeline.windows_per_task, flows.fetch_threads(org.settings))

    with serve_small_org(org, scripted=True) as (server, scripted):
        settings = load_settings(org.config_dir / "terralayr.toml", base_url=server.base_url)
        run_id = str(uuid.uuid4())
        try:
            with ApiClient(settings, credentials_of(org)) as client:
                flows._RUNTIMES[run_id] = flows._Runtime(client, store, Quarantine(tmp_path / "data", run_id), 0)
                results, failures = fetch_jobs(run_id)
        finally:
            flows._RUNTIMES.pop(run_id, None)
        first_job_requests = [
            item for item in scripted.served_to(VA_SMALL_PATH) if _query_of(item)["start"] == "2024-10-25T22:00:00Z"
        ]

    assert failures == []
    assert len(first_job_requests) == 2
    assert sorted(result.job.describe() for result in results) == sorted(job.describe() for job in jobs)
    for result in results:
        job = result.job
        hours = int((job.window_end - job.window_start) / timedelta(hours=1))
        assert result.rows == hours * len(CATEGORY_NAMES)
        assert result.files == [str(store.root / "datapoints" / "resolution=hourly" / "entity_type=virtual_asset"
                                    / "month=2024-10" / f"{job.entity_id}_2024-10-01.parquet")]
        in_window = duckdb.execute(
            "select count(*) from read_parquet(?) where period_start >= ? and period_start < ?",
            [result.files[0], job.window_start, job.window_end],
        ).fetchone()[0]
        assert in_window == result.rows


# Missing categories and unsafe ids


def _drop_category(category: str):
    def rewrite(path: str, query: str, body: bytes) -> bytes:
        if path != VA_SMALL_PATH or "resolution=15min" not in query:
            return body
        document = msgspec.json.decode(body)
        document["data"].pop(category, None)
        document["metaData"] = [entry for entry in document["metaData"] if entry["dataPointName"] != category]
        return msgspec.json.encode(document)

    return rewrite


def test_flow_missing_category_loaded_absent_reported_once(
    org: SmallOrg, prefect_harness, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.rewrite_all(_drop_category("revenue_vba"))
        with caplog.at_level(logging.WARNING):
            summary = _run(org, server, data_dir, start=START, end=END)
        served = [item for item in scripted.served_to(VA_SMALL_PATH) if "resolution=15min" in item.query]

    assert len(served) == 1 + org.settings.pipeline.refetch_attempts
    assert summary["failed_windows"] == []
    assert summary["missing_categories"] == {"revenue_vba": 1}
    reports = [record for record in caplog.records if "loaded without these requested categories" in record.getMessage()]
    assert len(reports) == 1
    assert "revenue_vba (1 windows)" in reports[0].getMessage()
    assert _count(data_dir, "entity_id = ? and resolution = '15min' and category = 'revenue_vba'", [VA_SMALL]) == 0
    assert _count(data_dir, "entity_id = ? and resolution = '15min' and category = 'revenue_wholesale'", [VA_SMALL]) == 96 + 100
    assert _count(data_dir, "entity_id = ? and resolution = '15min' and category = 'revenue_vba'", [VA_LARGE]) == 96 + 100


def _add_unsafe_assets(path: str, query: str, body: bytes) -> bytes:
    if not path.endswith("/virtual-assets"):
        return body
    assets = msgspec.json.decode(body)
    return msgspec.json.encode([*assets, {**assets[0], "id": "../x"}, {**assets[0], "id": "a/b"}])


def test_flow_rejects_unsafe_virtual_asset_ids(org: SmallOrg, prefect_harness, tmp_path) -> None:
    data_dir = tmp_path / "data"
    before = {path.resolve() for path in tmp_path.parent.iterdir()}
    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.rewrite_all(_add_unsafe_assets)
        summary = _run(org, server, data_dir, start=START, end=END)
        requested = {item.path for item in scripted.served}

    rejected = summary["report"]["rejected_virtual_assets"]
    assert summary["status"] == "failed"
    assert len(rejected) == 2
    assert "invalid virtual asset id '../x'" in rejected[0]
    assert "invalid virtual asset id 'a/b'" in rejected[1]
    assert "'../x'" in failure_line(summary)
    assert not any("/x/" in path or "/a/b/" in path or path.endswith("/x") for path in requested)
    assert _count(data_dir, "entity_id in (?, ?)", [VA_SMALL, VA_LARGE]) > 0

    assert {path.resolve() for path in tmp_path.parent.iterdir()} == before
    assert [path.name for path in tmp_path.iterdir()] == ["data"]
    for path in data_dir.rglob("*"):
        assert path.resolve().is_relative_to(data_dir.resolve())
        assert path.name not in ("x", "a", "b")
    connection = _connect(data_dir)
    try:
        ids = {row[0] for row in connection.execute("select virtual_asset_id from virtual_assets").fetchall()}
    finally:
        connection.close()
    assert ids == {VA_SMALL, VA_LARGE}


# Incremental runs


def _discovery() -> Discovery:
    active = (datetime(2024, 1, 1, tzinfo=UTC), datetime(2031, 1, 1, tzinfo=UTC))
    entities = (
        Entity("virtual_asset", VA_SMALL, *active),
        Entity("virtual_asset", VA_LARGE, *active),
        Entity("portfolio", PORTFOLIO, *active),
    )
    return Discovery((), entities, ())


def test_plan_starts_per_series_watermark(org: SmallOrg) -> None:
    settings = org.settings
    lookback = settings.pipeline.lookback_days
    watermarks = {
        ("virtual_asset", VA_SMALL, "15min"): local_midnight(date(2024, 10, 20)) + timedelta(hours=23, minutes=45),
        ("virtual_asset", VA_SMALL, "hourly"): local_midnight(date(2024, 10, 24)) + timedelta(hours=23),
        ("virtual_asset", VA_LARGE, "15min"): local_midnight(date(2024, 10, 26)),
    }
    starts = plan_starts(_discovery(), ["15min", "hourly"], watermarks, settings)

    assert starts[("virtual_asset", VA_SMALL, "15min")] == date(2024, 10, 20) - timedelta(days=lookback)
    assert starts[("virtual_asset", VA_SMALL, "hourly")] == date(2024, 10, 24) - timedelta(days=lookback)
    assert starts[("virtual_asset", VA_LARGE, "15min")] == date(2024, 10, 26) - timedelta(days=lookback)
    assert starts[("virtual_asset", VA_LARGE, "hourly")] == settings.pipeline.history_start
    assert starts[("portfolio", PORTFOLIO, "15min")] == settings.pipeline.history_start


def test_plan_jobs_uses_each_series_start(org: SmallOrg) -> None:
    settings = org.settings.model_copy(
        update={"pipeline": org.settings.pipeline.model_copy(update={"fetch_revenue_buckets": True})}
    )
    starts = {
        ("virtual_asset", VA_SMALL, "daily"): date(2024, 10, 20),
        ("virtual_asset", VA_LARGE, "daily"): date(2024, 10, 25),
        ("portfolio", PORTFOLIO, "daily"): date(2024, 10, 27),
    }
    jobs = plan_jobs(_discovery(), settings, ["daily"], date(2024, 1, 1), date(2024, 10, 28), starts)

    first = {}
    for job in jobs:
        key = (job.entity_id, job.product)
        first[key] = min(first.get(key, job.window_start), job.window_start)
    assert first[(VA_SMALL, None)] == local_midnight(date(2024, 10, 20))
    assert first[(VA_LARGE, None)] == local_midnight(date(2024, 10, 25))
    assert first[(PORTFOLIO, None)] == local_midnight(date(2024, 10, 27))
    assert first[(VA_SMALL, "wholesale")] == local_midnight(date(2024, 10, 20))
    assert max(job.window_end for job in jobs) == local_midnight(date(2024, 10, 28))


def test_nightly_run_starts_at_each_watermark(tmp_path_factory: pytest.TempPathFactory, prefect_harness, tmp_path) -> None:
    """Without --start: series without a watermark start at history_start, the others at their
    own watermark's local day minus the lookback. A stale ``running`` row becomes ``killed``."""
    org = write_small_org(
        tmp_path_factory.mktemp("incremental-config"),
        pipeline={"history_start": "2024-10-24", "lookback_days": 1, "fetch_revenue_buckets": False},
    )
    data_dir = tmp_path / "data"
    with serve_small_org(org, scripted=True) as (server, scripted):
        first = _run(org, server, data_dir, end=END, resolutions=["hourly"])
        with Warehouse(data_dir / "warehouse.duckdb") as warehouse:
            warehouse.set_watermarks([("virtual_asset", VA_SMALL, "hourly", local_midnight(date(2024, 10, 26)))])
            warehouse.connection.execute("delete from watermarks where entity_id = ?", [FLEET])
            warehouse.start_run("stale-run", "test", {})
        served_before = len(scripted.served)
        second = _run(org, server, data_dir, end=END + timedelta(days=1), resolutions=["hourly"])
        starts = {}
        for item in scripted.served[served_before:]:
            if item.path.endswith("/datapoints"):
                entity_id = item.path.split("/")[3]
                starts[entity_id] = min(starts.get(entity_id, "9999"), _query_of(item)["start"])

    assert first["incremental"] is True
    assert first["start"] == "2024-10-24"
    assert second["status"] == "success"
    # Watermarks after the first run: 2024-10-27 local for every series.
    assert starts[VA_LARGE] == "2024-10-25T22:00:00Z"
    assert starts[PORTFOLIO] == "2024-10-25T22:00:00Z"
    assert starts[VA_SMALL] == "2024-10-24T22:00:00Z"
    assert starts[FLEET] == "2024-10-23T22:00:00Z"
    connection = _connect(data_dir)
    try:
        statuses = dict(connection.execute("select run_id, status from runs").fetchall())
    finally:
        connection.close()
    assert statuses["stale-run"] == "killed"
    assert statuses[second["run_id"]] == "success"


# The command line


def test_cli_failed_window_prints_quarantine_line(org: SmallOrg, prefect_harness, tmp_path) -> None:
    data_dir = tmp_path / "data"

    def corrupt(path: str, query: str, body: bytes) -> bytes:
        return body[: len(body) // 2] if path == VA_LARGE_PATH and "resolution=daily" in query else body

    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.rewrite_all(corrupt)
        env = cli_env(org, server.base_url, PREFECT_API_URL=harness_api_url())
        done = run_cli(["run", "--start", START.isoformat(), "--end", END.isoformat(), "--data-dir", str(data_dir)], env)

    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 3, done.stderr[-2000:]
    assert len(errors) == 1
    quarantine = next((data_dir / "quarantine").iterdir())
    assert str(quarantine) in errors[0]
    assert "1 windows were not loaded" in errors[0]
    assert "Traceback" not in done.stderr


def test_flow_step_sizes_from_config(
    org: SmallOrg, prefect_harness, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    tiny = write_small_org(tmp_path / "config", pipeline={"load_batch_rows": 1, "check_chunk_rows": 1})
    caplog.set_level(logging.INFO)
    with serve_small_org(tiny) as (server, _):
        small_steps = _run(tiny, server, tmp_path / "tiny", start=START, end=END)
    tiny_log = caplog.text
    caplog.clear()
    with serve_small_org(org) as (server, _):
        default = _run(org, server, tmp_path / "default", start=START, end=END)

    # One batch per Parquet file, one chunk per local day; the same rows and check results.
    loaded = re.search(r"from ([\d,]+) Parquet files in (\d+) batches", tiny_log)
    assert loaded is not None and loaded.group(1) == loaded.group(2) != "1"
    assert f"check tables in {(END - START).days} chunks of days" in tiny_log
    assert "chunks of days" not in caplog.text
    assert small_steps["rows_loaded"] == default["rows_loaded"] > 0
    assert small_steps["checks"]["by_check"] == default["checks"]["by_check"]
    assert warehouse_digest(tmp_path / "tiny" / "warehouse.duckdb") == warehouse_digest(
        tmp_path / "default" / "warehouse.duckdb"
    )


def _run_cli_on_changed_warehouse(org: SmallOrg, data_dir: Path, *changes: str) -> subprocess.CompletedProcess:
    """Apply ``changes`` to a new warehouse by hand, then run the CLI's 'run' into it."""
    with Warehouse(data_dir / "warehouse.duckdb") as warehouse:
        for statement in changes:
            warehouse.connection.execute(statement)

    with serve_small_org(org) as (server, _):
        env = cli_env(org, server.base_url, PREFECT_API_URL=harness_api_url())
        return run_cli(["run", "--start", START.isoformat(), "--end", END.isoformat(), "--data-dir", str(data_dir)], env)


def test_cli_crash_exit_5(org: SmallOrg, prefect_harness, tmp_path) -> None:
    """A warehouse table changed by hand makes the load fail inside DuckDB. The CLI exits 5 (not
    1, which means a check failed), its last line names the error and the run, the traceback
    appears once, and the run's row has status failed and the error."""
    data_dir = tmp_path / "data"
    done = _run_cli_on_changed_warehouse(org, data_dir, "alter table virtual_assets drop column delivery_zone")

    assert done.returncode == 5, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: terralayr-etl stopped on an unexpected BinderException")
    assert "delivery_zone" in last
    assert org.organisation.password not in done.stderr + done.stdout
    connection = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    try:
        run_id, status, windows, report = connection.execute("select run_id, status, windows, report from runs").fetchone()
    finally:
        connection.close()
    assert status == "failed"
    assert f"Run {run_id} is marked failed in the runs table of {data_dir / 'warehouse.duckdb'}." in last
    assert windows > 0
    assert json.loads(report)["error"].startswith("BinderException: ")
    # Prefect logs the traceback for the task run and the flow run; the CLI adds none.
    assert done.stderr.count("Traceback (most recent call last)") == 2


def test_cli_crash_before_run_recorded(org: SmallOrg, prefect_harness, tmp_path) -> None:
    """A runs table changed by hand fails the flow before its run is recorded. The flow run's
    log contains the traceback, so the CLI prints none and points at that log."""
    done = _run_cli_on_changed_warehouse(org, tmp_path / "data", "alter table runs drop column status")

    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 5, done.stderr[-3000:]
    assert last.startswith("error: terralayr-etl stopped on an unexpected BinderException")
    assert "the traceback in the flow run's log above" in last
    assert "Run " not in last
    assert done.stderr.count("Traceback (most recent call last)") == 1


def test_cli_crash_keeps_cause_when_record_fails(org: SmallOrg, prefect_harness, tmp_path) -> None:
    """With the runs table also changed by hand, recording the failed run fails too. The closing
    line still names the load's error and reports that the run could not be marked failed."""
    done = _run_cli_on_changed_warehouse(
        org,
        tmp_path / "data",
        "alter table virtual_assets drop column delivery_zone",
        "alter table runs drop column check_summary",
    )

    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 5, done.stderr[-3000:]
    assert "unexpected BinderException" in last
    assert "delivery_zone" in last
    assert "could not be marked failed" in last
    assert "the next run marks it killed" in last


def test_cli_check_changed_table(org: SmallOrg, tmp_path) -> None:
    data_dir = tmp_path / "data"
    with Warehouse(data_dir / "warehouse.duckdb") as warehouse:
        warehouse.connection.execute("alter table virtual_assets drop column delivery_zone")

    done = run_cli(["check", "--data-dir", str(data_dir)], cli_env(org, "http://127.0.0.1:9"))

    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert lines[-1].startswith("error: SQL model stg_virtual_assets")
    assert "delivery_zone" in lines[-1]
    assert "a warehouse table it reads is missing or was changed by hand" in lines[-1]


@pytest.mark.parametrize(
    ("case", "args", "change", "message"),
    [
        ("unknown resolution", ["--resolution", "5min"], {}, "unknown resolution '5min'"),
        ("end before start", ["--start", "2024-10-28", "--end", "2024-10-26"], {}, "is not after --start"),
        ("invalid date", ["--start", "2024-13-01"], {}, "invalid --start '2024-13-01'"),
        ("no such day", ["--start", "2024-11-31"], {}, "'2024-11-31': no such day in the calendar"),
        ("date in another form", ["--start", "31.10.2024"], {}, "use the form YYYY-MM-DD"),
        ("missing password", [], {"TERRALAYR_PASSWORD": ""}, "TERRALAYR_PASSWORD not set"),
        ("missing organisation", [], {"TERRALAYR_ORGANISATION_ID": ""}, "TERRALAYR_ORGANISATION_ID is not set"),
        ("wrong password", [], {"TERRALAYR_PASSWORD": "not-the-password"}, "was rejected with HTTP 401"),
    ],
)
def test_cli_user_error_one_line_exit_2(org: SmallOrg, tmp_path, case: str, args: list[str], change: dict, message: str) -> None:
    with serve_small_org(org) as (server, _):
        env = {**cli_env(org, server.base_url), **change}
        done = run_cli(["run", *args, "--data-dir", str(tmp_path / "data")], env)

    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "not-the-password" not in done.stderr + done.stdout


def test_cli_config_typo_one_line_exit_2(org: SmallOrg, tmp_path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    text = (org.config_dir / "terralayr.toml").read_text().replace("timeout_seconds = ", "timeout_secnds = ", 1)
    (config_dir / "terralayr.toml").write_text(text)
    env = cli_env(org, "http://127.0.0.1:9", TERRALAYR_CONFIG_DIR=str(config_dir))
    done = run_cli(["run", "--data-dir", str(tmp_path / "data")], env)

    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "api.timeout_secnds: Extra inputs are not permitted" in lines[0]
    assert str(config_dir / "terralayr.toml") in lines[0]


def test_cli_second_process_gets_lock_error(org: SmallOrg, prefect_harness, tmp_path) -> None:
    """The first process keeps the warehouse locked while the sandbox delays its data requests.
    The second process, started meanwhile, must stop with one line and exit 2."""
    data_dir = tmp_path / "data"
    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.hold("/revenue-reporting/")
        env = cli_env(org, server.base_url, PREFECT_API_URL=harness_api_url())
        args = ["run", "--start", START.isoformat(), "--end", END.isoformat(), "--data-dir", str(data_dir)]
        first_log = tmp_path / "first.stderr"
        with first_log.open("w") as stderr:
            first = subprocess.Popen(
                [str(Path(sys.executable).with_name("terralayr-etl")), *args],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            wait_for(lambda: "Planned" in first_log.read_text(), 90, "the first run to hold the warehouse")
            second = run_cli(args, env)
        finally:
            scripted.release()
            first.wait(timeout=120)

    assert second.returncode == 2, second.stderr
    second_lines = second.stderr.strip().splitlines()
    assert len(second_lines) == 1, second.stderr
    expected = f"warehouse {data_dir / 'warehouse.duckdb'} is in use by another terralayr-etl process (pid {first.pid})"
    assert expected in second_lines[0]
    assert first.returncode == 0, first_log.read_text()[-3000:]


def test_flow_unparsable_listing_names_quarantine(org: SmallOrg, prefect_harness, tmp_path) -> None:
    """The virtual-asset list is truncated on every fetch: the run stops with an error that
    names the quarantine folder, which contains each fetched payload."""
    data_dir = tmp_path / "data"
    listing = f"/organisations/{org.organisation.id}/virtual-assets"
    fetches = 1 + org.settings.pipeline.refetch_attempts
    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.script(listing, *[Reply(truncate=True)] * fetches)
        with pytest.raises(MalformedResponseError) as caught:
            _run(org, server, data_dir, start=START, end=END)
        served = scripted.served_to(listing)

    message = str(caught.value)
    assert len(served) == fetches
    assert f"could not be parsed in {fetches} fetches" in message
    folders = list((data_dir / "quarantine").iterdir())
    assert len(folders) == 1
    assert str(folders[0]) in message
    assert len(list(folders[0].glob("*-virtual-assets.json"))) == fetches


def test_flow_project_error_logged_without_traceback(
    org: SmallOrg, prefect_harness, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """Discovery gets 404, which no retry resolves: the flow fails with the ApiError, its run is
    recorded as failed, and Prefect's failure logs carry the message without a traceback."""
    data_dir = tmp_path / "data"
    listing = f"/organisations/{org.organisation.id}/virtual-assets"
    with serve_small_org(org, scripted=True) as (server, scripted):
        scripted.script(listing, Reply(status=404))
        with caplog.at_level(logging.INFO), pytest.raises(ApiError) as caught:
            _run(org, server, data_dir, start=START, end=END)

    assert caught.value.status_code == 404
    prefect_records = [record for record in caplog.records if record.name.startswith("prefect.")]
    failures = [record for record in prefect_records if "ApiError" in record.getMessage()]
    assert failures
    assert all(record.exc_info is None for record in prefect_records)
    assert "Traceback" not in caplog.text
    connection = _connect(data_dir)
    try:
        assert connection.execute("select status from runs").fetchall() == [("failed",)]
    finally:
        connection.close()
