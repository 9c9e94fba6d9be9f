"""Tests of the sandbox data engine: replay, dispatch, product identities and roll-ups.

Expected values are recomputed here in plain Python from the engine's own 15-minute frames
with the rules of ``terralayr_etl.categories``, so the polars roll-ups are checked against
an independent implementation.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from terralayr_etl.categories import CATEGORIES, CATEGORY_NAMES, DAYS_PER_YEAR, PRODUCTS
from terralayr_etl.config import PROJECT_ROOT
from terralayr_etl.errors import ConfigError
from terralayr_etl.sandbox.derive_parameters import derive_parameters
from terralayr_etl.sandbox.dispatch import dispatch_days
from terralayr_etl.sandbox.engine import PRODUCT_CATEGORIES, Engine
from terralayr_etl.sandbox.market import DEFAULT_PARAMETERS_PATH, DEFAULT_PRICES_PATH, local_hours, source_day
from terralayr_etl.sandbox.organisation import (
    DAILY_CYCLE_LIMIT,
    Organisation,
    load_organisation,
    synthetic_organisation,
)
from terralayr_etl.timeutil import LOCAL_TZ, local_midnight

PORTFOLIO_WITH_TOLLING = "0b531721-327f-5b79-a7f9-564c2da27bb2"
PORTFOLIO_WITH_LIFETIMES = "26b0692a-9e43-5a19-8ddd-ff03e4dabfb6"
FLEET = "bde7e50b-3cd6-5c9b-bd68-56395f915f1f"
PHYSICAL_ASSET = "ef93110b-afb5-543b-a809-cead09431b48"
DST_START = date(2024, 3, 31)
DST_END = date(2024, 10, 27)
NORMAL_DAY = date(2024, 6, 5)

REL_TOL = 1e-9
ABS_TOL = 1e-9


@pytest.fixture(scope="module")
def organisation() -> Organisation:
    return load_organisation()


@pytest.fixture(scope="module")
def engine(organisation: Organisation) -> Engine:
    return Engine(organisation)


def _asset_id(organisation: Organisation, name: str) -> str:
    return next(asset.id for asset in organisation.virtual_assets if asset.name == name)


def _day_window(first: date, days: int = 1) -> tuple[datetime, datetime]:
    return local_midnight(first), local_midnight(first + timedelta(days=days))


def _close(expected: float | None, actual: float | None) -> bool:
    if expected is None or actual is None:
        return expected is None and actual is None
    return math.isclose(expected, actual, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def _mismatches(expected: dict[datetime, dict[str, float | None]], frame: pl.DataFrame) -> list[str]:
    """Compare expected values per period with a frame; return readable mismatches."""
    actual = {row["period_start"]: row for row in frame.iter_rows(named=True)}
    problems = []
    if set(expected) != set(actual):
        problems.append(f"periods differ: expected {len(expected)}, got {len(actual)}")
    for period, values in expected.items():
        for name, value in values.items():
            got = actual.get(period, {}).get(name)
            if not _close(value, got):
                problems.append(f"{period.isoformat()} {name}: expected {value}, got {got}")
    return problems


# Independent implementations of the aggregation rules.


def _weighted(pairs: list[tuple[float | None, float]]) -> float | None:
    present = [(value, weight) for value, weight in pairs if value is not None]
    denominator = sum(weight for _, weight in present)
    if denominator == 0:
        return None
    return sum(value * weight for value, weight in present) / denominator


def _over_time(rows: list[dict]) -> dict[str, float | None]:
    result: dict[str, float | None] = {}
    for name, category in CATEGORIES.items():
        if category.over_time == "sum":
            result[name] = sum(row[name] for row in rows)
        elif category.over_time == "weighted":
            result[name] = _weighted([(row[name], row[category.weight]) for row in rows])
        else:
            present = [row[name] for row in rows if row[name] is not None]
            result[name] = sum(present) / len(present) if present else None
    return result


def _expected_roll_up(frame: pl.DataFrame, resolution: str) -> dict[datetime, dict[str, float | None]]:
    groups: dict[datetime, list[dict]] = defaultdict(list)
    for row in frame.iter_rows(named=True):
        start = row["period_start"]
        if resolution == "hourly":
            key = start.replace(minute=0)
        else:
            key = local_midnight(start.astimezone(LOCAL_TZ).date())
        groups[key.astimezone(UTC)].append(row)
    return {key: _over_time(rows) for key, rows in groups.items()}


def _over_entities(members: list[tuple[dict, float]]) -> dict[str, float | None]:
    """Aggregate one period's member rows, each with the member's capacity in MW."""
    result: dict[str, float | None] = {}
    for name, category in CATEGORIES.items():
        rule = category.over_entities
        values = [row[name] for row, _ in members]
        present = [value for value in values if value is not None]
        if rule == "sum":
            result[name] = sum(values)
        elif rule == "weighted":
            result[name] = _weighted([(row[name], row[category.weight]) for row, _ in members])
        elif rule == "max":
            result[name] = max(present) if present else None
        elif rule == "mean":
            result[name] = sum(present) / len(present) if present else None
        elif rule == "capacity_weighted":
            result[name] = _weighted([(row[name], capacity) for row, capacity in members])
        elif rule == "net_off":
            buy = sum(row["buy_volume_wholesale"] for row, _ in members)
            sell = sum(row["sell_volume_wholesale"] for row, _ in members)
            result[name] = min(buy, sell)
    capacity = sum(capacity for _, capacity in members)
    for name, category in CATEGORIES.items():
        if category.over_entities == "normalised":
            per_mw = result[category.revenue] / capacity
            result[name] = per_mw * DAYS_PER_YEAR if category.per_year else per_mw
    return result


def _expected_aggregate(
    engine: Engine, organisation: Organisation, entity_type: str, entity_id: str, start: datetime, end: datetime
) -> dict[datetime, dict[str, float | None]]:
    by_period: dict[datetime, list[tuple[dict, float]]] = defaultdict(list)
    for member in organisation.members(entity_type, entity_id):
        frame = engine.datapoints("virtual_asset", member.id, "15min", start, end)
        for row in frame.iter_rows(named=True):
            by_period[row["period_start"]].append((row, member.capacity_mw()))
    return {period: _over_entities(members) for period, members in by_period.items()}


# Replay and calendar.


@pytest.mark.parametrize(
    ("day", "quarter_hours", "hours"),
    [(DST_START, 92, 23), (NORMAL_DAY, 96, 24), (DST_END, 100, 25)],
)
def test_datapoints_row_counts_follow_local_day(engine, organisation, day, quarter_hours, hours):
    start, end = _day_window(day)
    asset_id = _asset_id(organisation, "VA-01")

    fifteen = engine.datapoints("virtual_asset", asset_id, "15min", start, end)
    raw = engine.datapoints("virtual_asset", asset_id, "raw", start, end)
    hourly = engine.datapoints("virtual_asset", asset_id, "hourly", start, end)
    daily = engine.datapoints("virtual_asset", asset_id, "daily", start, end)

    assert fifteen.height == quarter_hours
    assert raw.equals(fifteen)
    assert hourly.height == hours
    assert daily.height == 1
    assert daily["period_start"][0] == start


def test_datapoints_schema_and_order(engine, organisation):
    start, end = _day_window(DST_END)
    frame = engine.datapoints("portfolio", PORTFOLIO_WITH_TOLLING, "15min", start, end)

    assert frame.columns == ["period_start", *CATEGORY_NAMES]
    assert frame.schema["period_start"] == pl.Datetime("us", "UTC")
    assert all(frame.schema[name] == pl.Float64 for name in CATEGORY_NAMES)
    assert frame["period_start"].is_sorted()
    assert frame["period_start"].diff().drop_nulls().unique().to_list() == [timedelta(minutes=15)]


def test_replay_serves_date_outside_2024(engine, organisation):
    start, end = _day_window(date(2026, 12, 3))
    frame = engine.datapoints("virtual_asset", _asset_id(organisation, "VA-03"), "15min", start, end)

    assert frame.height == 96
    assert frame["revenue_total_revenue"].null_count() == 0
    assert frame["settlement_price_fcr"].null_count() == 0


def test_replay_dst_day_outside_2024(engine, organisation):
    start, end = _day_window(date(2025, 3, 30))
    frame = engine.datapoints("virtual_asset", _asset_id(organisation, "VA-03"), "15min", start, end)

    assert frame.height == 92


def test_source_day_keeps_weekday_and_season():
    for offset in range(0, 3 * 366, 5):
        target = date(2023, 1, 1) + timedelta(days=offset)
        source = source_day(target)
        position_gap = abs(source.timetuple().tm_yday - target.timetuple().tm_yday)

        assert source.year == 2024
        assert source.weekday() == target.weekday()
        assert position_gap <= 10, (target, source)


def test_source_day_is_identity_in_2024():
    for offset in range(366):
        day = date(2024, 1, 1) + timedelta(days=offset)
        assert source_day(day) == day


def _csv_prices_by_local_day() -> dict[date, list[float]]:
    frame = pl.read_csv(DEFAULT_PRICES_PATH)
    prices: dict[date, list[float]] = defaultdict(list)
    for local, price in frame.select("timestamp_local", "price_eur_mwh").iter_rows():
        prices[date.fromisoformat(local[:10])].append(float(price))
    return prices


@pytest.mark.parametrize("day", [DST_START, NORMAL_DAY, DST_END])
def test_replay_2024_day_matches_source_file(engine, day):
    expected = _csv_prices_by_local_day()[day]
    hourly = engine.market.replay.hourly_prices(day)
    quarters = engine.market.replay.quarter_hour_prices(day)

    assert hourly.tolist() == expected
    assert np.allclose(quarters.reshape(-1, 4).mean(axis=1), hourly, rtol=0, atol=1e-9)


def test_replay_fills_missing_hour_from_nearest():
    # 2023-04-02 has 24 hours and replays 2024-03-31, which has no 02:00.
    target = date(2023, 4, 2)
    source_prices = _csv_prices_by_local_day()[DST_START]
    replay_hourly = Engine(load_organisation()).market.replay.hourly_prices(target)

    assert source_day(target) == DST_START
    assert len(replay_hourly) == 24
    assert replay_hourly[2] == source_prices[1]
    assert replay_hourly[3] == source_prices[2]


def test_replay_repeated_hour_keeps_both_occurrences(engine):
    # A 24-hour target day reads occurrence 0, the first 02:00 of 2024-10-27.
    source_prices = _csv_prices_by_local_day()[DST_END]
    table = engine.market.replay.source_prices(DST_END)

    assert table[2, 0] == source_prices[2]
    assert table[2, 1] == source_prices[3]
    assert table[3, 0] == table[3, 1] == source_prices[4]


def test_local_hours_mark_repeated_hour():
    hours, occurrences = local_hours(DST_END)

    assert hours.tolist()[:5] == [0, 1, 2, 2, 3]
    assert occurrences.tolist()[:5] == [0, 0, 0, 1, 0]


# Dispatch.


def test_dispatch_days_respects_power_energy_and_cycles():
    rng = np.random.default_rng(7)
    rows, steps = 40, 100
    prices = rng.normal(80, 40, (rows, steps))
    prices[:, 92:] = np.nan
    valid = ~np.isnan(prices)
    charge_power = np.where(valid, rng.uniform(0.5, 2.0, (rows, steps)), 0.0)
    discharge_power = np.where(valid, rng.uniform(0.5, 2.0, (rows, steps)), 0.0)
    energy = rng.uniform(0.5, 4.0, rows)
    efficiency = np.full(rows, 0.943)

    result = dispatch_days(prices, charge_power, discharge_power, energy, efficiency, efficiency)

    assert np.all(result.buy_mwh <= charge_power * 0.25 + 1e-12)
    assert np.all(result.sell_mwh <= discharge_power * 0.25 + 1e-12)
    assert not np.any((result.buy_mwh > 0) & (result.sell_mwh > 0))
    assert np.all(result.soc_mwh >= -1e-9)
    assert np.all(result.soc_mwh <= energy[:, None] + 1e-9)
    assert np.allclose(result.soc_mwh[:, -1], 0.5 * energy, atol=1e-9)
    discharged = (result.sell_mwh / efficiency[:, None]).sum(axis=1)
    assert np.all(discharged <= DAILY_CYCLE_LIMIT * energy + 1e-9)
    assert result.sell_mwh.sum() > 0


@pytest.mark.parametrize("name", ["VA-01", "VA-05", "VA-07"])
@pytest.mark.parametrize("day", [DST_START, NORMAL_DAY, DST_END])
def test_engine_dispatch_within_limits(engine, organisation, name, day):
    asset = next(a for a in organisation.virtual_assets if a.name == name)
    start, end = _day_window(day)
    frame = engine.datapoints("virtual_asset", asset.id, "15min", start, end)
    buy = frame["buy_volume_wholesale"].to_numpy()
    sell = frame["sell_volume_wholesale"].to_numpy()
    fcr_mw = frame["capacity_fcr"].to_numpy()
    power_mw = asset.power_kw / 1000
    energy_mwh = asset.energy_kwh / 1000

    # The state of charge starts each day at 50 % and moves by the grid volumes and efficiencies.
    soc = 0.5 * energy_mwh + np.cumsum(buy * asset.charge_efficiency - sell / asset.discharge_efficiency)

    assert np.all(buy <= (power_mw - fcr_mw) * 0.25 + 1e-9)
    assert np.all(sell <= (power_mw - fcr_mw) * 0.25 + 1e-9)
    assert soc.min() >= -1e-9
    assert soc.max() <= energy_mwh + 1e-9
    assert abs(soc[-1] - 0.5 * energy_mwh) <= 1e-9
    assert (sell / asset.discharge_efficiency).sum() <= DAILY_CYCLE_LIMIT * energy_mwh + 1e-9


# Identities.


def _value(row: dict, name: str) -> float:
    return 0.0 if row[name] is None else row[name]


@pytest.mark.parametrize(
    ("entity_type", "entity_id"),
    [("portfolio", PORTFOLIO_WITH_TOLLING), ("virtual_asset", "3134728a-98e3-5e8c-b014-a0cafa737233")],
)
def test_identities_hold_on_dst_day(engine, organisation, entity_type, entity_id):
    start, end = _day_window(DST_END)
    frame = engine.datapoints(entity_type, entity_id, "15min", start, end)
    members = organisation.members(entity_type, entity_id)
    capacity_mw = sum(member.capacity_mw() for member in members)
    tolling_member = next(member for member in members if member.tolling_annual_price_eur_per_mw > 0)

    assert frame.height == 100
    for row in frame.iter_rows(named=True):
        products = sum(row[f"revenue_{product}"] for product in PRODUCTS)
        wholesale = _value(row, "sell_vwap_wholesale") * row["sell_volume_wholesale"] - _value(
            row, "buy_vwap_wholesale"
        ) * row["buy_volume_wholesale"]
        energy_pos = row["total_volume_afrr_energy_pos"] * _value(row, "settlement_price_afrr_energy_pos")
        energy_neg = row["total_volume_afrr_energy_neg"] * -_value(row, "settlement_price_afrr_energy_neg")

        assert _close(products, row["revenue_total_revenue"])
        assert _close(row["sell_volume_wholesale"] - row["buy_volume_wholesale"], row["net_volume_wholesale"])
        assert _close(wholesale, row["revenue_wholesale"])
        assert _close(energy_pos, row["revenue_afrr_energy_pos"])
        assert _close(energy_neg, row["revenue_afrr_energy_neg"])
        assert _close(row["revenue_afrr_energy_pos"] + row["revenue_afrr_energy_neg"], row["revenue_afrr_energy"])
        assert row["delivery_hours_fcr"] == 0.25
        assert _close(row["capacity_fcr"] * 0.25, row["weighted_capacity_fcr"])
        assert _close(row["settlement_price_fcr"] * 0.25, row["weighted_settlement_price_fcr"])
        assert _close(row["capacity_fcr"] * row["settlement_price_fcr"] * 0.25, row["revenue_fcr"])
        assert _close(row["capacity_fcr"], row["capacity_fcr_weighted_avg"])
        expected_weighted_price = row["settlement_price_fcr"] if row["capacity_fcr"] > 0 else None
        assert _close(expected_weighted_price, row["settlement_price_fcr_weighted_avg"])
        assert (row["buy_vwap_wholesale"] is None) == (row["buy_volume_wholesale"] == 0)
        assert (row["sell_vwap_wholesale"] is None) == (row["sell_volume_wholesale"] == 0)
        assert (row["settlement_price_afrr_energy_pos"] is None) == (row["total_volume_afrr_energy_pos"] == 0)
        assert (row["settlement_price_afrr_energy_neg"] is None) == (row["total_volume_afrr_energy_neg"] == 0)
        assert row["annual_price_tolling"] == tolling_member.tolling_annual_price_eur_per_mw
        assert _close(
            tolling_member.tolling_annual_price_eur_per_mw * tolling_member.capacity_mw() * 0.25 / 8760,
            row["revenue_tolling"],
        )
        assert row["hurdle_price_vba"] is None
        for name, category in CATEGORIES.items():
            if category.revenue is not None:
                per_mw = row[category.revenue] / capacity_mw
                assert _close(per_mw * DAYS_PER_YEAR if category.per_year else per_mw, row[name]), name


def test_virtual_asset_net_off_is_zero(engine, organisation):
    start, end = _day_window(NORMAL_DAY)
    frame = engine.datapoints("virtual_asset", _asset_id(organisation, "VA-05"), "15min", start, end)

    assert frame["net_off_volume_wholesale"].to_list() == [0.0] * 96
    assert frame["buy_volume_wholesale"].sum() > 0
    assert frame["sell_volume_wholesale"].sum() > 0


def test_vwaps_differ_from_day_ahead(engine, organisation):
    start, end = _day_window(NORMAL_DAY)
    frame = engine.datapoints("virtual_asset", _asset_id(organisation, "VA-05"), "15min", start, end)
    day_ahead = engine.market.day(NORMAL_DAY).day_ahead_eur_per_mwh
    sold = frame["sell_volume_wholesale"].to_numpy() > 0

    assert sold.any()
    assert not np.allclose(frame["sell_vwap_wholesale"].to_numpy()[sold], day_ahead[sold])


@pytest.mark.parametrize(
    ("entity_type", "entity_id", "day"),
    [
        ("portfolio", PORTFOLIO_WITH_TOLLING, DST_END),
        ("portfolio", PORTFOLIO_WITH_LIFETIMES, date(2024, 10, 29)),
        ("fleet", FLEET, DST_START),
        ("physical_asset", PHYSICAL_ASSET, NORMAL_DAY),
    ],
)
def test_aggregate_follows_over_entities_rules(engine, organisation, entity_type, entity_id, day):
    start, end = _day_window(day)
    frame = engine.datapoints(entity_type, entity_id, "15min", start, end)
    expected = _expected_aggregate(engine, organisation, entity_type, entity_id, start, end)

    assert _mismatches(expected, frame) == []


def test_aggregate_net_off_nets_opposite_trades(engine, organisation):
    start, end = _day_window(date(2024, 10, 20), days=14)
    frame = engine.datapoints("fleet", FLEET, "15min", start, end)
    buy: dict[datetime, float] = defaultdict(float)
    sell: dict[datetime, float] = defaultdict(float)
    for member in organisation.members("fleet", FLEET):
        member_frame = engine.datapoints("virtual_asset", member.id, "15min", start, end)
        for period, bought, sold in member_frame.select(
            "period_start", "buy_volume_wholesale", "sell_volume_wholesale"
        ).iter_rows():
            buy[period] += bought
            sell[period] += sold
    expected = {period: {"net_off_volume_wholesale": min(buy[period], sell[period])} for period in buy}

    assert frame["net_off_volume_wholesale"].max() > 0
    assert _mismatches(expected, frame) == []


# Roll-ups.


@pytest.mark.parametrize("resolution", ["hourly", "daily"])
@pytest.mark.parametrize(
    ("entity_type", "entity_id"),
    [("virtual_asset", "2a8940fa-a408-51d6-9173-b4730915bea4"), ("portfolio", PORTFOLIO_WITH_TOLLING), ("fleet", FLEET)],
)
def test_roll_up_follows_over_time_rules(engine, entity_type, entity_id, resolution):
    start, end = _day_window(date(2024, 10, 26), days=3)
    fifteen = engine.datapoints(entity_type, entity_id, "15min", start, end)
    rolled = engine.datapoints(entity_type, entity_id, resolution, start, end)

    assert rolled.height == (24 + 25 + 24 if resolution == "hourly" else 3)
    assert _mismatches(_expected_roll_up(fifteen, resolution), rolled) == []


def test_hourly_period_is_complete_when_range_cuts_it(engine, organisation):
    asset_id = _asset_id(organisation, "VA-06")
    hour = datetime(2024, 6, 5, 10, tzinfo=UTC)
    whole = engine.datapoints("virtual_asset", asset_id, "hourly", hour, hour + timedelta(hours=1))
    cut = engine.datapoints("virtual_asset", asset_id, "hourly", hour, hour + timedelta(minutes=30))
    after_start = engine.datapoints("virtual_asset", asset_id, "hourly", hour + timedelta(minutes=15), hour + timedelta(hours=2))

    assert cut.equals(whole)
    assert after_start["period_start"].to_list() == [hour + timedelta(hours=1)]


def test_daily_period_is_complete_when_range_cuts_it(engine, organisation):
    asset_id = _asset_id(organisation, "VA-06")
    start, end = _day_window(NORMAL_DAY)
    whole = engine.datapoints("virtual_asset", asset_id, "daily", start, end)
    cut = engine.datapoints("virtual_asset", asset_id, "daily", start, start + timedelta(hours=1))

    assert cut.equals(whole)


# Lifetimes.


def _local_days(frame: pl.DataFrame) -> list[date]:
    return [instant.astimezone(LOCAL_TZ).date() for instant in frame["period_start"]]


def test_lifetime_ends_and_starts_at_local_midnight(engine, organisation):
    start, end = _day_window(date(2024, 10, 20), days=12)
    ending = engine.datapoints("virtual_asset", _asset_id(organisation, "VA-09"), "daily", start, end)
    starting = engine.datapoints("virtual_asset", _asset_id(organisation, "VA-10"), "daily", start, end)
    ending_quarters = engine.datapoints("virtual_asset", _asset_id(organisation, "VA-09"), "15min", start, end)

    assert _local_days(ending)[-1] == date(2024, 10, 24)
    assert _local_days(ending)[0] == date(2024, 10, 20)
    assert _local_days(starting)[0] == date(2024, 10, 29)
    assert _local_days(starting)[-1] == date(2024, 10, 31)
    assert ending_quarters["period_start"].max() == local_midnight(date(2024, 10, 25)) - timedelta(minutes=15)


def test_entity_outside_lifetime_returns_empty_frame(engine, organisation):
    start, end = _day_window(date(2024, 11, 1), days=3)
    frame = engine.datapoints("virtual_asset", _asset_id(organisation, "VA-09"), "hourly", start, end)

    assert frame.height == 0
    assert frame.columns == ["period_start", *CATEGORY_NAMES]


def test_aggregate_capacity_follows_active_members(engine, organisation):
    start, end = _day_window(date(2024, 10, 24), days=6)
    frame = engine.datapoints("portfolio", PORTFOLIO_WITH_LIFETIMES, "daily", start, end)
    capacity = {asset.name: asset.capacity_mw() for asset in organisation.virtual_assets}
    expected_capacity = {
        date(2024, 10, 24): capacity["VA-08"] + capacity["VA-09"],
        date(2024, 10, 25): capacity["VA-08"],
        date(2024, 10, 28): capacity["VA-08"],
        date(2024, 10, 29): capacity["VA-08"] + capacity["VA-10"],
    }

    rows = dict(zip(_local_days(frame), frame.iter_rows(named=True), strict=True))
    assert len(rows) == 6
    for day, capacity_mw in expected_capacity.items():
        row = rows[day]
        assert _close(row["revenue_total_revenue"] / capacity_mw, row["revenue_normalised_total"]), day


# Determinism.


def test_same_seed_gives_identical_output(organisation):
    start, end = _day_window(date(2024, 10, 26), days=2)
    first = Engine(organisation).datapoints("fleet", FLEET, "15min", start, end)
    second = Engine(organisation).datapoints("fleet", FLEET, "15min", start, end)
    other_seed = Engine(organisation, seed=organisation.seed + 1).datapoints("fleet", FLEET, "15min", start, end)

    assert first.equals(second)
    assert not first.equals(other_seed)


def test_day_values_do_not_depend_on_range(organisation):
    asset_id = _asset_id(organisation, "VA-02")
    day_start, day_end = _day_window(DST_END)
    alone = Engine(organisation).datapoints("virtual_asset", asset_id, "15min", day_start, day_end)
    wide_start, wide_end = _day_window(date(2024, 10, 21), days=7)
    within = Engine(organisation).datapoints("virtual_asset", asset_id, "15min", wide_start, wide_end)

    assert within.filter(pl.col("period_start") >= day_start, pl.col("period_start") < day_end).equals(alone)


def test_cache_eviction_keeps_values(organisation):
    asset_id = _asset_id(organisation, "VA-02")
    start, end = _day_window(date(2024, 10, 21), days=7)
    small_cache = Engine(organisation, cache_asset_days=2)
    first = small_cache.datapoints("virtual_asset", asset_id, "15min", start, end)
    second = small_cache.datapoints("virtual_asset", asset_id, "15min", start, end)

    assert first.equals(second)
    assert len(small_cache._cache) == 2


# Revenue buckets.


@pytest.mark.parametrize("product", list(PRODUCT_CATEGORIES))
def test_revenue_buckets_equal_daily_values(engine, organisation, product):
    asset = next(a for a in organisation.virtual_assets if a.name == "VA-10")
    start, end = _day_window(date(2024, 10, 26), days=7)
    buckets = engine.revenue_buckets(asset.id, product, start, end)
    daily = engine.datapoints("virtual_asset", asset.id, "daily", start, end)

    assert len(buckets) == daily.height == 4
    for bucket, row in zip(buckets, daily.iter_rows(named=True), strict=True):
        day = row["period_start"].astimezone(LOCAL_TZ).date()
        expected = sum(row[name] for name in PRODUCT_CATEGORIES[product])

        assert bucket["start"] == local_midnight(day)
        assert bucket["end"] == local_midnight(day + timedelta(days=1))
        assert _close(expected, bucket["revenue"])


def test_revenue_bucket_products_cover_total(engine, organisation):
    asset_id = _asset_id(organisation, "VA-04")
    start, end = _day_window(DST_END)
    daily = engine.datapoints("virtual_asset", asset_id, "daily", start, end)
    products = sum(engine.revenue_buckets(asset_id, product, start, end)[0]["revenue"] for product in PRODUCT_CATEGORIES)

    assert _close(daily["revenue_total_revenue"][0], products)


class _DoubleEveryDay:
    """Corrections that double the EUR values of every delivery day."""

    def factors(self, days):
        return dict.fromkeys(days, 2.0)


def test_revenue_window_cache_skips_corrections(organisation):
    engine = Engine(organisation)
    asset_id = _asset_id(organisation, "VA-04")
    start, end = _day_window(NORMAL_DAY, days=3)
    first = engine.revenue_buckets(asset_id, "wholesale", start, end)
    tolling = engine.revenue_buckets(asset_id, "tolling", start, end)

    assert engine.revenue_buckets(asset_id, "wholesale", start, end) == first
    assert len(engine._daily_revenue_cache) == 1
    assert [bucket["start"] for bucket in tolling] == [bucket["start"] for bucket in first]

    engine.corrections = _DoubleEveryDay()
    corrected = engine.revenue_buckets(asset_id, "wholesale", start, end)

    assert [bucket["revenue"] for bucket in corrected] == pytest.approx([2 * bucket["revenue"] for bucket in first])


# Errors.


def test_unknown_entity_raises_key_error(engine):
    start, end = _day_window(NORMAL_DAY)
    with pytest.raises(KeyError):
        engine.datapoints("portfolio", "no-such-portfolio", "15min", start, end)
    with pytest.raises(KeyError):
        engine.datapoints("virtual_asset", "no-such-asset", "daily", start, end)
    with pytest.raises(KeyError):
        engine.datapoints("site", PORTFOLIO_WITH_TOLLING, "daily", start, end)
    with pytest.raises(KeyError):
        engine.revenue_buckets("no-such-asset", "wholesale", start, end)


def test_invalid_arguments_raise_value_error(engine, organisation):
    asset_id = _asset_id(organisation, "VA-01")
    start, end = _day_window(NORMAL_DAY)
    with pytest.raises(ValueError, match="resolution"):
        engine.datapoints("virtual_asset", asset_id, "weekly", start, end)
    with pytest.raises(ValueError, match="time zone"):
        engine.datapoints("virtual_asset", asset_id, "15min", datetime(2024, 6, 5), end)
    with pytest.raises(ValueError, match="product"):
        engine.revenue_buckets(asset_id, "capacity", start, end)


# Organisation.


def test_load_organisation_demo_config(organisation):
    names = [asset.name for asset in organisation.virtual_assets]

    assert len(names) == 10
    assert [a.name for a in organisation.members("fleet", FLEET)] == names
    assert len(organisation.portfolios()) == 4
    assert [a.name for a in organisation.members("portfolio", PORTFOLIO_WITH_LIFETIMES)] == ["VA-08", "VA-09", "VA-10"]


def test_virtual_asset_api_json(organisation):
    asset = next(a for a in organisation.virtual_assets if a.name == "VA-10")
    body = asset.to_api_json()

    assert body["id"] == asset.id
    assert body["portfolioID"] == asset.portfolio_id
    assert body["start"] == "2024-10-28T23:00:00Z"
    assert body["end"] == "2030-12-31T23:00:00Z"
    assert body["ratedChargePower"] == 50000
    assert body["unitsPower"] == "kW"
    assert body["energyCapacity"] == 100000
    assert asset.capacity_mw() == 50.0


def _write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sandbox.toml"
    path.write_text(text, encoding="utf-8")
    return path


_VALID_HEADER = """
[sandbox]
organisation_id = "org-1"
username = "user@example.com"
password = "secret"
seed = 1
"""

_VALID_ASSET = """
[[virtual_assets]]
id = "va-1"
portfolio_id = "pf-1"
power_kw = 1000
energy_kwh = 2000
start = "2024-01-01"
end = "2025-01-01"
"""


def test_load_organisation_minimal_config(tmp_path):
    organisation = load_organisation(_write_config(tmp_path, _VALID_HEADER + _VALID_ASSET))

    assert organisation.virtual_assets[0].energy_kwh == 2000
    assert organisation.token_lifetime_seconds == 3600


@pytest.mark.parametrize(
    ("extra", "replace", "message"),
    [
        ("", ("power_kw = 1000", "power_kw = -5"), "power_kw"),
        ("", ('end = "2025-01-01"', 'end = "2023-01-01"'), "end"),
        ("", ('id = "va-1"', 'id = "va/1"'), "va/1"),
        ("", ("energy_kwh = 2000", "energy_kwh = 2000\npowr_kw = 3"), "powr_kw"),
        ('\n[[fleets]]\nid = "fleet-1"\nportfolio_ids = ["pf-9"]\n', ("", ""), "pf-9"),
        ('\n[[physical_assets]]\nid = "pa-1"\nvirtual_asset_ids = ["va-9"]\n', ("", ""), "va-9"),
        (_VALID_ASSET, ("", ""), "more than once"),
    ],
)
def test_load_organisation_rejects_invalid_config(tmp_path, extra, replace, message):
    text = _VALID_HEADER + _VALID_ASSET.replace(*replace) + extra
    with pytest.raises(ConfigError, match=message):
        load_organisation(_write_config(tmp_path, text))


def test_load_organisation_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_organisation(tmp_path / "missing.toml")


def test_synthetic_organisation_shape():
    organisation = synthetic_organisation(200, seed=3)
    again = synthetic_organisation(200, seed=3)
    assets = organisation.virtual_assets
    durations_h = [asset.energy_kwh / asset.power_kw for asset in assets]

    assert organisation == again
    assert len(assets) == 200
    assert len({asset.id for asset in assets}) == 200
    assert len(organisation.portfolios()) == 40
    assert len(organisation.members("fleet", next(iter(organisation.fleets)))) == 200
    assert [len(ids) for ids in organisation.physical_assets.values()] == [100, 100]
    assert all(1000 <= asset.power_kw <= 50000 for asset in assets)
    assert all(1.0 <= hours <= 2.0 for hours in durations_h)
    assert all(asset.start == date(2024, 1, 1) and asset.end == date(2031, 1, 1) for asset in assets)


# Market parameters.


def test_market_parameters_name_their_sources():
    parameters = json.loads(DEFAULT_PARAMETERS_PATH.read_text(encoding="utf-8"))
    entries = {name: value for name, value in parameters.items() if isinstance(value, dict)}

    assert len(entries) == 5
    for name, entry in entries.items():
        assert entry["source_files"], name
        assert entry["method"], name


_MARKET_DIR = Path(os.environ.get("TERRALAYR_MARKET_DATA_DIR", PROJECT_ROOT.parent / "shared" / "data" / "market"))


@pytest.mark.skipif(not _MARKET_DIR.is_dir(), reason="raw market files are not on this machine")
def test_derive_parameters_reproduces_committed_json():
    committed = json.loads(DEFAULT_PARAMETERS_PATH.read_text(encoding="utf-8"))

    assert derive_parameters(_MARKET_DIR) == committed
