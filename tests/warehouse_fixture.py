"""Build a small warehouse in DuckDB whose data follows every rule the SQL checks verify.

The 15-minute values of each virtual asset are random, from a fixed seed. Every other value
is derived from them with the rules of ``terralayr_etl.categories``, computed here with polars
and independently of the SQL models. Aggregates (a portfolio and a physical asset) come from
their active members, hourly and daily values from each entity's 15-minute values, and daily
revenue buckets from the daily values. The tables have exactly the columns the warehouse
creates.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import duckdb
import numpy as np
import polars as pl

from terralayr_etl.categories import CATEGORIES, CATEGORY_NAMES, DAYS_PER_YEAR
from terralayr_etl.timeutil import day_range, local_midnight
from terralayr_etl.warehouse_sql import DATAPOINTS_COLUMNS_SQL

RUN_ID = "fixture-run"
FETCHED_AT = datetime(2024, 11, 1, 3, 30, tzinfo=UTC)
PORTFOLIO_ID = "portfolio-1"
PHYSICAL_ASSET_ID = "physical-asset-1"
FIRST_DAY = date(2024, 10, 26)
END_DAY = date(2024, 10, 29)
"""The default data covers the local days 2024-10-26 to 2024-10-28. 2024-10-27 has 100 quarter-hours."""

BUCKET_PRODUCTS = {
    "wholesale": ("revenue_wholesale",),
    "ancillary": ("revenue_fcr", "revenue_afrr_capacity", "revenue_afrr_energy"),
    "tolling": ("revenue_tolling",),
    "vba": ("revenue_vba",),
}


@dataclass(frozen=True)
class FixtureVirtualAsset:
    """A virtual asset of the fixture with the lifetime [start_day, end_day) in local days."""

    virtual_asset_id: str
    portfolio_id: str
    rated_charge_power_mw: float
    rated_discharge_power_mw: float
    start_day: date
    end_day: date
    annual_price_tolling_eur_per_mw: float | None = None
    hurdle_price_vba_eur: float | None = None

    @property
    def capacity_mw(self) -> float:
        return (self.rated_charge_power_mw + self.rated_discharge_power_mw) / 2


VIRTUAL_ASSETS = (
    FixtureVirtualAsset("va-a", PORTFOLIO_ID, 1.0, 1.0, date(2024, 1, 1), date(2031, 1, 1)),
    FixtureVirtualAsset(
        "va-b",
        PORTFOLIO_ID,
        2.5,
        2.0,
        date(2024, 1, 1),
        date(2031, 1, 1),
        annual_price_tolling_eur_per_mw=95_000.0,
        hurdle_price_vba_eur=180.0,
    ),
    # Starts inside the default window, so the aggregates gain a member on 2024-10-27.
    FixtureVirtualAsset(
        "va-c", PORTFOLIO_ID, 5.0, 5.0, date(2024, 10, 27), date(2031, 1, 1), hurdle_price_vba_eur=950.0
    ),
)
PHYSICAL_ASSETS = {PHYSICAL_ASSET_ID: ("va-a", "va-c")}

SCHEMA = f"""
create table if not exists datapoints {DATAPOINTS_COLUMNS_SQL};
create table if not exists revenue_buckets (
    entity_id varchar, product varchar, bucket_start timestamptz, bucket_end timestamptz,
    revenue_eur double, currency varchar, run_id varchar, fetched_at timestamptz, endpoint varchar,
    primary key (entity_id, product, bucket_start)
);
create table if not exists virtual_assets (
    virtual_asset_id varchar primary key, portfolio_id varchar, start_at timestamptz,
    end_at timestamptz, rated_charge_power_mw double, rated_discharge_power_mw double,
    energy_capacity_mwh double, charge_efficiency double, discharge_efficiency double,
    delivery_zone varchar, raw_json varchar
);
create table if not exists entity_members (entity_type varchar, entity_id varchar, virtual_asset_id varchar);
"""


def create_schema(connection: duckdb.DuckDBPyConnection) -> None:
    """Create the warehouse tables the SQL models read, with the warehouse's columns."""
    connection.execute("set TimeZone = 'UTC'")
    connection.execute(SCHEMA)


