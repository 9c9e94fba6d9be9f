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
from terralayr_etl.timeutil import QUARTER_HOUR, local_midnight

REVENUE_RANGE_KEY = "revenue"
"""Key of ``api.max_range_days`` that limits revenue-bucket requests."""

Window = tuple[datetime, datetime]


def plan_windows(resolution: str, start: date, end: date, settings: Settings) -> list[Window]:
    """Split the local delivery days ``[start, end)`` into data-point windows.

    Each window covers whole local days (in ``pipeline.local_timezone``) and lasts at most
    ``api.max_range_days[resolution]`` days of elapsed time. A day longer than the limit (any
    day under a limit below one day, the 25-hour DST day under a one-day limit) is cut further
    into windows of whole quarter-hours.

    Example::

        plan_windows("15min", date(2024, 10, 1), date(2024, 10, 21), settings)
        # three windows of 7, 7 and 6 days, the first from 2024-09-30T22:00Z
    """
    return _plan(_max_range_days(settings, resolution), start, end, settings)


def plan_bucket_windows(start: date, end: date, settings: Settings) -> list[Window]:
    """Split the local delivery days ``[start, end)`` into revenue-bucket windows.

    The limit is ``api.max_range_days["revenue"]``.
    """
    return _plan(_max_range_days(settings, REVENUE_RANGE_KEY), start, end, settings)


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


def _plan(max_days: float, start: date, end: date, settings: Settings) -> list[Window]:
    local_tz = ZoneInfo(settings.pipeline.local_timezone)
    limit = timedelta(days=max_days)
    windows = []
    for first, stop in _split_local_days(start, end, max_days, local_tz):
        window = (local_midnight(first, local_tz), local_midnight(stop, local_tz))
        # Only a single local day can still exceed the limit: any day under a limit below
        # one day, or the 25-hour autumn DST day under a limit below 25 hours.
        if window[1] - window[0] > limit:
            windows.extend(_split_fixed(window, limit))
        else:
            windows.append(window)
    return windows


def _split_local_days(start: date, end: date, max_days: float, local_tz: ZoneInfo) -> list[tuple[date, date]]:
    """Split ``[start, end)`` into runs of whole local days no longer than ``max_days`` elapsed.

    A run of ``int(max_days)`` local days that contains the autumn DST change lasts one hour
    more than that many days. The limit is read as elapsed time, as the sandbox checks it, so
    such a run is shortened by one day. A run always keeps at least one day.
    """
    step_days = max(1, int(max_days))
    limit = timedelta(days=max(1.0, max_days))
    runs = []
    first = start
    while first < end:
        stop = min(first + timedelta(days=step_days), end)
        while stop - first > timedelta(days=1) and _elapsed(first, stop, local_tz) > limit:
            stop -= timedelta(days=1)
        runs.append((first, stop))
        first = stop
    return runs


def _elapsed(first: date, stop: date, local_tz: ZoneInfo) -> timedelta:
    return local_midnight(stop, local_tz) - local_midnight(first, local_tz)


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
