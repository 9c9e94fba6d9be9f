"""Request windows: local delivery days cut into UTC ranges that the API accepts.

A window is a half-open UTC range ``[start, end)``. Adjacent windows share a boundary instant,
so the data-point request for a window sends an inclusive end one quarter-hour before the
window's end (``api.end_inclusive``) and no boundary point is fetched twice.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from terralayr_etl.config import Settings
from terralayr_etl.errors import ConfigError
from terralayr_etl.timeutil import QUARTER_HOUR, block_boundaries, local_midnight

REVENUE_RANGE_KEY = "revenue"
"""Key of ``api.max_range_days`` that limits revenue-bucket requests."""

Window = tuple[datetime, datetime]


def plan_windows(resolution: str, start: date, end: date, settings: Settings) -> list[Window]:
    """Split the local delivery days ``[start, end)`` into data-point windows.

    Each window covers whole local days (in ``pipeline.local_timezone``), at most
    ``api.max_range_days[resolution]`` of them, and whole storage blocks
    (``timeutil.file_block_start``) where the limit allows, so each Parquet file is written by
    one window. A limit below one day cuts days into windows of whole quarter-hours.

    Example::

        plan_windows("15min", date(2024, 10, 20), date(2024, 11, 3), settings)
        # [Oct 20], [Oct 21 .. Oct 27], [Oct 28 .. Nov 2]: blocks are weeks cut at month ends
    """
    return _plan(_max_range_days(settings, resolution), start, end, settings, resolution)


def plan_bucket_windows(start: date, end: date, settings: Settings) -> list[Window]:
    """Split the local delivery days ``[start, end)`` into revenue-bucket windows.

    The limit is ``api.max_range_days["revenue"]``.
    """
    return _plan(_max_range_days(settings, REVENUE_RANGE_KEY), start, end, settings, "daily")


def datapoint_request_range(start: datetime, end: datetime, settings: Settings) -> Window:
    """Return the ``start`` and ``end`` to send for the data-point window ``[start, end)``.

    The API includes the point at ``end``, so with ``api.end_inclusive`` the request stops one
    quarter-hour before the window's end, at the start of the window's last 15-minute period.
    """
    if settings.api.end_inclusive:
        return start, end - QUARTER_HOUR
    return start, end


def _max_range_days(settings: Settings, key: str) -> float:
    try:
        return settings.api.max_range_days[key]
    except KeyError:
        raise ConfigError(
            f"api.max_range_days has no entry {key!r}; add it to config/terralayr.toml "
            f"(configured: {sorted(settings.api.max_range_days)})"
        ) from None


def _plan(max_days: float, start: date, end: date, settings: Settings, resolution: str) -> list[Window]:
    local_tz = ZoneInfo(settings.pipeline.local_timezone)
    windows = []
    for first, stop in _pack_blocks(start, end, max_days, resolution):
        window = (local_midnight(first, local_tz), local_midnight(stop, local_tz))
        if max_days < 1:
            windows.extend(_split_fixed(window, timedelta(days=max_days)))
        else:
            windows.append(window)
    return windows


def _pack_blocks(start: date, end: date, max_days: float, resolution: str) -> list[tuple[date, date]]:
    """Split ``[start, end)`` into runs of whole storage blocks of at most ``max_days`` local days.

    The limit counts local delivery days, as the sandbox does, so a week holding the 25-hour
    DST day is still 7 days. A block longer than the limit is cut into runs of the limit.
    """
    step_days = max(1, int(max_days))
    edges = [start, *block_boundaries(start, end, resolution), end] if end > start else []
    blocks = list(zip(edges, edges[1:]))
    runs: list[tuple[date, date]] = []
    for block_first, block_stop in blocks:
        if runs and (block_stop - runs[-1][0]).days <= step_days and runs[-1][1] == block_first:
            runs[-1] = (runs[-1][0], block_stop)
            continue
        first = block_first
        while first < block_stop:
            stop = min(first + timedelta(days=step_days), block_stop)
            runs.append((first, stop))
            first = stop
    return runs


def _split_fixed(window: Window, max_length: timedelta) -> list[Window]:
    """Cut a window into parts of at most ``max_length``, rounded down to whole quarter-hours."""
    step = QUARTER_HOUR * max(1, int(max_length / QUARTER_HOUR))
    start, end = window
    parts = []
    while start < end:
        stop = min(start + step, end)
        parts.append((start, stop))
        start = stop
    return parts
