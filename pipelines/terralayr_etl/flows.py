"""Prefect flow ``nightly``: discover, fetch per (entity, resolution, window), load, model, check.

The flow stays thin; the work lives in ``pipeline.py``, ``warehouse.py`` and ``models.py``.
Objects that cannot travel as task parameters (the pooled HTTP client, the Parquet store) sit in
a per-run registry keyed by run id, so tasks receive only plain values.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from terralayr_etl import __version__
from terralayr_etl.client import ApiClient
from terralayr_etl.config import Settings, load_credentials, load_settings
from terralayr_etl.models import run_checks, run_models
from terralayr_etl.pipeline import (
    Discovery,
    FetchJob,
    WindowResult,
    default_end_day,
    discover,
    fetch_window,
    lookback_start,
    plan_jobs,
)
from terralayr_etl.storage import ParquetStore
from terralayr_etl.timeutil import parse_day
from terralayr_etl.warehouse import Warehouse

logger = logging.getLogger("terralayr_etl.flows")


@dataclass
class _Runtime:
    client: ApiClient
    store: ParquetStore


_RUNTIMES: dict[str, _Runtime] = {}
_RUNTIMES_LOCK = threading.Lock()


def _runtime(run_id: str) -> _Runtime:
    with _RUNTIMES_LOCK:
        return _RUNTIMES[run_id]


@task(name="discover", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, persist_result=False)
def discover_task(run_id: str, settings: Settings, start_day: date, end_day: date) -> Discovery:
    return discover(_runtime(run_id).client, settings, start_day, end_day)


# NO_CACHE: a task run must never return the result of another window or entity, and a
# retried task must fetch again instead of replaying a stored result.
@task(name="fetch-window", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, persist_result=False)
def fetch_window_task(run_id: str, job: FetchJob) -> WindowResult:
    runtime = _runtime(run_id)
    return fetch_window(runtime.client, runtime.store, job, run_id)


@task(name="load", cache_policy=NO_CACHE, persist_result=False)
def load_task(warehouse: Warehouse, discovery: Discovery, results: list[WindowResult]) -> int:
    datapoint_files = sorted({path for result in results if not result.job.product for path in result.files})
    bucket_files = sorted({path for result in results if result.job.product for path in result.files})
    warehouse.replace_virtual_assets(list(discovery.virtual_assets))
    warehouse.replace_entity_members(list(discovery.members))
    rows = warehouse.load_datapoints([Path(path) for path in datapoint_files])
    rows += warehouse.load_revenue_buckets([Path(path) for path in bucket_files])
    get_run_logger().info("Loaded %d rows from %d Parquet files", rows, len(datapoint_files) + len(bucket_files))
    return rows


@task(name="model-and-check", cache_policy=NO_CACHE, persist_result=False)
def model_and_check_task(warehouse: Warehouse) -> dict:
    built = run_models(warehouse.connection)
    summary = run_checks(warehouse.connection)
    get_run_logger().info(
        "Built %d models; checks: %d passed, %d failed", len(built), summary.passed, summary.failed
    )
    return asdict(summary)


def _check_markdown(summary: dict) -> str:
    lines = ["| check | passed | failed |", "|---|---|---|"]
    for name, counts in sorted(summary["by_check"].items()):
        lines.append(f"| {name} | {counts.get('pass', 0)} | {counts.get('fail', 0)} |")
    return "\n".join(lines)


def _fetch_all(run_id: str, jobs: list[FetchJob]) -> list[WindowResult]:
    """Fetch every window on the task runner's thread pool, logging progress every tenth."""
    log = get_run_logger()
    futures = fetch_window_task.map(run_id, jobs)
    results = []
    step = max(1, len(jobs) // 10)
    for future in as_completed(list(futures)):
        results.append(future.result())
        if len(results) % step == 0 or len(results) == len(jobs):
            log.info("Fetched %d of %d windows", len(results), len(jobs))
    return results


def _start_day(warehouse: Warehouse, settings: Settings, resolutions: list[str]) -> date:
    """The incremental start: the earliest watermark minus the lookback, or the history start."""
    watermark = warehouse.earliest_watermark(resolutions)
    return lookback_start(watermark, settings)


@flow(name="nightly", persist_result=False, validate_parameters=False)
def nightly(
    start: str | None = None,
    end: str | None = None,
    resolutions: list[str] | None = None,
    data_dir: str | None = None,
) -> dict:
    """Fetch ``[start, end)`` (local days; default: from the watermark minus the lookback to
    today), load it into DuckDB, build the SQL models and run the checks.

    Credentials are read from the environment inside the run and are never flow parameters.
    """
    settings = load_settings()
    credentials = load_credentials()
    resolutions = list(resolutions or settings.pipeline.resolutions)
    data_path = Path(data_dir or settings.pipeline.data_dir)
    run_id = str(uuid.uuid4())
    log = get_run_logger()

    store = ParquetStore(data_path)
    store.clean_temp_files()
    with Warehouse(data_path / "warehouse.duckdb") as warehouse, ApiClient(settings, credentials) as client:
        start_day = parse_day(start, option="--start") if start else _start_day(warehouse, settings, resolutions)
        end_day = parse_day(end, option="--end") if end else default_end_day()
        parameters = {"start": start_day.isoformat(), "end": end_day.isoformat(), "resolutions": resolutions}
        warehouse.start_run(run_id, __version__, parameters)
        with _RUNTIMES_LOCK:
            _RUNTIMES[run_id] = _Runtime(client, store)
        try:
            log.info("Run %s: local days %s to %s (end exclusive), resolutions %s", run_id, start_day, end_day, resolutions)
            discovery = discover_task(run_id, settings, start_day, end_day)
            jobs = plan_jobs(discovery, settings, resolutions, start_day, end_day)
            log.info("Planned %d request windows for %d entities", len(jobs), len(discovery.entities))
            results = _fetch_all(run_id, jobs)
            rows = load_task(warehouse, discovery, results)
            warehouse.update_watermarks(resolutions)
            checks = model_and_check_task(warehouse)
        except BaseException:
            warehouse.finish_run(run_id, status="failed", windows=0, requests=client.stats.requests,
                                 retries=client.stats.retries, rows=0, check_summary={})
            raise
        finally:
            with _RUNTIMES_LOCK:
                _RUNTIMES.pop(run_id, None)

        unknown = sorted({name for result in results for name in result.unknown_categories})
        if unknown:
            log.warning("The API sent categories this version does not know; they were kept: %s", ", ".join(unknown))
        status = "success" if checks["failed"] == 0 else "checks_failed"
        warehouse.finish_run(
            run_id,
            status=status,
            windows=len(jobs),
            requests=client.stats.requests,
            retries=client.stats.retries,
            rows=rows,
            check_summary={"passed": checks["passed"], "failed": checks["failed"], "by_check": checks["by_check"]},
        )
        create_markdown_artifact(
            key="cross-check-summary",
            markdown=f"# Cross-check summary\n\nRun `{run_id}`: {checks['passed']} passed, {checks['failed']} failed.\n\n"
            + _check_markdown(checks),
            description="SQL checks of the API data against recomputed values",
        )
        return {
            "run_id": run_id,
            "status": status,
            "start": start_day.isoformat(),
            "end": end_day.isoformat(),
            "windows": len(jobs),
            "requests": client.stats.requests,
            "retries": client.stats.retries,
            "rows_loaded": rows,
            "unknown_categories": unknown,
            "checks": checks,
            "finished_at": datetime.now(UTC).isoformat(),
        }


def run_nightly(
    *,
    start: date | None = None,
    end: date | None = None,
    resolutions: list[str] | None = None,
    data_dir: Path | None = None,
    settings: Settings | None = None,
) -> dict:
    """Run the ``nightly`` flow with a thread pool sized by ``api.max_concurrency``."""
    settings = settings or load_settings()
    configured = nightly.with_options(task_runner=ThreadPoolTaskRunner(max_workers=settings.api.max_concurrency))
    return configured(
        start=start.isoformat() if start else None,
        end=end.isoformat() if end else None,
        resolutions=resolutions,
        data_dir=str(data_dir) if data_dir else None,
    )
