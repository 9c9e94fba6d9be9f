"""Prefect flow ``nightly``: discover, fetch per-entity batches of windows, load, model, check.

The flow stays thin; the work lives in ``pipeline.py``, ``fetching.py``, ``boundaries.py``,
``warehouse.py`` and ``models.py``. Objects that cannot travel as task parameters (the pooled
HTTP client, the Parquet store, the quarantine) sit in a per-run registry keyed by run id, so
tasks receive only plain values.

A window that fails because the API kept failing or its payload could not be parsed does not
stop the run. The other windows are loaded, and the run is recorded with status ``failed`` and
the list of failed windows, which the caller also gets.
"""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from collections import deque
from concurrent.futures import wait
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import ExternalSignal
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from terralayr_etl import __version__
from terralayr_etl.boundaries import BoundaryReport, resolve_outside_rows
from terralayr_etl.client import ApiClient
from terralayr_etl.config import ENTITY_TYPES, Settings, load_credentials, load_settings
from terralayr_etl.batches import fetch_batch, is_transient, plan_batches
from terralayr_etl.errors import TerralayrError, error_chain, one_line
from terralayr_etl.fetching import fetch_window
from terralayr_etl.interrupts import noting_sigterm
from terralayr_etl.models import CHECK_CHUNK_ROWS, run_checks, run_models
from terralayr_etl.pipeline import (
    Discovery,
    FetchJob,
    RunSpan,
    WindowResult,
    check_resolutions,
    discover,
    plan_jobs,
    plan_starts,
    resolve_span,
)
from terralayr_etl.quarantine import Quarantine
from terralayr_etl.run_report import FailedWindow, build_report, log_report
from terralayr_etl.storage import ParquetStore
from terralayr_etl.timeutil import local_day_of
from terralayr_etl.warehouse import Warehouse

logger = logging.getLogger("terralayr_etl.flows")


class _NoTracebackForProjectErrors(logging.Filter):
    """Drop the traceback Prefect attaches to a failed task or flow run when the error is a
    TerralayrError: its message already names the value and the fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TerralayrError):
            record.exc_info = None
            record.exc_text = None
        return True


def install_traceback_filter() -> None:
    """Attach the filter to Prefect's flow-run and task-run loggers, once."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        prefect_logger = logging.getLogger(name)
        if not any(isinstance(existing, _NoTracebackForProjectErrors) for existing in prefect_logger.filters):
            prefect_logger.addFilter(_NoTracebackForProjectErrors())


install_traceback_filter()


@dataclass
class _Runtime:
    client: ApiClient
    store: ParquetStore
    quarantine: Quarantine
    refetch_attempts: int
    stopping: threading.Event = field(default_factory=threading.Event)
    """Set when the run is ending early: running fetch batches stop before their next window."""


STOP_WAIT_SECONDS = 10.0
"""How long an ending run waits for running fetch batches to finish their current window."""


RUN_NOTE_PREFIX = "terralayr-etl run "
"""Start of the note that a run which stopped on an error adds to that error."""

_RUNTIMES: dict[str, _Runtime] = {}
_RUNTIMES_LOCK = threading.Lock()


def _runtime(run_id: str) -> _Runtime:
    with _RUNTIMES_LOCK:
        return _RUNTIMES[run_id]


