"""Rows a response carried outside its own window, settled between the windows of one run.

Adjacent windows share a boundary instant. When the API sends a point outside the window that
was requested (for example because it applied an inclusive end the client did not ask for),
two windows can deliver the same key with different values. The rule: the window that starts
later wins. It is applied here, after every window of the run is in, so the outcome does not
depend on which fetch thread finished first. A row outside every successful window of the run
is dropped, because loading it would add a lone period to a day the run did not fetch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from terralayr_etl.normalise import LONG_SCHEMA
from terralayr_etl.pipeline import WindowResult
from terralayr_etl.storage import ParquetStore

if TYPE_CHECKING:
    # Imported where used: a run whose windows send no rows outside themselves never needs
    # polars, which maps about 30 MB of library code.
    import polars as pl

logger = logging.getLogger("terralayr_etl.boundaries")

_SERIES = ["entity_type", "entity_id", "resolution"]
_KEY = [*_SERIES, "category", "period_start"]
_MAX_CONFLICT_WARNINGS = 20


@dataclass
class BoundaryReport:
    """Outcome of ``resolve_outside_rows``."""

    files: list[str] = field(default_factory=list)
    """Parquet files written with outside rows that won their key."""
    written_rows: int = 0
    conflicts: int = 0
    """Keys delivered by two windows with different values."""
    dropped_rows: int = 0
    """Outside rows that no successful window of the run covers."""


def resolve_outside_rows(results: Sequence[WindowResult], store: ParquetStore) -> BoundaryReport:
    """Settle the outside rows of the run's successful data-point windows and write the winners.

    For each key, the candidates are the outside rows and the row that the window covering the
    key's instant wrote, if any. The candidate from the window that starts latest is kept. A
    key whose candidates differ in value is logged with entity, category, instant and values.
    """
    report = BoundaryReport()
    outside = [result for result in results if result.outside_rows is not None and result.outside_rows.num_rows]
    if not outside:
        return report
    import polars as pl

    candidates = pl.concat(
        [_with_source(pl.from_arrow(result.outside_rows), result) for result in outside], how="vertical"
    )
    owned = _attach_owner(candidates, [result for result in results if not result.job.product])
    report.dropped_rows = candidates.height - owned.height
    if report.dropped_rows:
        logger.info(
            "Dropped %d rows that the API sent outside the requested windows and no window of this run covers",
            report.dropped_rows,
        )
    if owned.is_empty():
        return report

    stored = _stored_rows_of_owners(owned, results)
    every = pl.concat([owned.drop("owner_start"), stored], how="vertical_relaxed")
    report.conflicts = _log_conflicts(every)

    latest = pl.col("source_start") == pl.col("source_start").max().over(_KEY)
    winners = every.filter(latest).unique(subset=_KEY, keep="first")
    owner_starts = owned.select(*_KEY, "owner_start").unique(subset=_KEY)
    to_write = winners.join(owner_starts, on=_KEY).filter(pl.col("source_start") != pl.col("owner_start"))
    if not to_write.is_empty():
        table = to_write.select(LONG_SCHEMA.names).to_arrow().cast(LONG_SCHEMA)
        report.files = [str(path) for path in store.write_datapoints(table)]
        report.written_rows = to_write.height
    return report


def _with_source(frame: pl.DataFrame, result: WindowResult) -> pl.DataFrame:
    import polars as pl

    return frame.with_columns(pl.lit(result.job.window_start).cast(pl.Datetime("us", "UTC")).alias("source_start"))


def _attach_owner(candidates: pl.DataFrame, datapoint_results: Sequence[WindowResult]) -> pl.DataFrame:
    """Keep the candidates inside some window of the run, with that window's start as ``owner_start``."""
    import polars as pl

    windows = pl.DataFrame(
        {
            "entity_type": [result.job.entity_type for result in datapoint_results],
            "entity_id": [result.job.entity_id for result in datapoint_results],
            "resolution": [result.job.resolution for result in datapoint_results],
            "owner_start": [result.job.window_start for result in datapoint_results],
            "owner_end": [result.job.window_end for result in datapoint_results],
        },
        schema={
            "entity_type": pl.String,
            "entity_id": pl.String,
            "resolution": pl.String,
            "owner_start": pl.Datetime("us", "UTC"),
            "owner_end": pl.Datetime("us", "UTC"),
        },
    ).sort("owner_start")
    # Both sides are sorted on the join keys above; polars cannot verify that with `by` groups.
    joined = candidates.sort("period_start").join_asof(
        windows, left_on="period_start", right_on="owner_start", by=_SERIES, strategy="backward", check_sortedness=False
    )
    return joined.filter(pl.col("owner_end").is_not_null() & (pl.col("period_start") < pl.col("owner_end"))).drop(
        "owner_end"
    )


def _stored_rows_of_owners(owned: pl.DataFrame, results: Sequence[WindowResult]) -> pl.DataFrame:
    """Read the rows the owning windows wrote for the contested keys, tagged with their start."""
    import polars as pl

    owners = owned.select(*_SERIES, "owner_start").unique()
    files_by_owner = {
        (result.job.entity_type, result.job.entity_id, result.job.resolution, result.job.window_start): result.files
        for result in results
        if not result.job.product
    }
    frames = []
    for entity_type, entity_id, resolution, owner_start in owners.iter_rows():
        for path in files_by_owner.get((entity_type, entity_id, resolution, owner_start), []):
            frames.append(
                pl.read_parquet(path).with_columns(
                    pl.lit(entity_type).alias("entity_type"),
                    pl.lit(resolution).alias("resolution"),
                    pl.lit(owner_start).cast(pl.Datetime("us", "UTC")).alias("source_start"),
                )
            )
    columns = [*LONG_SCHEMA.names, "source_start"]
    if not frames:
        return owned.drop("owner_start").clear().select(columns)
    stored = pl.concat([frame.select(columns) for frame in frames], how="vertical_relaxed")
    contested = owned.select(*_KEY, "owner_start").rename({"owner_start": "source_start"})
    return stored.join(contested, on=[*_KEY, "source_start"], how="semi")


def _log_conflicts(every: pl.DataFrame) -> int:
    """Log keys whose candidates carry different values; return how many there are."""
    import polars as pl

    # A null and a number differ, and two nulls agree, so nulls are compared as text.
    as_text = pl.col("value").cast(pl.String).fill_null("null")
    conflicting = every.filter(as_text.n_unique().over(_KEY) > 1).sort([*_KEY, "source_start"])
    if conflicting.is_empty():
        return 0
    grouped = conflicting.group_by(_KEY, maintain_order=True).agg("source_start", "value")
    for row in grouped.head(_MAX_CONFLICT_WARNINGS).iter_rows(named=True):
        offers = ", ".join(
            f"{value} from the window starting {start.isoformat()}" for start, value in zip(row["source_start"], row["value"], strict=True)
        )
        logger.warning(
            "Two windows sent different values for %s %s %s %s at %s: %s; keeping the value of the later window",
            row["entity_type"],
            row["entity_id"],
            row["resolution"],
            row["category"],
            row["period_start"].isoformat(),
            offers,
        )
    if grouped.height > _MAX_CONFLICT_WARNINGS:
        logger.warning("%s keys in total had different values from two windows", f"{grouped.height:,}")
    return grouped.height