def build_warehouse(
    connection: duckdb.DuckDBPyConnection,
    *,
    first_day: date = FIRST_DAY,
    end_day: date = END_DAY,
    virtual_assets: tuple[FixtureVirtualAsset, ...] = VIRTUAL_ASSETS,
    physical_assets: dict[str, tuple[str, ...]] = PHYSICAL_ASSETS,
    seed: int = 20241026,
) -> None:
    """Fill the warehouse tables for the local days ``[first_day, end_day)``."""
    create_schema(connection)
    periods = pl.datetime_range(
        local_midnight(first_day),
        local_midnight(end_day),
        "15m",
        closed="left",
        time_unit="us",
        time_zone="UTC",
        eager=True,
    )

    quarter_hours: dict[tuple[str, str], pl.DataFrame] = {}
    for index, asset in enumerate(virtual_assets):
        rng = np.random.default_rng([seed, index])
        frame = virtual_asset_quarter_hours(asset, periods, rng)
        if frame.height:
            quarter_hours[("virtual_asset", asset.virtual_asset_id)] = frame

    by_id = {asset.virtual_asset_id: asset for asset in virtual_assets}
    aggregates = {("portfolio", portfolio_id): [] for portfolio_id in sorted({a.portfolio_id for a in virtual_assets})}
    for asset in virtual_assets:
        aggregates[("portfolio", asset.portfolio_id)].append(asset)
    for physical_asset_id, member_ids in physical_assets.items():
        aggregates[("physical_asset", physical_asset_id)] = [by_id[member] for member in member_ids]
    for key, members in aggregates.items():
        frame = aggregate_quarter_hours(members, quarter_hours)
        if frame.height:
            quarter_hours[key] = frame

    days = pl.DataFrame(
        {
            "local_day": day_range(first_day, end_day),
            "day_start": [local_midnight(day) for day in day_range(first_day, end_day)],
        },
        schema={"local_day": pl.Date, "day_start": pl.Datetime("us", "UTC")},
    )
    long_frames = []
    bucket_frames = []
    for (entity_type, entity_id), frame in quarter_hours.items():
        hourly = roll_up(frame, pl.col("period_start").dt.truncate("1h"))
        daily = roll_up(frame, _local_day()).join(days, left_on="period_start", right_on="local_day")
        daily = daily.drop("period_start").rename({"day_start": "period_start"})
        for resolution, wide in (("15min", frame), ("hourly", hourly), ("daily", daily)):
            long_frames.append(_to_long(wide, entity_type, entity_id, resolution))
        if entity_type == "virtual_asset":
            bucket_frames.append(_revenue_buckets(daily, entity_id))

    _insert(connection, "datapoints", pl.concat(long_frames))
    _insert(connection, "revenue_buckets", pl.concat(bucket_frames))
    _insert(connection, "virtual_assets", _virtual_asset_rows(virtual_assets))
    _insert(connection, "entity_members", _member_rows(aggregates, virtual_assets))