def _retry_transient_failures(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry after an API failure that may pass, not after a malformed
    payload (already fetched again inside the task) or a rejected request."""
    try:
        state.result()
    except Exception as exc:
        return is_transient(exc)
    return False


@task(name="discover", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE, persist_result=False,
      retry_condition_fn=_retry_transient_failures)
def discover_task(run_id: str, settings: Settings, start_day: date, end_day: date) -> Discovery:
    runtime = _runtime(run_id)
    return discover(
        runtime.client,
        settings,
        start_day,
        end_day,
        quarantine=runtime.quarantine,
        refetch_attempts=runtime.refetch_attempts,
    )


# NO_CACHE: a task run must never return the result of other windows, and each run must
# fetch instead of replaying a stored result.
@task(name="fetch-windows", cache_policy=NO_CACHE, persist_result=False)
def fetch_windows_task(run_id: str, jobs: list[FetchJob]) -> list[WindowResult | FailedWindow]:
    runtime = _runtime(run_id)
    fetch = partial(
        fetch_window,
        runtime.client,
        runtime.store,
        run_id=run_id,
        quarantine=runtime.quarantine,
        refetch_attempts=runtime.refetch_attempts,
    )
    return fetch_batch(fetch, jobs, should_stop=runtime.stopping.is_set)


@task(name="load", cache_policy=NO_CACHE, persist_result=False)
def load_task(warehouse: Warehouse, discovery: Discovery, results: list[WindowResult], extra_files: list[str]) -> int:
    datapoint_files = sorted({path for result in results if not result.job.product for path in result.files} | set(extra_files))
    bucket_files = sorted({path for result in results if result.job.product for path in result.files})
    warehouse.replace_virtual_assets(list(discovery.virtual_assets))
    warehouse.replace_entity_members(list(discovery.members))
    rows = warehouse.load_datapoints([Path(path) for path in datapoint_files])
    rows += warehouse.load_revenue_buckets([Path(path) for path in bucket_files])
    get_run_logger().info("Loaded %s rows from %s Parquet files", f"{rows:,}", f"{len(datapoint_files) + len(bucket_files):,}")
    return rows


@task(name="model-and-check", cache_policy=NO_CACHE, persist_result=False)
def model_and_check_task(
    warehouse: Warehouse, check_days: tuple[date, date], skip: bool = False, chunk_rows: int = CHECK_CHUNK_ROWS
) -> dict:
    if skip:
        # The models read the whole warehouse, so a long backfill can defer them to one
        # 'terralayr-etl check' at the end instead of paying for them on every run.
        get_run_logger().info("Skipped the SQL models and checks; run 'terralayr-etl check' to build and run them")
        return {"total": 0, "passed": 0, "failed": 0, "by_check": {}, "failing_rows": [], "skipped": True}
    # The checks compare only the run's days, so their cost follows the run, not the warehouse.
    built = run_models(warehouse.connection, check_days=check_days, chunk_rows=chunk_rows)
    summary = run_checks(warehouse.connection)
    get_run_logger().info(
        "Built %d models; checks: %s passed, %s failed", len(built), f"{summary.passed:,}", f"{summary.failed:,}"
    )
    return asdict(summary)


def fetch_threads(settings: Settings) -> int:
    """Return how many fetch batches run at once: one per request in flight
    (``api.max_concurrency``) and one per window that may wait for a CPU
    (``pipeline.windows_waiting_for_cpu``)."""
    return settings.api.max_concurrency + settings.pipeline.windows_waiting_for_cpu


def _fetch_all(
    run_id: str, jobs: list[FetchJob], windows_per_task: int, threads: int
) -> tuple[list[WindowResult], list[FailedWindow]]:
    """Fetch every window in per-entity batches, at most ``threads`` batches at a time.

    The flow submits the next batch when one ends, so the cap applies whatever thread pool runs
    the flow: ``run_nightly`` sizes its own, but a deployment that starts the flow from its
    entrypoint gets Prefect's default pool. Unless PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS
    sets a limit, that pool has none and would start every batch at once, each holding its
    responses while it waits for a CPU.

    Progress is logged about every tenth of the windows. Results come back sorted by window,
    not by completion time.
    """
    log = get_run_logger()
    waiting = deque(plan_batches(jobs, windows_per_task))
    running: list[Any] = []
    progress = _Progress(len(jobs), log)
    try:
        while waiting or running:
            while waiting and len(running) < threads:
                # quote: Prefect would walk every job of the batch, twice per task run, looking
                # for futures to wait for and upstream task runs to link. The jobs are new
                # objects, so the walk finds neither.
                running.append(fetch_windows_task.submit(run_id, quote(waiting.popleft())))
            finished = next(as_completed(running))
            running.remove(finished)
            progress.add(finished.result())
    except BaseException:
        # Batches not yet submitted never start. Running batches stop after their current
        # window, before the client closes, so that their requests do not fail (after Ctrl+C,
        # for example).
        waiting.clear()
        _runtime(run_id).stopping.set()
        unfinished = []
        for future in running:
            wrapped = getattr(future, "wrapped_future", None)
            if wrapped is not None and not wrapped.cancel():
                unfinished.append(wrapped)
        wait(unfinished, timeout=STOP_WAIT_SECONDS)
        raise
    return progress.by_window()


class _Progress:
    """The outcomes of the fetch task runs so far, logged about every tenth of the windows."""

    def __init__(self, window_count: int, log: Any):
        self.results: list[WindowResult] = []
        self.failures: list[FailedWindow] = []
        self._window_count = window_count
        self._step = max(1, window_count // 10)
        self._done = 0
        self._log = log

    def add(self, outcomes: list[WindowResult | FailedWindow]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, FailedWindow):
                self.failures.append(outcome)
            else:
                self.results.append(outcome)
            self._done += 1
            if self._done % self._step == 0 or self._done == self._window_count:
                self._log.info(
                    "Fetched %s of %s windows (%s failed)",
                    f"{self._done:,}", f"{self._window_count:,}", f"{len(self.failures):,}",
                )  # fmt: skip

    def by_window(self) -> tuple[list[WindowResult], list[FailedWindow]]:
        """Return the results and the failures, each sorted by window."""
        self.results.sort(key=lambda result: _job_order(result.job))
        self.failures.sort(key=lambda failure: _job_order(failure.job))
        return self.results, self.failures


def _job_order(job: FetchJob) -> tuple:
    return job.entity_type, job.entity_id, job.product or "", job.resolution, job.window_start


def _quarantine_failures(quarantine: Quarantine, failures: list[FailedWindow]) -> None:
    for failure in failures:
        quarantine.add(
            f"{failure.job.slug()}-failed",
            f"{failure.error_type}: {failure.error}",
            request={"path": None, "params": None},
            window=failure.job.as_dict(),
        )


def _check_markdown(summary: dict, failures: list[FailedWindow], quarantine_dir: str | None) -> str:
    lines = ["| check | passed | failed |", "|---|---|---|"]
    for name, counts in sorted(summary["by_check"].items()):
        lines.append(f"| {name} | {counts.get('pass', 0)} | {counts.get('fail', 0)} |")
    if failures:
        lines += ["", f"{len(failures)} windows were not loaded; details in `{quarantine_dir}`:", ""]
        lines += [f"- {failure.job.describe()}: {failure.error_type}" for failure in failures[:50]]
    return "\n".join(lines)


def _plan(run_id: str, settings: Settings, warehouse: Warehouse, span: RunSpan, resolutions: list[str]) -> tuple[Discovery, list[FetchJob]]:
    discovery = discover_task(run_id, quote(settings), span.first_day, span.end_day)
    starts = None
    if span.incremental:
        starts = plan_starts(discovery, resolutions, warehouse.watermarks(resolutions), settings)
    jobs = plan_jobs(discovery, settings, resolutions, span.first_day, span.end_day, starts)
    return discovery, jobs


@flow(name="nightly", persist_result=False, validate_parameters=False)
def nightly(
    start: str | None = None,
    end: str | None = None,
    resolutions: list[str] | None = None,
    data_dir: str | None = None,
    skip_checks: bool = False,
) -> dict:
    """Fetch ``[start, end)`` (local days), load it into DuckDB, build the SQL models and run the checks.

    ``skip_checks`` leaves the models and checks out, for backfills that run them once at the end.

    Without ``start`` each entity and resolution starts at its own watermark's local day minus
    ``pipeline.lookback_days``, or at ``pipeline.history_start`` without a watermark. Without
    ``end`` the run stops before today. Credentials are read from the environment inside the
    run and are never flow parameters.
    """
    try:
        # Prefect's SIGTERM handler is in place now, and DuckDB can swallow what it raises.
        with noting_sigterm():
            return _nightly(start, end, resolutions, data_dir, skip_checks)
    except BaseException as exc:
        # Prefect (3.9) logs the traceback of an error that leaves the flow function.
        mark_logged_by_flow(exc)
        raise


def mark_logged_by_flow(exc: BaseException) -> None:
    """Mark ``exc`` as raised by the flow function, whose failure Prefect logs with the traceback."""
    try:
        setattr(exc, _LOGGED_BY_FLOW, True)
    except (AttributeError, TypeError):
        # An exception whose __setattr__ rejects new attributes, such as a frozen dataclass.
        # The CLI prints its traceback too, so it may appear twice.
        pass


def logged_by_flow(exc: BaseException) -> bool:
    """Return True when ``exc`` left the ``nightly`` flow function, so its traceback is in the run's log."""
    return bool(getattr(exc, _LOGGED_BY_FLOW, False))


_LOGGED_BY_FLOW = "_terralayr_logged_by_flow"


def _signal_behind(exc: BaseException) -> BaseException | None:
    """Return the KeyboardInterrupt of Ctrl+C, or Prefect's TerminationSignal after SIGTERM,
    that ``exc`` came from or is, or None."""
    return next((error for error in error_chain(exc) if isinstance(error, (KeyboardInterrupt, ExternalSignal))), None)


def _error_text(exc: BaseException, stop: BaseException | None) -> str:
    """Describe the error that ended a run for its row in the runs table, a signal first."""
    errors = [exc] if stop is None or stop is exc else [stop, exc]
    return "; then ".join(": ".join(filter(None, [type(error).__name__, one_line(error)])) for error in errors)


def _nightly(
    start: str | None, end: str | None, resolutions: list[str] | None, data_dir: str | None, skip_checks: bool
) -> dict:
    settings = load_settings()
    credentials = load_credentials()
    resolutions = check_resolutions(resolutions or settings.pipeline.resolutions, settings)
    span = resolve_span(start, end, settings)
    data_path = Path(data_dir or settings.pipeline.data_dir)
    run_id = str(uuid.uuid4())
    log = get_run_logger()

    store = ParquetStore(data_path)
    store.clean_temp_files()
    quarantine = Quarantine(data_path, run_id)
    warehouse_path = data_path / "warehouse.duckdb"
    with (
        Warehouse(warehouse_path, rows_per_batch=settings.pipeline.load_batch_rows) as warehouse,
        ApiClient(settings, credentials) as client,
    ):
        killed = warehouse.mark_unfinished_runs("killed")
        if killed:
            log.warning("Marked %d runs left as running by a stopped process as killed: %s", len(killed), ", ".join(killed))
        parameters = {
            "start": span.first_day.isoformat() if not span.incremental else None,
            "end": span.end_day.isoformat(),
            "incremental": span.incremental,
            "resolutions": resolutions,
            # Warehouse rows do not store their request path. It is this template with the
            # row's entity_id filled in, and the Parquet files keep it per row.
            "datapoint_paths": {entity_type: settings.api.paths.datapoints(entity_type) for entity_type in ENTITY_TYPES},
        }
        warehouse.start_run(run_id, __version__, parameters)
        jobs: list[FetchJob] = []
        with _RUNTIMES_LOCK:
            _RUNTIMES[run_id] = _Runtime(client, store, quarantine, settings.pipeline.refetch_attempts)
        try:
            log.info(
                "Run %s: local days %s to %s (end exclusive, %s), resolutions %s",
                run_id, span.first_day, span.end_day, "incremental" if span.incremental else "fixed start", resolutions,
            )
            discovery, jobs = _plan(run_id, settings, warehouse, span, resolutions)
            log.info("Planned %s request windows for %s entities", f"{len(jobs):,}", f"{len(discovery.entities):,}")
            # One background thread fsyncs and renames the files, so the fetch threads go on
            # with their next window. The block ends once every file is in place.
            with store.background_commits():
                results, failures = _fetch_all(run_id, jobs, settings.pipeline.windows_per_task, fetch_threads(settings))
            boundary = resolve_outside_rows(results, store)
            store.sync_folders()
            # Not quoted: Prefect finds the discover and fetch task runs the load depends on
            # by walking these, and its UI shows that lineage.
            rows = load_task(warehouse, discovery, results, boundary.files)
            failed_series = sorted({failure.job.series_key() for failure in failures})
            warehouse.update_watermarks(resolutions, exclude=failed_series)
            checks = model_and_check_task(
                warehouse, (_first_day(jobs, span), span.end_day), skip_checks, settings.pipeline.check_chunk_rows
            )
        except BaseException as exc:
            # Prefect can fail with an error of its own while it handles Ctrl+C or SIGTERM (for
            # example, "Task run is not set" when the signal arrives as a task run starts), and
            # the caller then gets the signal's exception.
            stop = _signal_behind(exc)
            try:
                warehouse.finish_run(
                    run_id, status="failed", windows=len(jobs), requests=client.stats.requests,
                    retries=client.stats.retries, rows=warehouse.committed_rows, check_summary={},
                    report={"error": _error_text(exc, stop)},
                )  # fmt: skip
                recorded = f"is marked failed in the runs table of {warehouse.path}"
            except Exception as record_error:
                # A DuckDB error can leave the connection unusable. The run's error is the one to
                # raise, and the next run marks this run's row killed.
                log.error("Could not mark run %s failed in %s: %s", run_id, warehouse.path, one_line(record_error))
                recorded = f"could not be marked failed in {warehouse.path} ({one_line(record_error)}); the next run marks it killed"
            # The CLI's closing line names the run from this note.
            for error in {id(error): error for error in (exc, stop) if error is not None}.values():
                error.add_note(f"{RUN_NOTE_PREFIX}{run_id} {recorded}")
            raise
        finally:
            with _RUNTIMES_LOCK:
                _RUNTIMES.pop(run_id, None)

        _quarantine_failures(quarantine, failures)
        report = build_report(results, failures, discovery, boundary, client.stats, quarantine)
        log_report(report, failures, log)
        if failures or discovery.rejected:
            status = "failed"
        else:
            status = "success" if checks["failed"] == 0 else "checks_failed"
        failed_windows = [failure.as_dict() for failure in failures]
        warehouse.finish_run(
            run_id,
            status=status,
            windows=len(jobs),
            requests=client.stats.requests,
            retries=client.stats.retries,
            rows=rows,
            check_summary={
                "passed": checks["passed"],
                "failed": checks["failed"],
                "by_check": checks["by_check"],
                "skipped": checks.get("skipped", False),
            },
            failed_windows=failed_windows,
            report=report,
        )
        create_markdown_artifact(
            key="cross-check-summary",
            markdown=f"# Cross-check summary\n\nRun `{run_id}` ({status}): {checks['passed']} passed, "
            f"{checks['failed']} failed.\n\n" + _check_markdown(checks, failures, report["quarantine_dir"]),
            description="SQL checks of the API data against recomputed values",
        )
        return {
            "run_id": run_id,
            "status": status,
            "start": _first_day(jobs, span).isoformat(),
            "end": span.end_day.isoformat(),
            "incremental": span.incremental,
            "windows": len(jobs),
            "requests": client.stats.requests,
            "retries": client.stats.retries,
            "rows_loaded": rows,
            "failed_windows": failed_windows,
            "unknown_categories": report["unknown_categories"],
            "missing_categories": report["missing_categories"],
            "quarantine_dir": report["quarantine_dir"],
            "report": report,
            "checks": checks,
            "finished_at": datetime.now(UTC).isoformat(),
        }


def _first_day(jobs: list[FetchJob], span: RunSpan) -> date:
    """Return the run's first local day. For an incremental run that is the earliest day it
    fetched, or its end day when every series was up to date."""
    if not span.incremental:
        return span.first_day
    first_instant = min((job.window_start for job in jobs), default=None)
    return local_day_of(first_instant) if first_instant else span.end_day


def start_temporary_server_outside_ctrl_c() -> None:
    """Start Prefect's temporary server now, with SIGINT blocked, when no PREFECT_API_URL is set.

    Without PREFECT_API_URL, Prefect starts a temporary server as a child process. Ctrl+C in a
    terminal sends SIGINT to the whole process group, so it stopped that server too, and the
    interrupted run then spent about 160 s on Prefect's retries. A child inherits its parent's
    blocked signals, so a server started while SIGINT is blocked stays up for the run to
    record its end. Prefect still stops it with SIGTERM when the process exits.
    """
    from prefect.settings import get_current_settings

    if get_current_settings().api.url or not hasattr(signal, "pthread_sigmask"):
        return
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:  # another Prefect version: its own start, which Ctrl+C stops
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        SubprocessASGIServer().start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_nightly(
    *,
    start: date | None = None,
    end: date | None = None,
    resolutions: list[str] | None = None,
    data_dir: Path | None = None,
    settings: Settings | None = None,
    skip_checks: bool = False,
) -> dict:
    """Run the ``nightly`` flow with a thread per request in flight (``api.max_concurrency``)
    and per window that may wait for a CPU (``pipeline.windows_waiting_for_cpu``).

    The client still sends at most ``api.max_concurrency`` requests at once. The extra threads
    keep that many in flight while fetched windows wait for one of the CPU slots.
    """
    settings = settings or load_settings()
    start_temporary_server_outside_ctrl_c()
    configured = nightly.with_options(task_runner=ThreadPoolTaskRunner(max_workers=fetch_threads(settings)))
    return configured(
        start=start.isoformat() if start else None,
        end=end.isoformat() if end else None,
        resolutions=resolutions,
        data_dir=str(data_dir) if data_dir else None,
        skip_checks=skip_checks,
    )
