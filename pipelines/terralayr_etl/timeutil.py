"""Time windows and Europe/Berlin delivery days.

Inside the pipeline every instant is a timezone-aware UTC datetime. The local zone appears
only where a delivery day is derived, and the functions here are those places.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

QUARTER_HOUR = timedelta(minutes=15)
LOCAL_TZ = ZoneInfo("Europe/Berlin")

RESOLUTION_STEP = {"raw": QUARTER_HOUR, "15min": QUARTER_HOUR, "hourly": timedelta(hours=1)}
"""Fixed period length per resolution; daily periods are local days and vary (23 to 25 h)."""


def local_midnight(day: date, tz: ZoneInfo = LOCAL_TZ) -> datetime:
    """Return the UTC instant of local midnight at the start of ``day``."""
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


def local_day_of(instant: datetime, tz: ZoneInfo = LOCAL_TZ) -> date:
    """Return the local delivery day that contains a UTC instant."""
    return instant.astimezone(tz).date()


def day_range(start: date, end: date) -> list[date]:
    """Return the days in ``[start, end)``."""
    return [start + timedelta(days=offset) for offset in range((end - start).days)]


def quarter_hours_in_day(day: date, tz: ZoneInfo = LOCAL_TZ) -> int:
    """Return 92, 96 or 100: the quarter-hours of a local day, DST changes included."""
    length = local_midnight(day + timedelta(days=1), tz) - local_midnight(day, tz)
    return int(length / QUARTER_HOUR)


def split_days(start: date, end: date, max_days: float) -> list[tuple[date, date]]:
    """Split the local days ``[start, end)`` into half-open runs of at most ``max_days`` days.

    Windows follow calendar days, never ``start + 24 h``, so a DST day stays one window day.
    A ``max_days`` below 1 still yields one-day runs; ``split_window`` handles shorter limits.
    """
    if end <= start:
        return []
    step = max(1, int(max_days))
    runs = []
    cursor = start
    while cursor < end:
        stop = min(cursor + timedelta(days=step), end)
        runs.append((cursor, stop))
        cursor = stop
    return runs


def split_window(start: datetime, end: datetime) -> tuple[tuple[datetime, datetime], tuple[datetime, datetime]]:
    """Halve ``[start, end)`` at a quarter-hour boundary, for a server that rejects the range.

    Raises ValueError when the window is a single quarter-hour and cannot be halved.
    """
    quarters = int((end - start) / QUARTER_HOUR)
    if quarters < 2:
        raise ValueError(f"window {start.isoformat()} to {end.isoformat()} is too short to split")
    middle = start + QUARTER_HOUR * (quarters // 2)
    return (start, middle), (middle, end)


def parse_day(text: str, *, option: str = "date") -> date:
    """Parse ``YYYY-MM-DD``; the error names the option and the value."""
    from terralayr_etl.errors import ConfigError

    try:
        return date.fromisoformat(text)
    except ValueError:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            raise ConfigError(f"invalid {option} {text!r}: no such day in the calendar; check the month and day") from None
        raise ConfigError(f"invalid {option} {text!r}; use the form YYYY-MM-DD, for example 2024-10-20") from None


def epoch_microseconds(instant: datetime) -> int:
    """Return a timezone-aware instant as microseconds since 1970-01-01 UTC, as Arrow stores it."""
    return (instant - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def isoformat_z(instant: datetime) -> str:
    """Format a UTC instant as RFC 3339 with a ``Z`` suffix, as the API does."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_block_start(day: date, resolution: str) -> date:
    """Return the first day of the storage block that holds ``day`` at ``resolution``.

    A block is the unit of one Parquet file per entity: a week (from Monday) cut at month
    boundaries for 15-minute and raw data, a month for hourly, daily and revenue buckets.
    Request windows are planned as whole blocks, so a backfill writes each file once.
    """
    month_start = day.replace(day=1)
    if resolution in ("raw", "15min"):
        return max(day - timedelta(days=day.weekday()), month_start)
    return month_start


def block_boundaries(start: date, end: date, resolution: str) -> list[date]:
    """Return the block starts inside ``(start, end)``: the days where a new file begins."""
    return [day for day in day_range(start + timedelta(days=1), end) if file_block_start(day, resolution) == day]
