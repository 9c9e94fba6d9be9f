"""Aggregation of 15-minute category frames across entities and over time.

Both follow the rules of ``terralayr_etl.categories``: an aggregate's 15-minute values come
from its active members' 15-minute values (``over_entities``), and hourly and daily values
come from the entity's own 15-minute values (``over_time``).
"""

from __future__ import annotations

import polars as pl

from terralayr_etl.categories import CATEGORIES, CATEGORY_NAMES, DAYS_PER_YEAR, Category
from terralayr_etl.sandbox.frames import CAPACITY_MW, DAY_START, PERIOD_START


def _weighted_mean(value: str, weight: str) -> pl.Expr:
    """Weighted mean over the rows that have a value; null when their weights sum to 0."""
    numerator = (pl.col(value) * pl.col(weight)).sum()
    denominator = pl.col(weight).filter(pl.col(value).is_not_null()).sum()
    return pl.when(denominator != 0).then(numerator / denominator)


def _over_entities(category: Category) -> pl.Expr:
    rule = category.over_entities
    name = category.name
    if rule == "sum":
        return pl.col(name).sum()
    if rule == "weighted":
        return _weighted_mean(name, category.weight)
    if rule == "max":
        return pl.col(name).max()
    if rule == "mean":
        return pl.col(name).mean()
    if rule == "capacity_weighted":
        return _weighted_mean(name, CAPACITY_MW)
    if rule == "net_off":
        return pl.min_horizontal(pl.col("buy_volume_wholesale").sum(), pl.col("sell_volume_wholesale").sum())
    raise ValueError(f"category {name} has the unknown over_entities rule {rule!r}")


def _over_time(category: Category) -> pl.Expr:
    rule = category.over_time
    name = category.name
    if rule == "sum":
        return pl.col(name).sum()
    if rule == "weighted":
        return _weighted_mean(name, category.weight)
    if rule == "mean":
        return pl.col(name).mean()
    raise ValueError(f"category {name} has the unknown over_time rule {rule!r}")


def _normalised_columns() -> list[pl.Expr]:
    expressions = []
    for name, category in CATEGORIES.items():
        if category.over_entities != "normalised":
            continue
        per_mw = pl.col(category.revenue) / pl.col(CAPACITY_MW)
        expressions.append((per_mw * DAYS_PER_YEAR if category.per_year else per_mw).alias(name))
    return expressions


def combine_entities(stacked: pl.DataFrame) -> pl.DataFrame:
    """Aggregate the stacked 15-minute rows of an entity's active members into the entity's frame.

    A period is reported when at least one member has a row for it. Normalised categories are
    recomputed from the aggregate revenue and the summed capacity of the members in the period.
    """
    aggregations = [pl.col(DAY_START).first(), pl.col(CAPACITY_MW).sum()]
    aggregations.extend(
        _over_entities(category).alias(name)
        for name, category in CATEGORIES.items()
        if category.over_entities != "normalised"
    )
    combined = stacked.group_by(PERIOD_START).agg(aggregations)
    return combined.with_columns(_normalised_columns()).select(PERIOD_START, DAY_START, CAPACITY_MW, *CATEGORY_NAMES).sort(
        PERIOD_START
    )


def roll_up(frame: pl.DataFrame, resolution: str) -> pl.DataFrame:
    """Aggregate a 15-minute frame to ``resolution`` with each category's over-time rule.

    Hourly periods start on UTC hours. Daily periods are Europe/Berlin delivery days that start
    at ``_day_start``, the local midnight in UTC.
    """
    if resolution in ("raw", "15min"):
        return frame
    if resolution == "hourly":
        key = pl.col(PERIOD_START).dt.truncate("1h")
    elif resolution == "daily":
        key = pl.col(DAY_START)
    else:
        raise ValueError(f"unknown resolution {resolution!r}; use raw, 15min, hourly or daily")

    aggregations = [pl.col(DAY_START).first(), pl.col(CAPACITY_MW).first()]
    aggregations.extend(_over_time(category).alias(name) for name, category in CATEGORIES.items())
    rolled = frame.group_by(key.alias("_period")).agg(aggregations)
    return (
        rolled.rename({"_period": PERIOD_START})
        .select(PERIOD_START, DAY_START, CAPACITY_MW, *CATEGORY_NAMES)
        .sort(PERIOD_START)
    )
