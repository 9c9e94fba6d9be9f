"""The 15-minute category frame of virtual-asset days, built from their generated values.

Every documented category is derived here from the generated volumes and prices with the
per-period definitions of the API: revenue identities, FCR weighted figures, normalised
revenue. Aggregates and coarser resolutions are derived from these frames in ``aggregate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from terralayr_etl.categories import CATEGORIES, CATEGORY_NAMES, DAYS_PER_YEAR
from terralayr_etl.sandbox.asset_days import AssetDay
from terralayr_etl.sandbox.dispatch import QUARTER_HOUR_H
from terralayr_etl.sandbox.market import MarketDay
from terralayr_etl.sandbox.organisation import VirtualAssetSpec

PERIOD_START = "period_start"
DAY_START = "_day_start"
"""Helper column: the UTC instant of local midnight that starts the period's delivery day."""
CAPACITY_MW = "_capacity_mw"
"""Helper column: the rated capacity in MW that reports the row (a sum for aggregates)."""

UTC_DATETIME = pl.Datetime("us", "UTC")
_QUARTER_HOUR_US = 15 * 60 * 1_000_000


def empty_frame() -> pl.DataFrame:
    """Return a frame with the data-point columns and no rows."""
    schema = {PERIOD_START: UTC_DATETIME, DAY_START: UTC_DATETIME, CAPACITY_MW: pl.Float64}
    schema.update({name: pl.Float64 for name in CATEGORY_NAMES})
    return pl.DataFrame(schema=schema)


def _epoch_us(market_day: MarketDay) -> int:
    return int(market_day.start_utc.timestamp()) * 1_000_000


def _joined(rows: Sequence[tuple[VirtualAssetSpec, MarketDay, AssetDay]], field: str) -> np.ndarray:
    return np.concatenate([getattr(asset_day, field) for _, _, asset_day in rows])


def _repeat_per_row(values: list[float], counts: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.float64), counts)


