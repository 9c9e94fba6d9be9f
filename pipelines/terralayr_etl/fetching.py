"""Fetch one request window: data points or revenue buckets, normalised and written to Parquet.

A window's pages are normalised in full before anything is written, so a page that cannot be
parsed leaves no partial window behind. Such a payload is quarantined with its request and the
window is fetched again, as is a window whose response lacks a requested category, up to
``pipeline.refetch_attempts`` times. A window that still cannot be parsed raises
MalformedResponseError and is not written. One that still lacks a category is written without
it and reports the category, because an absent category is not a value of 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc

from terralayr_etl.categories import CATEGORY_NAMES
from terralayr_etl.client import ApiClient, RawResponse
from terralayr_etl.errors import MalformedResponseError
from terralayr_etl.normalise import UTC_TIMESTAMP, decode_labels, normalise_datapoints, normalise_revenue_buckets
from terralayr_etl.pipeline import FetchJob, WindowResult
from terralayr_etl.quarantine import Quarantine
from terralayr_etl.resources import CPU_SLOTS
from terralayr_etl.storage import ParquetStore
from terralayr_etl.timeutil import isoformat_z

logger = logging.getLogger("terralayr_etl.fetching")

T = TypeVar("T")


@dataclass(frozen=True)
class _Fetched:
    """One complete, parsed fetch of a window."""

    table: pa.Table
    pages: int
    unknown_categories: tuple[str, ...] = ()
    missing_categories: tuple[str, ...] = ()
    duplicate_instants: int = 0


def fetch_window(
    client: ApiClient,
    store: ParquetStore,
    job: FetchJob,
    run_id: str,
    *,
    quarantine: Quarantine | None = None,
    refetch_attempts: int = 0,
) -> WindowResult:
    """Fetch one window, normalise every page and write the rows inside the window to Parquet.

    Rows the API sent outside ``[window_start, window_end)`` are not written here. They travel
    in ``WindowResult.outside_rows`` to ``boundaries.resolve_outside_rows``, which settles them
    in a fixed order once every window of the run is in.

    Raises MalformedResponseError when every fetch was malformed, and ApiError when the client
    gave up on a request.
    """
    slot = _CpuSlot()
    try:
        return _fetch_and_write(client, store, job, run_id, slot, quarantine, refetch_attempts)
    finally:
        slot.release()


class _CpuSlot:
    """One of ``CPU_SLOTS``, taken once a window's responses are in and kept until its rows
    are written. It is given back before the next download of a re-fetch."""

    def __init__(self) -> None:
        self._acquired = False

    def take(self) -> None:
        if not self._acquired:
            CPU_SLOTS.acquire()
            self._acquired = True

    def release(self) -> None:
        if self._acquired:
            self._acquired = False
            CPU_SLOTS.release()

    def outside(self, download: Callable[[], T]) -> T:
        """Run ``download`` without the slot, so that network waits leave it to other windows."""
        self.release()
        result = download()
        self.take()
        return result


def _fetch_and_write(
    client: ApiClient,
    store: ParquetStore,
    job: FetchJob,
    run_id: str,
    slot: _CpuSlot,
    quarantine: Quarantine | None,
    refetch_attempts: int,
) -> WindowResult:
    fetch_once = partial(_fetch_buckets_once if job.product else _fetch_datapoints_once, client, job, run_id, slot)
    fetched, fetches = _fetch_with_refetches(fetch_once, job, quarantine, refetch_attempts)

    result = WindowResult(
        job,
        pages=fetched.pages,
        unknown_categories=fetched.unknown_categories,
        missing_categories=fetched.missing_categories,
        duplicate_instants=fetched.duplicate_instants,
        fetches=fetches,
    )
    if job.product:
        result.rows = fetched.table.num_rows
        result.files = [str(path) for path in store.write_revenue_buckets(fetched.table)]
        return result

    inside, outside = _split_at_window(fetched.table, job)
    # Rows outside the window are rare, and boundaries.py joins them in polars on plain strings.
    result.outside_rows = decode_labels(outside) if outside.num_rows else None
    if inside.num_rows:
        result.rows = inside.num_rows
        result.files = [str(path) for path in store.write_datapoints(inside)]
    if logger.isEnabledFor(logging.INFO):
        # describe() formats two instants, so skip it when the line is not logged.
        logger.info("Fetched %s: %d page(s), %s rows", job.describe(), result.pages, f"{result.rows:,}")
    return result


def _fetch_with_refetches(
    fetch_once: Callable[[], _Fetched], job: FetchJob, quarantine: Quarantine | None, refetch_attempts: int
) -> tuple[_Fetched, int]:
    """Fetch until a response parses and has every requested category, or the attempts run out.

    Returns the fetch to load and the number of fetches made. Of incomplete fetches, the one
    lacking the fewest categories is loaded, the later one on a tie.
    """
    fetches = refetch_attempts + 1
    best: _Fetched | None = None
    last_error: MalformedResponseError | None = None
    for attempt in range(1, fetches + 1):
        try:
            fetched = fetch_once()
        except MalformedResponseError as exc:
            last_error = exc
            _quarantine_payload(quarantine, job, exc, attempt)
            if attempt < fetches:
                logger.warning(
                    "Fetching %s again (%d of %d re-fetches) because its response could not be parsed: %s",
                    job.describe(), attempt, refetch_attempts, exc,
                )
            continue

        if not fetched.missing_categories:
            return fetched, attempt
        if best is None or len(fetched.missing_categories) <= len(best.missing_categories):
            best = fetched
        if attempt < fetches:
            logger.warning(
                "Fetching %s again (%d of %d re-fetches) because the response lacks the requested categories %s",
                job.describe(), attempt, refetch_attempts, ", ".join(fetched.missing_categories),
            )

    if best is not None:
        # INFO, because the run reports the missing categories once, as a warning.
        logger.info(
            "Loading %s without the categories %s, still absent after %d fetches",
            job.describe(), ", ".join(best.missing_categories), fetches,
        )
        return best, fetches
    assert last_error is not None
    where = f"; the payloads are in {quarantine.folder}" if quarantine is not None else ""
    raise MalformedResponseError(
        f"{job.describe()} could not be parsed in {fetches} fetches, so the window was not loaded{where}. "
        f"Last error: {last_error}"
    ) from None


def _fetch_datapoints_once(client: ApiClient, job: FetchJob, run_id: str, slot: _CpuSlot) -> _Fetched:
    responses = slot.outside(
        lambda: client.fetch_datapoints(job.entity_type, job.entity_id, job.resolution, job.window_start, job.window_end)
    )
    pages = []
    missing: set[str] = set()
    for response in responses:
        try:
            page = normalise_datapoints(
                response.body,
                entity_type=job.entity_type,
                entity_id=job.entity_id,
                resolution=job.resolution,
                run_id=run_id,
                fetched_at=response.fetched_at,
                endpoint=response.endpoint,
            )
        except MalformedResponseError as exc:
            raise _with_payload(exc, response) from None
        pages.append(page)
        # The request names no category, which requests all of them, so each page must carry
        # each. A page without one would load as a gap in that category.
        missing.update(name for name in CATEGORY_NAMES if name not in page.categories)

    table = pa.concat_tables([page.table for page in pages]) if pages else None
    if table is None:
        raise MalformedResponseError(f"{job.describe()}: the client returned no page for the window")
    return _Fetched(
        table=table,
        pages=len(pages),
        unknown_categories=tuple(sorted({name for page in pages for name in page.unknown_categories})),
        missing_categories=tuple(sorted(missing)),
        duplicate_instants=sum(page.duplicate_instants for page in pages),
    )


def _fetch_buckets_once(client: ApiClient, job: FetchJob, run_id: str, slot: _CpuSlot) -> _Fetched:
    assert job.product is not None
    product = job.product
    response = slot.outside(lambda: client.fetch_revenue_buckets(job.entity_id, product, job.window_start, job.window_end))
    try:
        table = normalise_revenue_buckets(
            response.body,
            virtual_asset_id=job.entity_id,
            product=job.product,
            run_id=run_id,
            fetched_at=response.fetched_at,
            endpoint=response.endpoint,
        )
    except MalformedResponseError as exc:
        raise _with_payload(exc, response) from None
    return _Fetched(table=table, pages=1)


def _with_payload(exc: MalformedResponseError, response: RawResponse) -> MalformedResponseError:
    """Return ``exc`` again with the response's body, endpoint and parameters, for the quarantine."""
    return MalformedResponseError(str(exc), body=response.body, endpoint=response.endpoint, params=response.params)


def _split_at_window(table: pa.Table, job: FetchJob) -> tuple[pa.Table, pa.Table]:
    """Split rows into those inside the half-open window and those the API sent outside it."""
    instants = table["period_start"]
    start = pa.scalar(job.window_start, UTC_TIMESTAMP)
    end = pa.scalar(job.window_end, UTC_TIMESTAMP)
    inside = pc.and_(pc.greater_equal(instants, start), pc.less(instants, end))
    if pc.all(inside).as_py() is not False:
        return table, table.slice(0, 0)
    return table.filter(inside), table.filter(pc.invert(inside))


def _quarantine_payload(quarantine: Quarantine | None, job: FetchJob, exc: MalformedResponseError, attempt: int) -> None:
    if quarantine is None:
        return
    request = {"path": exc.endpoint, "params": exc.params}
    window = {"start": isoformat_z(job.window_start), "end": isoformat_z(job.window_end), "job": job.describe()}
    quarantine.add(job.slug(), exc, request=request, body=exc.body, attempt=attempt, window=window)
