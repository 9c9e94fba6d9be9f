"""Window planning: whole Europe/Berlin days, range limits in elapsed time, request bounds."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from terralayr_etl.config import Settings, load_settings
from terralayr_etl.errors import ConfigError
from terralayr_etl.windows import datapoint_request_range, plan_bucket_windows, plan_windows

QUARTER_HOUR = timedelta(minutes=15)
BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture(scope="module")
def settings() -> Settings:
    # Window planning sends nothing, but the base URL still points at loopback.
    return load_settings(base_url="http://127.0.0.1:9")


def with_max_range_days(settings: Settings, **limits: float) -> Settings:
    api = settings.api.model_copy(update={"max_range_days": {**settings.api.max_range_days, **limits}})
    return settings.model_copy(update={"api": api})


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_plan_windows_20_days_as_7_7_6(settings: Settings) -> None:
    windows = plan_windows("15min", date(2024, 1, 1), date(2024, 1, 21), settings)

    assert windows == [
        (utc("2023-12-31T23:00"), utc("2024-01-07T23:00")),
        (utc("2024-01-07T23:00"), utc("2024-01-14T23:00")),
        (utc("2024-01-14T23:00"), utc("2024-01-20T23:00")),
    ]


def test_plan_windows_counts_local_days_over_dst(settings: Settings) -> None:
    # The limit counts delivery days, so the week with the 25-hour 2024-10-27 is one window.
    # Windows follow storage blocks: weeks from Monday, cut at month ends, packed up to 7 days.
    windows = plan_windows("raw", date(2024, 10, 20), date(2024, 11, 9), settings)

    assert windows == [
        (utc("2024-10-19T22:00"), utc("2024-10-20T22:00")),
        (utc("2024-10-20T22:00"), utc("2024-10-27T23:00")),
        (utc("2024-10-27T23:00"), utc("2024-11-03T23:00")),
        (utc("2024-11-03T23:00"), utc("2024-11-08T23:00")),
    ]
    assert windows[1][1] - windows[1][0] == timedelta(days=7, hours=1)


def test_plan_windows_keeps_run_with_spring_dst_day(settings: Settings) -> None:
    # 2024-03-31 has 23 hours, so 7 local days around it last 167 h and fit.
    windows = plan_windows("15min", date(2024, 3, 25), date(2024, 4, 1), settings)

    assert windows == [(utc("2024-03-24T23:00"), utc("2024-03-31T22:00"))]


def test_plan_windows_daily_leap_year_is_one_window(settings: Settings) -> None:
    windows = plan_windows("daily", date(2024, 1, 1), date(2025, 1, 1), settings)

    assert windows == [(utc("2023-12-31T23:00"), utc("2024-12-31T23:00"))]


def test_plan_bucket_windows_uses_revenue_limit(settings: Settings) -> None:
    windows = plan_bucket_windows(date(2024, 1, 1), date(2024, 3, 1), settings)

    assert windows == [
        (utc("2023-12-31T23:00"), utc("2024-01-31T23:00")),
        (utc("2024-01-31T23:00"), utc("2024-02-29T23:00")),
    ]


def test_plan_windows_empty_range_gives_no_windows(settings: Settings) -> None:
    assert plan_windows("hourly", date(2024, 5, 1), date(2024, 5, 1), settings) == []
    assert plan_windows("hourly", date(2024, 5, 2), date(2024, 5, 1), settings) == []


def test_plan_windows_unknown_resolution_raises_config_error(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="'minutely'"):
        plan_windows("minutely", date(2024, 5, 1), date(2024, 5, 2), settings)


def test_plan_windows_half_day_limit_cuts_days(settings: Settings) -> None:
    half_day = with_max_range_days(settings, raw=0.5)

    windows = plan_windows("raw", date(2024, 10, 26), date(2024, 10, 28), half_day)

    assert windows == [
        (utc("2024-10-25T22:00"), utc("2024-10-26T10:00")),
        (utc("2024-10-26T10:00"), utc("2024-10-26T22:00")),
        (utc("2024-10-26T22:00"), utc("2024-10-27T10:00")),
        (utc("2024-10-27T10:00"), utc("2024-10-27T22:00")),
        (utc("2024-10-27T22:00"), utc("2024-10-27T23:00")),
    ]


def test_plan_windows_one_day_limit_dst(settings: Settings) -> None:
    one_day = with_max_range_days(settings, raw=1)

    windows = plan_windows("raw", date(2024, 10, 26), date(2024, 10, 29), one_day)

    assert windows == [
        (utc("2024-10-25T22:00"), utc("2024-10-26T22:00")),
        (utc("2024-10-26T22:00"), utc("2024-10-27T23:00")),
        (utc("2024-10-27T23:00"), utc("2024-10-28T23:00")),
    ]


@pytest.mark.parametrize(
    ("resolution", "max_days", "start", "end"),
    [
        ("15min", 7, date(2024, 1, 1), date(2025, 1, 1)),
        ("15min", 3, date(2024, 3, 20), date(2024, 4, 10)),
        ("hourly", 31, date(2023, 12, 15), date(2025, 2, 1)),
        ("daily", 366, date(2022, 6, 1), date(2025, 6, 1)),
        ("raw", 2.5, date(2024, 10, 20), date(2024, 11, 5)),
    ],
)
def test_plan_windows_cover_range_within_limit(
    settings: Settings, resolution: str, max_days: float, start: date, end: date
) -> None:
    windows = plan_windows(resolution, start, end, with_max_range_days(settings, **{resolution: max_days}))

    first_start = windows[0][0]
    last_end = windows[-1][1]
    assert first_start.astimezone(BERLIN).date() == start
    assert last_end.astimezone(BERLIN).date() == end
    for (_, previous_end), (next_start, _) in zip(windows, windows[1:]):
        assert previous_end == next_start
    for window_start, window_end in windows:
        local_days = (window_end.astimezone(BERLIN).date() - window_start.astimezone(BERLIN).date()).days
        assert local_days <= max_days
        assert window_start.astimezone(BERLIN).time() == time(0)
        assert window_end.astimezone(BERLIN).time() == time(0)


def test_request_range_inclusive_end(settings: Settings) -> None:
    start, end = utc("2024-01-01T23:00"), utc("2024-01-08T23:00")

    assert datapoint_request_range(start, end, settings) == (start, end - QUARTER_HOUR)


def test_request_range_exclusive_end(settings: Settings) -> None:
    exclusive = settings.model_copy(update={"api": settings.api.model_copy(update={"end_inclusive": False})})
    start, end = utc("2024-01-01T23:00"), utc("2024-01-08T23:00")

    assert datapoint_request_range(start, end, exclusive) == (start, end)