def virtual_asset_quarter_hours(
    asset: FixtureVirtualAsset, periods: pl.Series, rng: np.random.Generator
) -> pl.DataFrame:
    """Return the asset's 15-minute values inside its lifetime: one column per category."""
    active = periods.filter(
        (periods >= local_midnight(asset.start_day)) & (periods < local_midnight(asset.end_day))
    )
    n = active.len()
    capacity_mw = asset.capacity_mw

    def traded(probability: float, high: float) -> np.ndarray:
        return np.where(rng.random(n) < probability, rng.uniform(0.0, high, n), 0.0)

    def price_where(volume: np.ndarray, low: float, high: float) -> np.ndarray:
        return np.where(volume > 0, rng.uniform(low, high, n), np.nan)

    buy_volume = traded(0.4, 0.25 * asset.rated_charge_power_mw)
    sell_volume = traded(0.4, 0.25 * asset.rated_discharge_power_mw)
    buy_vwap = price_where(buy_volume, 20.0, 120.0)
    sell_vwap = price_where(sell_volume, 40.0, 200.0)

    capacity_fcr = np.where(rng.random(n) < 0.3, 0.0, rng.uniform(0.0, 0.5 * capacity_mw, n))
    price_fcr = rng.uniform(5.0, 20.0, n)
    delivery_hours = np.full(n, 0.25)

    volume_pos = traded(0.5, 0.1 * capacity_mw)
    volume_neg = traded(0.5, 0.1 * capacity_mw)
    price_pos = price_where(volume_pos, 50.0, 300.0)
    price_neg = price_where(volume_neg, 20.0, 150.0)

    values = {
        "buy_vwap_wholesale": buy_vwap,
        "sell_vwap_wholesale": sell_vwap,
        "buy_volume_wholesale": buy_volume,
        "sell_volume_wholesale": sell_volume,
        "net_volume_wholesale": sell_volume - buy_volume,
        "net_off_volume_wholesale": np.zeros(n),
        "revenue_wholesale": np.nan_to_num(sell_vwap) * sell_volume - np.nan_to_num(buy_vwap) * buy_volume,
        "revenue_fcr": capacity_fcr * price_fcr * delivery_hours,
        "capacity_fcr": capacity_fcr,
        "settlement_price_fcr": price_fcr,
        "weighted_capacity_fcr": capacity_fcr * delivery_hours,
        "weighted_settlement_price_fcr": price_fcr * delivery_hours,
        "delivery_hours_fcr": delivery_hours,
        "capacity_fcr_weighted_avg": capacity_fcr,
        "settlement_price_fcr_weighted_avg": np.where(capacity_fcr > 0, price_fcr, np.nan),
        "revenue_afrr_capacity": rng.uniform(0.0, 3.0, n),
        "revenue_afrr_energy_pos": volume_pos * np.nan_to_num(price_pos),
        "revenue_afrr_energy_neg": -volume_neg * np.nan_to_num(price_neg),
        "settlement_price_afrr_energy_pos": price_pos,
        "settlement_price_afrr_energy_neg": price_neg,
        "total_volume_afrr_energy_pos": volume_pos,
        "total_volume_afrr_energy_neg": volume_neg,
    }
    values["revenue_afrr_energy"] = values["revenue_afrr_energy_pos"] + values["revenue_afrr_energy_neg"]

    tolling_price = asset.annual_price_tolling_eur_per_mw
    values["annual_price_tolling"] = np.full(n, np.nan if tolling_price is None else tolling_price)
    values["revenue_tolling"] = np.full(n, 0.0 if tolling_price is None else tolling_price * capacity_mw * 0.25 / 8760)
    hurdle = asset.hurdle_price_vba_eur
    values["hurdle_price_vba"] = np.full(n, np.nan if hurdle is None else hurdle)
    values["revenue_vba"] = np.zeros(n) if hurdle is None else hurdle / 96 * rng.uniform(0.8, 1.5, n)
    values["revenue_total_revenue"] = (
        values["revenue_wholesale"]
        + values["revenue_fcr"]
        + values["revenue_afrr_capacity"]
        + values["revenue_afrr_energy"]
        + values["revenue_tolling"]
        + values["revenue_vba"]
    )

    frame = pl.DataFrame({"period_start": active}).with_columns(
        pl.Series(name, values[name], dtype=pl.Float64, nan_to_null=True)
        for name in CATEGORY_NAMES
        if CATEGORIES[name].over_entities != "normalised"
    )
    return frame.with_columns(_normalised(pl.lit(capacity_mw)))


def aggregate_quarter_hours(
    members: list[FixtureVirtualAsset], quarter_hours: dict[tuple[str, str], pl.DataFrame]
) -> pl.DataFrame:
    """Apply the over_entities rules to the members' 15-minute values, period by period.

    A member frame holds only periods inside its lifetime, so each period aggregates exactly
    the members active in it.
    """
    member_frames = [
        quarter_hours[("virtual_asset", member.virtual_asset_id)].with_columns(capacity_mw=pl.lit(member.capacity_mw))
        for member in members
        if ("virtual_asset", member.virtual_asset_id) in quarter_hours
    ]
    if not member_frames:
        return pl.DataFrame()

    expressions = [pl.col("capacity_mw").sum()]
    for name in CATEGORY_NAMES:
        rule = CATEGORIES[name]
        if rule.over_entities == "sum":
            expressions.append(_sum_or_null(name))
        elif rule.over_entities == "max":
            expressions.append(pl.col(name).max())
        elif rule.over_entities == "mean":
            expressions.append(pl.col(name).mean())
        elif rule.over_entities == "weighted":
            expressions.append(_weighted_mean(name, rule.weight))
        elif rule.over_entities == "capacity_weighted":
            expressions.append(_weighted_mean(name, "capacity_mw"))
        elif rule.over_entities == "net_off":
            bought = pl.col("buy_volume_wholesale").sum()
            sold = pl.col("sell_volume_wholesale").sum()
            expressions.append(pl.min_horizontal(bought, sold).alias(name))

    combined = pl.concat(member_frames).group_by("period_start").agg(expressions).sort("period_start")
    return combined.with_columns(_normalised(pl.col("capacity_mw"))).select(["period_start", *CATEGORY_NAMES])


def roll_up(frame: pl.DataFrame, period: pl.Expr) -> pl.DataFrame:
    """Apply the over_time rules to 15-minute values grouped by ``period``."""
    expressions = []
    for name in CATEGORY_NAMES:
        rule = CATEGORIES[name]
        if rule.over_time == "sum":
            expressions.append(_sum_or_null(name))
        elif rule.over_time == "mean":
            expressions.append(pl.col(name).mean())
        elif rule.over_time == "weighted":
            expressions.append(_weighted_mean(name, rule.weight))
    return frame.group_by(period.alias("period_start")).agg(expressions).sort("period_start")


