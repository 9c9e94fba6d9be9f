"""The 15-minute values of a virtual asset on a local day, from its market day and its seed.

A batch of (virtual asset, day) pairs is generated at once: the reserve shares, the wholesale
dispatch and every product's volumes and prices, vectorised across the batch. The random
draws of a pair come from a generator seeded with (seed, virtual asset id, day).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from terralayr_etl.sandbox.dispatch import QUARTER_HOUR_H, dispatch_days
from terralayr_etl.sandbox.market import EFA_BLOCK_COUNT, MAX_QUARTER_HOURS, MarketDay, day_rng
from terralayr_etl.sandbox.organisation import DAILY_CYCLE_LIMIT, END_STATE_OF_CHARGE_PERCENTAGE, VirtualAssetSpec
from terralayr_etl.units import kw_to_mw

HOURS_PER_YEAR = 8760.0

FCR_IDLE_PROBABILITY = 0.35
"""Chance that an asset offers no FCR in an EFA block."""
FCR_SHARE_RANGE = (0.05, 0.30)
"""Share of the rated power reserved for FCR in a block where it takes part."""
AFRR_IDLE_PROBABILITY = 0.40
AFRR_SHARE_RANGE = (0.05, 0.25)
DAY_AHEAD_SHARE_RANGE = (0.5, 0.9)
"""Share of a quarter-hour's traded volume bought or sold in the day-ahead auction, the rest intraday."""
VBA_UPLIFT_RANGE = (1.0, 1.25)
"""Daily auction revenue as a multiple of the hurdle price."""


@dataclass(frozen=True, slots=True)
class AssetDay:
    """The generated quarter-hour values of one virtual asset on one local day.

    Every array has one value per quarter-hour of the day (92, 96 or 100). NaN marks a
    price without volume, which the data points report as null.
    """

    buy_volume_mwh: np.ndarray
    sell_volume_mwh: np.ndarray
    buy_vwap_eur_per_mwh: np.ndarray
    sell_vwap_eur_per_mwh: np.ndarray
    capacity_fcr_mw: np.ndarray
    settlement_price_fcr_eur_per_mw_h: np.ndarray
    revenue_afrr_capacity_eur: np.ndarray
    volume_afrr_energy_pos_mwh: np.ndarray
    volume_afrr_energy_neg_mwh: np.ndarray
    price_afrr_energy_pos_eur_per_mwh: np.ndarray
    price_afrr_energy_neg_eur_per_mwh: np.ndarray
    revenue_tolling_eur: np.ndarray
    revenue_vba_eur: np.ndarray


@dataclass(frozen=True)
class _AssetDraws:
    """The seeded choices of one asset-day, with shares per EFA block."""

    fcr_share: np.ndarray
    afrr_pos_share: np.ndarray
    afrr_neg_share: np.ndarray
    day_ahead_share_buy: float
    day_ahead_share_sell: float
    vba_uplift: float


def _draw(seed: int, asset: VirtualAssetSpec, market_day: MarketDay) -> _AssetDraws:
    rng = day_rng(seed, asset.id, market_day.day)
    fcr_idle = rng.random(EFA_BLOCK_COUNT) < FCR_IDLE_PROBABILITY
    fcr_share = np.where(fcr_idle, 0.0, rng.uniform(*FCR_SHARE_RANGE, EFA_BLOCK_COUNT))
    pos_idle = rng.random(EFA_BLOCK_COUNT) < AFRR_IDLE_PROBABILITY
    pos_share = np.where(pos_idle, 0.0, rng.uniform(*AFRR_SHARE_RANGE, EFA_BLOCK_COUNT))
    neg_idle = rng.random(EFA_BLOCK_COUNT) < AFRR_IDLE_PROBABILITY
    neg_share = np.where(neg_idle, 0.0, rng.uniform(*AFRR_SHARE_RANGE, EFA_BLOCK_COUNT))
    day_ahead_buy, day_ahead_sell = rng.uniform(*DAY_AHEAD_SHARE_RANGE, 2)
    return _AssetDraws(
        fcr_share=fcr_share,
        afrr_pos_share=pos_share,
        afrr_neg_share=neg_share,
        day_ahead_share_buy=float(day_ahead_buy),
        day_ahead_share_sell=float(day_ahead_sell),
        vba_uplift=float(rng.uniform(*VBA_UPLIFT_RANGE)),
    )


def _padded(values: Sequence[np.ndarray], fill: float) -> np.ndarray:
    out = np.full((len(values), MAX_QUARTER_HOURS), fill)
    for row, array in enumerate(values):
        out[row, : len(array)] = array
    return out


