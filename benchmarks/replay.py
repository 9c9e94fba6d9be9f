"""Record API responses to disk once, then replay them through the pipeline without a network.

Recording plans the same request windows as a pipeline run (``pipeline.discover`` and
``pipeline.plan_jobs``) and stores every page's body as the sandbox sent it. Replaying runs
``pipeline.fetch_window`` with a client that reads those bodies from disk, so decoding,
normalising and the Parquet writes are the pipeline's own code, followed by the DuckDB load.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import date, datetime
from pathlib import Path

from terralayr_etl.client import ApiClient, RawResponse
from terralayr_etl.config import Credentials, Settings
from terralayr_etl.normalise import normalise_datapoints, normalise_revenue_buckets
from terralayr_etl.fetching import fetch_window
from terralayr_etl.pipeline import FetchJob, WindowResult, discover, plan_jobs
from terralayr_etl.storage import ParquetStore
from terralayr_etl.warehouse import Warehouse

logger = logging.getLogger("benchmarks.replay")

MANIFEST = "manifest.json"
RUN_ID = "benchmark-replay"

_JobKey = tuple[str, str, str, datetime, datetime, str | None]


@dataclass(frozen=True)
class RecordedPage:
    """One stored response body and the request that returned it."""

    file: str
    endpoint: str
    window_start: datetime
    window_end: datetime


def _job_key(job: FetchJob) -> _JobKey:
    return (job.entity_type, job.entity_id, job.resolution, job.window_start, job.window_end, job.product)


def record(
    settings: Settings,
    credentials: Credentials,
    start_day: date,
    end_day: date,
    folder: Path,
    *,
    resolutions: tuple[str, ...] | None = None,
) -> dict[str, int]:
    """Fetch every window of ``[start_day, end_day)`` and store the bodies under ``folder``.

    Returns the number of jobs, pages and body bytes recorded.
    """
    pages_dir = folder / "pages"
    pages_dir.mkdir(parents=True, exist_ok=True)
    with ApiClient(settings, credentials) as client:
        discovery = discover(client, settings, start_day, end_day)
        jobs = plan_jobs(discovery, settings, resolutions or settings.pipeline.resolutions, start_day, end_day)
        with ThreadPoolExecutor(settings.api.max_concurrency) as pool:
            recorded = list(pool.map(lambda item: _record_job(client, pages_dir, *item), enumerate(jobs)))

    manifest = [
        {"job": _job_json(job), "pages": [_page_json(page) for page in pages]}
        for job, pages in zip(jobs, recorded, strict=True)
    ]
    (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    page_count = sum(len(pages) for pages in recorded)
    body_bytes = sum((folder / page.file).stat().st_size for pages in recorded for page in pages)
    logger.info("Recorded %d jobs, %d pages, %d bytes under %s", len(jobs), page_count, body_bytes, folder)
    return {"jobs": len(jobs), "pages": page_count, "body_bytes": body_bytes}


def _record_job(client: ApiClient, pages_dir: Path, index: int, job: FetchJob) -> list[RecordedPage]:
    if job.product:
        responses = [client.fetch_revenue_buckets(job.entity_id, job.product, job.window_start, job.window_end)]
    else:
        responses = client.fetch_datapoints(job.entity_type, job.entity_id, job.resolution, job.window_start, job.window_end)
    pages = []
    for number, response in enumerate(responses):
        path = pages_dir / f"{index:06d}-{number:03d}.json"
        path.write_bytes(response.body)
        pages.append(
            RecordedPage(
                file=str(path.relative_to(pages_dir.parent)),
                endpoint=response.endpoint,
                window_start=response.window_start,
                window_end=response.window_end,
            )
        )
    return pages


def _job_json(job: FetchJob) -> dict:
    values = asdict(job)
    values["window_start"] = job.window_start.isoformat()
    values["window_end"] = job.window_end.isoformat()
    return values


def _page_json(page: RecordedPage) -> dict:
    return {
        "file": page.file,
        "endpoint": page.endpoint,
        "window_start": page.window_start.isoformat(),
        "window_end": page.window_end.isoformat(),
    }


def load_manifest(folder: Path) -> list[tuple[FetchJob, list[RecordedPage]]]:
    """Read the jobs and their pages recorded under ``folder``."""
    entries = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    result = []
    for entry in entries:
        job_values = dict(entry["job"])
        job_values["window_start"] = datetime.fromisoformat(job_values["window_start"])
        job_values["window_end"] = datetime.fromisoformat(job_values["window_end"])
        pages = [
            RecordedPage(
                file=page["file"],
                endpoint=page["endpoint"],
                window_start=datetime.fromisoformat(page["window_start"]),
                window_end=datetime.fromisoformat(page["window_end"]),
            )
            for page in entry["pages"]
        ]
        result.append((FetchJob(**job_values), pages))
    return result


class ReplayClient:
    """A stand-in for ApiClient in ``fetch_window`` that reads the recorded bodies from disk."""

    def __init__(self, folder: Path, recorded: list[tuple[FetchJob, list[RecordedPage]]]):
        self._folder = folder
        self._pages = {_job_key(job): pages for job, pages in recorded}

    def fetch_datapoints(
        self, entity_type: str, entity_id: str, resolution: str, start: datetime, end: datetime, categories=None
    ) -> list[RawResponse]:
        pages = self._pages[(entity_type, entity_id, resolution, start, end, None)]
        return [self._response(page) for page in pages]

    def fetch_revenue_buckets(self, virtual_asset_id: str, product: str, start: datetime, end: datetime) -> RawResponse:
        (page,) = self._pages[("virtual_asset", virtual_asset_id, "daily", start, end, product)]
        return self._response(page)

    def _response(self, page: RecordedPage) -> RawResponse:
        body = (self._folder / page.file).read_bytes()
        return RawResponse(body, page.endpoint, {}, page.window_start, page.window_end, datetime.now().astimezone())


def replay(folder: Path, data_dir: Path, *, workers: int | None = None) -> dict[str, float]:
    """Replay the recording under ``folder`` into a fresh ``data_dir`` and time it.

    Windows go through ``fetch_window`` on ``workers`` threads (default: one per
    CPU), then every file written is loaded into ``data_dir/warehouse.duckdb``.
    """
    recorded = load_manifest(folder)
    client = ReplayClient(folder, recorded)
    store = ParquetStore(data_dir)
    workers = workers or os.cpu_count() or 1

    started, started_cpu = time.perf_counter(), time.process_time()
    with store.background_commits(), ThreadPoolExecutor(workers) as pool:
        results: list[WindowResult] = list(pool.map(lambda job: fetch_window(client, store, job, RUN_ID), [job for job, _ in recorded]))
    store.sync_folders()
    written, written_cpu = time.perf_counter(), time.process_time()
    with Warehouse(data_dir / "warehouse.duckdb") as warehouse:
        rows = warehouse.load_datapoints(sorted({Path(path) for result in results if not result.job.product for path in result.files}))
        rows += warehouse.load_revenue_buckets(sorted({Path(path) for result in results if result.job.product for path in result.files}))
    finished, finished_cpu = time.perf_counter(), time.process_time()

    wall_s = finished - started
    # CPU seconds of all threads, DuckDB's included. They show the work done even when other
    # processes on the machine stretch the wall time.
    return {
        "values": rows,
        "wall_s": wall_s,
        "values_per_s": rows / wall_s if wall_s else 0.0,
        "workers": workers,
        "fetch_window_s": written - started,
        "load_s": finished - written,
        "fetch_window_cpu_s": written_cpu - started_cpu,
        "load_cpu_s": finished_cpu - written_cpu,
    }


def decode_only(folder: Path) -> dict[str, float]:
    """Time decoding and normalising every recorded page on one thread, with no writes."""
    recorded = load_manifest(folder)
    bodies = [(job, page, (folder / page.file).read_bytes()) for job, pages in recorded for page in pages]
    fetched_at = datetime.now().astimezone()

    started = time.perf_counter()
    values = 0
    for job, page, body in bodies:
        if job.product:
            table = normalise_revenue_buckets(
                body, virtual_asset_id=job.entity_id, product=job.product, run_id=RUN_ID, fetched_at=fetched_at, endpoint=page.endpoint
            )
        else:
            table = normalise_datapoints(
                body,
                entity_type=job.entity_type,
                entity_id=job.entity_id,
                resolution=job.resolution,
                run_id=RUN_ID,
                fetched_at=fetched_at,
                endpoint=page.endpoint,
            ).table
        values += table.num_rows
    elapsed = time.perf_counter() - started
    return {"values": values, "wall_s": elapsed, "values_per_s": values / elapsed if elapsed else 0.0}
