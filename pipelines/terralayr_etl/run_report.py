"""The report of one run: failed windows, rejected entities and category problems, logged once.

Problems are counted per run instead of per window, so a category that is absent from a
thousand windows yields one warning that names it, not a thousand.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from terralayr_etl.boundaries import BoundaryReport
from terralayr_etl.fetch_stats import FetchStats
from terralayr_etl.pipeline import Discovery, FetchJob, WindowResult
from terralayr_etl.quarantine import Quarantine

_MAX_LISTED_WINDOWS = 100
"""Windows listed by name per problem in the report; the counts cover all of them."""


@dataclass(frozen=True)
class FailedWindow:
    """A window that was not loaded, with the error that stopped it."""

    job: FetchJob
    error_type: str
    error: str

    def as_dict(self) -> dict[str, Any]:
        return {**self.job.as_dict(), "window": self.job.describe(), "error_type": self.error_type, "error": self.error}


def build_report(
    results: Sequence[WindowResult],
    failures: Sequence[FailedWindow],
    discovery: Discovery,
    boundary: BoundaryReport,
    stats: FetchStats,
    quarantine: Quarantine,
) -> dict[str, Any]:
    """Collect what a run must report beyond its row counts, as JSON-ready values."""
    missing_windows = [result for result in results if result.missing_categories]
    missing_counts = Counter(name for result in missing_windows for name in result.missing_categories)
    return {
        "failed_windows": len(failures),
        "rejected_virtual_assets": list(discovery.rejected),
        "unknown_categories": sorted({name for result in results for name in result.unknown_categories}),
        "missing_categories": dict(sorted(missing_counts.items())),
        "windows_missing_categories": [
            f"{result.job.describe()}: {', '.join(result.missing_categories)}"
            for result in missing_windows[:_MAX_LISTED_WINDOWS]
        ],
        "refetches": sum(result.fetches - 1 for result in results),
        "duplicate_instants": sum(result.duplicate_instants for result in results),
        "boundary_conflicts": boundary.conflicts,
        "outside_rows_written": boundary.written_rows,
        "outside_rows_dropped": boundary.dropped_rows,
        "quarantined_payloads": quarantine.count,
        "quarantine_dir": str(quarantine.folder) if quarantine.folder.exists() else None,
        "fetch_stats": stats.snapshot(),
    }


def log_report(report: dict[str, Any], failures: Sequence[FailedWindow], log: logging.Logger | logging.LoggerAdapter) -> None:
    """Log each kind of problem in the report once."""
    if report["unknown_categories"]:
        log.warning(
            "The API sent categories this version does not know; they were kept: %s",
            ", ".join(report["unknown_categories"]),
        )
    if report["missing_categories"]:
        counts = ", ".join(f"{name} ({count} windows)" for name, count in report["missing_categories"].items())
        log.warning("Windows were loaded without these requested categories, absent in every fetch: %s", counts)
    if report["rejected_virtual_assets"]:
        log.error(
            "Left out %d virtual assets the API listed with an invalid id or lifetime: %s",
            len(report["rejected_virtual_assets"]),
            "; ".join(report["rejected_virtual_assets"]),
        )
    if report["fetch_stats"].get("retry_after_capped"):
        log.warning(
            "%d Retry-After waits were longer than retry.max_retry_after_seconds and were cut to it",
            report["fetch_stats"]["retry_after_capped"],
        )
    for failure in failures[:_MAX_LISTED_WINDOWS]:
        log.error("Window not loaded: %s: %s", failure.job.describe(), failure.error)
    if failures:
        log.error(
            "%d windows were not loaded; requests, errors and payloads are in %s", len(failures), report["quarantine_dir"]
        )


def exit_status(summary: dict[str, Any]) -> int:
    """Return the CLI exit status of a finished run: 3 when it left data out, 1 when a check
    failed, 4 when every window loaded but some payloads could not be parsed at first and were
    quarantined, else 0."""
    if summary["status"] == "failed":
        return 3
    if summary["checks"]["failed"]:
        return 1
    if (summary.get("report") or {}).get("quarantined_payloads"):
        return 4
    return 0


def failure_line(summary: dict[str, Any]) -> str:
    """Describe in one line what a failed run left out and where the details are."""
    failed = summary["failed_windows"]
    rejected = summary["report"]["rejected_virtual_assets"]
    parts = []
    if failed:
        first = failed[0]
        parts.append(f"{len(failed)} windows were not loaded (first: {first['window']}: {first['error_type']})")
    if rejected:
        parts.append(f"{len(rejected)} virtual assets were left out ({rejected[0]})")
    where = summary["quarantine_dir"] or "the runs table of the warehouse"
    return (
        f"run {summary['run_id']} finished incomplete: {'; '.join(parts)}; the requests, errors and payloads "
        f"are in {where}; rerun the same command to fetch the missing data again"
    )


def describe_recovered_problems(report: dict[str, Any]) -> list[str]:
    """Return one summary line per problem the run recovered from, for the CLI and the demo."""
    lines = []
    if report.get("quarantined_payloads"):
        lines.append(
            f"{report['quarantined_payloads']} unparseable payloads were kept in {report['quarantine_dir']} "
            "and their windows fetched again"
        )
    if report.get("unknown_categories"):
        lines.append(f"Unknown categories kept: {', '.join(report['unknown_categories'])}")
    if report.get("missing_categories"):
        lines.append(f"Categories absent after re-fetching: {', '.join(report['missing_categories'])}")
    return lines