def generate_asset_days(seed: int, pairs: Sequence[tuple[VirtualAssetSpec, MarketDay]]) -> list[AssetDay]:
    """Generate the quarter-hour values of every (virtual asset, market day) pair, in order."""
    if not pairs:
        return []
    assets = [asset for asset, _ in pairs]
    market_days = [market_day for _, market_day in pairs]
    draws = [_draw(seed, asset, market_day) for asset, market_day in pairs]

    # Reserved MW per quarter-hour: each asset's block share times its capacity in MW.
    power_mw = kw_to_mw(np.array([asset.power_kw for asset in assets]))
    capacity_mw = np.array([asset.capacity_mw() for asset in assets])
    blocks = _padded([day.efa_block for day in market_days], 0).astype(np.int64)
    fcr_mw = np.take_along_axis(np.stack([d.fcr_share for d in draws]), blocks, axis=1) * capacity_mw[:, None]
    pos_mw = np.take_along_axis(np.stack([d.afrr_pos_share for d in draws]), blocks, axis=1) * capacity_mw[:, None]
    neg_mw = np.take_along_axis(np.stack([d.afrr_neg_share for d in draws]), blocks, axis=1) * capacity_mw[:, None]

    # FCR is symmetric, so it holds back both directions. aFRR up limits discharging and
    # aFRR down limits charging.
    day_ahead = _padded([day.day_ahead_eur_per_mwh for day in market_days], np.nan)
    is_step = ~np.isnan(day_ahead)
    charge_mw = np.where(is_step, power_mw[:, None] - fcr_mw - neg_mw, 0.0)
    discharge_mw = np.where(is_step, power_mw[:, None] - fcr_mw - pos_mw, 0.0)
    # NOTE: reserves hold back power only. The energy of aFRR activations is settled but does
    # not enter the state of charge of the wholesale dispatch.
    result = dispatch_days(
        day_ahead,
        charge_mw,
        discharge_mw,
        np.array([asset.energy_mwh() for asset in assets]),
        np.array([asset.charge_efficiency for asset in assets]),
        np.array([asset.discharge_efficiency for asset in assets]),
        start_soc_fraction=END_STATE_OF_CHARGE_PERCENTAGE / 100.0,
        daily_cycle_limit=DAILY_CYCLE_LIMIT,
    )

    intraday = _padded([day.intraday_eur_per_mwh for day in market_days], np.nan)
    share_buy = np.array([d.day_ahead_share_buy for d in draws])[:, None]
    share_sell = np.array([d.day_ahead_share_sell for d in draws])[:, None]
    buy_vwap = np.where(result.buy_mwh > 0, share_buy * day_ahead + (1 - share_buy) * intraday, np.nan)
    sell_vwap = np.where(result.sell_mwh > 0, share_sell * day_ahead + (1 - share_sell) * intraday, np.nan)

    return [
        _asset_day(asset, market_day, draw, row, result.buy_mwh, result.sell_mwh, buy_vwap, sell_vwap, fcr_mw, pos_mw, neg_mw)
        for row, (asset, market_day, draw) in enumerate(zip(assets, market_days, draws, strict=True))
    ]


def _asset_day(
    asset: VirtualAssetSpec,
    market_day: MarketDay,
    draw: _AssetDraws,
    row: int,
    buy: np.ndarray,
    sell: np.ndarray,
    buy_vwap: np.ndarray,
    sell_vwap: np.ndarray,
    fcr_mw: np.ndarray,
    pos_mw: np.ndarray,
    neg_mw: np.ndarray,
) -> AssetDay:
    """Cut one row of the batch to the day's length and add the products priced per asset."""
    # Copies, so a cached day does not keep the whole batch in memory.
    count = market_day.quarter_hours
    block = market_day.efa_block
    fcr = fcr_mw[row, :count].copy()
    pos = pos_mw[row, :count].copy()
    neg = neg_mw[row, :count].copy()

    capacity_price_pos = market_day.afrr_capacity_price_pos_eur_per_mw_h[block]
    capacity_price_neg = market_day.afrr_capacity_price_neg_eur_per_mw_h[block]
    revenue_afrr_capacity = (pos * capacity_price_pos + neg * capacity_price_neg) * QUARTER_HOUR_H

    volume_pos = pos * QUARTER_HOUR_H * market_day.afrr_activated_share_pos
    volume_neg = neg * QUARTER_HOUR_H * market_day.afrr_activated_share_neg
    price_pos = np.where(volume_pos > 0, market_day.afrr_energy_price_pos_eur_per_mwh, np.nan)
    price_neg = np.where(volume_neg > 0, market_day.afrr_energy_price_neg_eur_per_mwh, np.nan)

    tolling = asset.tolling_annual_price_eur_per_mw * asset.capacity_mw() * QUARTER_HOUR_H / HOURS_PER_YEAR
    # The day's auction revenue is spread evenly, so a DST day earns the same per day.
    vba = asset.vba_hurdle_price_eur * draw.vba_uplift / count

    return AssetDay(
        buy_volume_mwh=buy[row, :count].copy(),
        sell_volume_mwh=sell[row, :count].copy(),
        buy_vwap_eur_per_mwh=buy_vwap[row, :count].copy(),
        sell_vwap_eur_per_mwh=sell_vwap[row, :count].copy(),
        capacity_fcr_mw=fcr,
        settlement_price_fcr_eur_per_mw_h=market_day.fcr_price_eur_per_mw_h[block],
        revenue_afrr_capacity_eur=revenue_afrr_capacity,
        volume_afrr_energy_pos_mwh=volume_pos,
        volume_afrr_energy_neg_mwh=volume_neg,
        price_afrr_energy_pos_eur_per_mwh=price_pos,
        price_afrr_energy_neg_eur_per_mwh=price_neg,
        revenue_tolling_eur=np.full(count, tolling),
        revenue_vba_eur=np.full(count, vba),
    )
