"""Group request windows into per-entity batches and fetch a batch window by window.

A Prefect task run costs the Prefect client and server tens of milliseconds of CPU time, which
at one task run per window was the largest cost of a run after the pipeline's own work. So a
task run fetches a batch: up to ``pipeline.windows_per_task`` windows of one entity, one after
another, while other batches run in parallel, one per fetch thread (``api.max_concurrency``
plus ``pipeline.windows_waiting_for_cpu``). A slow window delays only the later windows of its
own entity's batch.

A window that fails with a TerralayrError does not fail its batch. It is retried after an API
failure that may pass, and otherwise comes back as a FailedWindow next to the other windows'
results. A full disk is the exception: it fails the batch, and so the run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import stamina

from terralayr_etl.errors import ApiError, DiskFullError, TerralayrError, one_line
from terralayr_etl.pipeline import FetchJob, WindowResult
from terralayr_etl.responses import RETRY_STATUS_CODES
from terralayr_etl.run_report import FailedWindow

logger = logging.getLogger("terralayr_etl.batches")

WINDOW_RETRIES = 2
"""Extra fetches of a window after the client gave up on a request that may succeed later."""
WINDOW_RETRY_DELAY_SECONDS = 2.0


def plan_batches(jobs: Sequence[FetchJob], windows_per_task: int) -> list[list[FetchJob]]:
    """Split ``jobs`` into batches of at most ``windows_per_task`` windows of one entity each.

    Jobs keep their order inside a batch; the jobs of one entity need not be adjacent.
    """
    if windows_per_task < 1:
        raise ValueError(f"windows_per_task is {windows_per_task}; use 1 or more")
    by_entity: dict[tuple[str, str], list[FetchJob]] = {}
    for job in jobs:
        by_entity.setdefault((job.entity_type, job.entity_id), []).append(job)
    return [chunk for entity_jobs in by_entity.values() for chunk in _chunks(entity_jobs, windows_per_task)]


def _chunks(jobs: list[FetchJob], size: int) -> Iterator[list[FetchJob]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def is_transient(error: Exception) -> bool:
    """Return True for an API failure that may pass: a network error or a retryable HTTP status."""
    return isinstance(error, ApiError) and (error.status_code is None or error.status_code in RETRY_STATUS_CODES)


def fetch_batch(
    fetch: Callable[[FetchJob], WindowResult],
    jobs: Sequence[FetchJob],
    *,
    retries: int = WINDOW_RETRIES,
    retry_delay_seconds: float = WINDOW_RETRY_DELAY_SECONDS,
    should_stop: Callable[[], bool] | None = None,
) -> list[WindowResult | FailedWindow]:
    """Fetch ``jobs`` one after another with ``fetch`` and return one outcome per job, in order.

    A transient API failure is retried up to ``retries`` times, ``retry_delay_seconds`` apart.
    Any other TerralayrError, or a transient one that outlasts the retries, becomes a
    FailedWindow. A DiskFullError propagates, and so do other exceptions, which are bugs.
    Once ``should_stop`` returns True (the run is ending), no further window starts, and the
    outcomes cover only the windows fetched so far.
    """
    outcomes: list[WindowResult | FailedWindow] = []
    for job in jobs:
        if should_stop is not None and should_stop():
            break
        outcomes.append(_fetch_one(fetch, job, retries, retry_delay_seconds))
    return outcomes


def _fetch_one(
    fetch: Callable[[FetchJob], WindowResult], job: FetchJob, retries: int, retry_delay_seconds: float
) -> WindowResult | FailedWindow:
    attempts = stamina.retry_context(
        on=is_transient,
        attempts=retries + 1,
        timeout=None,
        wait_initial=retry_delay_seconds,
        wait_max=retry_delay_seconds,
        wait_jitter=0.0,
        wait_exp_base=1,
    )
    try:
        for attempt in attempts:
            with attempt:
                if attempt.num > 1:
                    logger.warning("Fetching %s again (retry %d of %d)", job.describe(), attempt.num - 1, retries)
                return fetch(job)
    except DiskFullError:
        # Every later window would fail the same way, so the run stops here.
        raise
    except TerralayrError as exc:
        logger.warning("%s failed; the run goes on without it: %s", job.describe(), one_line(exc))
        return FailedWindow(job, type(exc).__name__, str(exc))
    raise AssertionError("stamina.retry_context ended without an attempt")