def _local_day() -> pl.Expr:
    # The Europe/Berlin delivery day of a UTC period start.
    return pl.col("period_start").dt.convert_time_zone("Europe/Berlin").dt.date()


def _sum_or_null(name: str) -> pl.Expr:
    return pl.when(pl.col(name).is_not_null().any()).then(pl.col(name).sum()).alias(name)


def _weighted_mean(name: str, weight: str) -> pl.Expr:
    pairs = pl.col(name).is_not_null() & pl.col(weight).is_not_null()
    weight_sum = pl.col(weight).filter(pairs).sum()
    return pl.when(weight_sum != 0).then((pl.col(name) * pl.col(weight)).filter(pairs).sum() / weight_sum).alias(name)


def _normalised(capacity_mw: pl.Expr) -> list[pl.Expr]:
    expressions = []
    for name in CATEGORY_NAMES:
        rule = CATEGORIES[name]
        if rule.over_entities == "normalised":
            factor = DAYS_PER_YEAR if rule.per_year else 1
            expressions.append((pl.col(rule.revenue) / capacity_mw * factor).alias(name))
    return expressions


def _to_long(wide: pl.DataFrame, entity_type: str, entity_id: str, resolution: str) -> pl.DataFrame:
    units = {name: CATEGORIES[name].unit for name in CATEGORY_NAMES}
    long = wide.select(["period_start", *CATEGORY_NAMES]).unpivot(
        index="period_start", variable_name="category", value_name="value"
    )
    return long.select(
        entity_type=pl.lit(entity_type),
        entity_id=pl.lit(entity_id),
        resolution=pl.lit(resolution),
        category=pl.col("category"),
        period_start=pl.col("period_start"),
        value=pl.col("value"),
        unit=pl.col("category").replace_strict(units),
        run_id=pl.lit(RUN_ID),
        fetched_at=pl.lit(FETCHED_AT),
    )


def _revenue_buckets(daily: pl.DataFrame, virtual_asset_id: str) -> pl.DataFrame:
    # A bucket ends at the next local midnight. Adding "1d" in Europe/Berlin time keeps 23-
    # and 25-hour days.
    bucket_end = pl.col("period_start").dt.convert_time_zone("Europe/Berlin").dt.offset_by("1d")
    frames = []
    for product, categories in BUCKET_PRODUCTS.items():
        frames.append(
            daily.select(
                entity_id=pl.lit(virtual_asset_id),
                product=pl.lit(product),
                bucket_start=pl.col("period_start"),
                bucket_end=bucket_end.dt.convert_time_zone("UTC"),
                revenue_eur=pl.sum_horizontal(categories),
                currency=pl.lit("EUR"),
                run_id=pl.lit(RUN_ID),
                fetched_at=pl.lit(FETCHED_AT),
                endpoint=pl.lit(f"/fixture/{virtual_asset_id}/{product}"),
            )
        )
    return pl.concat(frames)


def _virtual_asset_rows(virtual_assets: tuple[FixtureVirtualAsset, ...]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "virtual_asset_id": [a.virtual_asset_id for a in virtual_assets],
            "portfolio_id": [a.portfolio_id for a in virtual_assets],
            "start_at": [local_midnight(a.start_day) for a in virtual_assets],
            "end_at": [local_midnight(a.end_day) for a in virtual_assets],
            "rated_charge_power_mw": [a.rated_charge_power_mw for a in virtual_assets],
            "rated_discharge_power_mw": [a.rated_discharge_power_mw for a in virtual_assets],
            "energy_capacity_mwh": [2 * a.capacity_mw for a in virtual_assets],
            "charge_efficiency": [0.943] * len(virtual_assets),
            "discharge_efficiency": [0.943] * len(virtual_assets),
            "delivery_zone": ["50Hertz"] * len(virtual_assets),
            "raw_json": ["{}"] * len(virtual_assets),
        }
    )


def _member_rows(
    aggregates: dict[tuple[str, str], list[FixtureVirtualAsset]], virtual_assets: tuple[FixtureVirtualAsset, ...]
) -> pl.DataFrame:
    rows = [("virtual_asset", a.virtual_asset_id, a.virtual_asset_id) for a in virtual_assets]
    for (entity_type, entity_id), members in aggregates.items():
        rows.extend((entity_type, entity_id, member.virtual_asset_id) for member in members)
    return pl.DataFrame(rows, schema=["entity_type", "entity_id", "virtual_asset_id"], orient="row")


def _insert(connection: duckdb.DuckDBPyConnection, table: str, frame: pl.DataFrame) -> None:
    connection.register("fixture_rows", frame.to_arrow())
    try:
        connection.execute(f"insert into {table} by name select * from fixture_rows")
    finally:
        connection.unregister("fixture_rows")