def quarter_hour_frame(rows: Sequence[tuple[VirtualAssetSpec, MarketDay, AssetDay]]) -> pl.DataFrame:
    """Build the 15-minute frame of virtual-asset days, stacked in the order given.

    Each entry is one virtual asset on one local day. Columns: ``period_start``, the helper
    columns ``_day_start`` and ``_capacity_mw``, and one Float64 column per documented
    category (null where the API reports no value). Rows of one asset in ascending day order
    come out sorted by period; several assets' rows are for ``aggregate.combine_entities``.
    """
    if not rows:
        return empty_frame()

    counts = np.array([market_day.quarter_hours for _, market_day, _ in rows])
    day_us = np.repeat(np.array([_epoch_us(market_day) for _, market_day, _ in rows], dtype=np.int64), counts)
    quarter_index = np.arange(counts.sum(), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    period_us = day_us + quarter_index * _QUARTER_HOUR_US
    count = len(period_us)
    capacity_mw = _repeat_per_row([asset.capacity_mw() for asset, _, _ in rows], counts)
    # A contract price of 0 means the asset has no such contract, which the API reports as null.
    tolling_price = _repeat_per_row([asset.tolling_annual_price_eur_per_mw or np.nan for asset, _, _ in rows], counts)
    hurdle_price = _repeat_per_row([asset.vba_hurdle_price_eur or np.nan for asset, _, _ in rows], counts)

    buy = _joined(rows, "buy_volume_mwh")
    sell = _joined(rows, "sell_volume_mwh")
    buy_vwap = _joined(rows, "buy_vwap_eur_per_mwh")
    sell_vwap = _joined(rows, "sell_vwap_eur_per_mwh")
    capacity_fcr = _joined(rows, "capacity_fcr_mw")
    price_fcr = _joined(rows, "settlement_price_fcr_eur_per_mw_h")
    volume_pos = _joined(rows, "volume_afrr_energy_pos_mwh")
    volume_neg = _joined(rows, "volume_afrr_energy_neg_mwh")
    price_pos = _joined(rows, "price_afrr_energy_pos_eur_per_mwh")
    price_neg = _joined(rows, "price_afrr_energy_neg_eur_per_mwh")

    # A null VWAP or price belongs to a zero volume and contributes 0 EUR.
    revenue = {
        "wholesale": np.nan_to_num(sell_vwap) * sell - np.nan_to_num(buy_vwap) * buy,
        "fcr": capacity_fcr * price_fcr * QUARTER_HOUR_H,
        "afrr_capacity": _joined(rows, "revenue_afrr_capacity_eur"),
        "afrr_energy_pos": volume_pos * np.nan_to_num(price_pos),
        # 0.0 - price keeps a zero revenue at +0.0 instead of -0.0.
        "afrr_energy_neg": volume_neg * (0.0 - np.nan_to_num(price_neg)),
        "tolling": _joined(rows, "revenue_tolling_eur"),
        "vba": _joined(rows, "revenue_vba_eur"),
    }
    revenue["afrr_energy"] = revenue["afrr_energy_pos"] + revenue["afrr_energy_neg"]
    revenue["total"] = (
        revenue["wholesale"]
        + revenue["fcr"]
        + revenue["afrr_capacity"]
        + revenue["afrr_energy"]
        + revenue["tolling"]
        + revenue["vba"]
    )

    delivery_hours = np.full(count, QUARTER_HOUR_H)
    values: dict[str, np.ndarray] = {
        "revenue_total_revenue": revenue["total"],
        "revenue_wholesale": revenue["wholesale"],
        "buy_vwap_wholesale": buy_vwap,
        "sell_vwap_wholesale": sell_vwap,
        "buy_volume_wholesale": buy,
        "sell_volume_wholesale": sell,
        "net_volume_wholesale": sell - buy,
        "net_off_volume_wholesale": np.zeros(count),
        "revenue_fcr": revenue["fcr"],
        "capacity_fcr": capacity_fcr,
        "settlement_price_fcr": price_fcr,
        "weighted_capacity_fcr": capacity_fcr * delivery_hours,
        "weighted_settlement_price_fcr": price_fcr * delivery_hours,
        "delivery_hours_fcr": delivery_hours,
        "capacity_fcr_weighted_avg": capacity_fcr,
        # The weight of this average is weighted_capacity_fcr, which is 0 without FCR capacity.
        "settlement_price_fcr_weighted_avg": np.where(capacity_fcr > 0, price_fcr, np.nan),
        "revenue_afrr_capacity": revenue["afrr_capacity"],
        "revenue_afrr_energy": revenue["afrr_energy"],
        "revenue_afrr_energy_pos": revenue["afrr_energy_pos"],
        "revenue_afrr_energy_neg": revenue["afrr_energy_neg"],
        "settlement_price_afrr_energy_pos": price_pos,
        "settlement_price_afrr_energy_neg": price_neg,
        "total_volume_afrr_energy_pos": volume_pos,
        "total_volume_afrr_energy_neg": volume_neg,
        "revenue_tolling": revenue["tolling"],
        "annual_price_tolling": tolling_price,
        "revenue_vba": revenue["vba"],
        "hurdle_price_vba": hurdle_price,
    }
    for name, category in CATEGORIES.items():
        if category.revenue is None:
            continue
        per_mw = values[category.revenue] / capacity_mw
        values[name] = per_mw * DAYS_PER_YEAR if category.per_year else per_mw

    data = {PERIOD_START: period_us, DAY_START: day_us, CAPACITY_MW: capacity_mw}
    data.update((name, values[name]) for name in CATEGORY_NAMES)
    frame = pl.DataFrame(data, nan_to_null=True)
    return frame.with_columns(
        pl.col(PERIOD_START, DAY_START).cast(pl.Datetime("us")).dt.replace_time_zone("UTC"),
        pl.col(CATEGORY_NAMES).cast(pl.Float64),
    )
