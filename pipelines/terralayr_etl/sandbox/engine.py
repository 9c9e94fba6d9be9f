"""The sandbox's data engine: data points and revenue buckets for any entity and range.

The engine generates each virtual asset's 15-minute values per local delivery day, caches
them (least recently used dropped first), and derives aggregates, hourly and daily values
from them with the rules in ``terralayr_etl.categories``. The same seed always gives the
same values, whatever ranges were requested before, unless late corrections (an optional
``Corrections`` hook, set by the sandbox's fault injection) scale the EUR values of some days.

>>> from terralayr_etl.sandbox.organisation import load_organisation
>>> engine = Engine(load_organisation())
>>> frame = engine.datapoints("portfolio", "26b0692a-9e43-5a19-8ddd-ff03e4dabfb6", "daily",
...                           datetime(2024, 10, 20, tzinfo=UTC), datetime(2024, 11, 1, tzinfo=UTC))
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from terralayr_etl.categories import CATEGORIES, CATEGORY_NAMES
from terralayr_etl.config import RESOLUTIONS
from terralayr_etl.sandbox.aggregate import combine_entities, roll_up
from terralayr_etl.sandbox.asset_days import AssetDay, generate_asset_days
from terralayr_etl.sandbox.frames import PERIOD_START, empty_frame, quarter_hour_frame
from terralayr_etl.sandbox.market import Market, MarketDay
from terralayr_etl.sandbox.organisation import Organisation, VirtualAssetSpec
from terralayr_etl.timeutil import day_range, epoch_microseconds, local_day_of, local_midnight

logger = logging.getLogger(__name__)

PRODUCT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "wholesale": ("revenue_wholesale",),
    "ancillary": ("revenue_fcr", "revenue_afrr_capacity", "revenue_afrr_energy"),
    "tolling": ("revenue_tolling",),
    "vba": ("revenue_vba",),
}
"""Revenue-bucket product to the daily categories whose sum is its revenue."""

_PRODUCT_REVENUE_CATEGORIES = tuple(name for names in PRODUCT_CATEGORIES.values() for name in names)

CACHED_REVENUE_WINDOWS = 64
"""Number of (virtual asset, window) daily revenue frames kept for revenue buckets. A client
requests the four products over the same windows, so the cache computes each window once.
Without it, W1's 240 revenue requests took about a quarter of the sandbox's busy samples in a
py-spy profile."""

DEFAULT_CACHE_ASSET_DAYS = 8192
"""Default number of cached (virtual asset, day) entries. An entry holds 13 arrays of at most 100
float64 values, about 11 KB, so a full cache takes an estimated 90 MB."""

EUR_CATEGORIES: tuple[str, ...] = tuple(name for name, category in CATEGORIES.items() if "EUR" in category.unit)
"""Categories denominated in EUR (revenues, VWAPs, prices, normalised revenue), which late
corrections scale. Every rule that derives one of them is linear in EUR values with weights
that are not in EUR, so scaling them at the 15-minute virtual-asset level keeps every identity
and roll-up."""


class Corrections(Protocol):
    """Late corrections of delivery days, applied by the engine before any aggregation."""

    def factors(self, days: Sequence[date]) -> dict[date, float]:
        """Record ``days`` as served and return the factor of each corrected day among them."""
        ...


def _as_utc(instant: datetime, name: str) -> datetime:
    if instant.tzinfo is None:
        raise ValueError(f"{name} {instant.isoformat()} has no time zone; pass a timezone-aware datetime")
    return instant.astimezone(UTC)


class Engine:
    """Generator of the sandbox's data points and revenue buckets for one organisation."""

    def __init__(
        self,
        organisation: Organisation,
        *,
        seed: int | None = None,
        parameters_path: Path | None = None,
        prices_path: Path | None = None,
        cache_asset_days: int = DEFAULT_CACHE_ASSET_DAYS,
        corrections: Corrections | None = None,
    ):
        self.organisation = organisation
        # Corrections scale the values on every request, after the cache, which keeps the
        # uncorrected values and so needs no invalidation when a correction starts.
        self.corrections = corrections
        self.seed = organisation.seed if seed is None else seed
        self.market = Market(self.seed, parameters_path=parameters_path, prices_path=prices_path)
        self._cache: OrderedDict[tuple[str, date], AssetDay] = OrderedDict()
        self._cache_asset_days = cache_asset_days
        self._daily_revenue_cache: OrderedDict[tuple[str, datetime, datetime], pl.DataFrame] = OrderedDict()
        self._lock = threading.Lock()

    def datapoints(
        self, entity_type: str, entity_id: str, resolution: str, start: datetime, end: datetime
    ) -> pl.DataFrame:
        """Return the entity's data points for the periods whose start lies in ``[start, end)``.

        Columns: ``period_start`` (UTC, ascending) and one Float64 column per category in
        ``CATEGORY_NAMES`` order, null where the API reports no value. Only periods inside the
        entity's lifetime appear (for an aggregate: periods with at least one active member).
        An hourly or daily period is always computed from all its quarter-hours.

        Raises KeyError for an unknown entity and ValueError for an unknown resolution or a
        naive datetime.
        """
        if resolution not in RESOLUTIONS:
            raise ValueError(f"unknown resolution {resolution!r}; use one of {list(RESOLUTIONS)}")
        members = self.organisation.members(entity_type, entity_id)
        start_utc = _as_utc(start, "start")
        end_utc = _as_utc(end, "end")
        if end_utc <= start_utc:
            return empty_frame().select(PERIOD_START, *CATEGORY_NAMES)

        # Every period starting in [start, end) lies in one of these local days.
        days = day_range(local_day_of(start_utc), local_day_of(end_utc - timedelta(microseconds=1)) + timedelta(days=1))
        member_days = {member.id: [day for day in days if member.is_active(day)] for member in members}
        generated = self._asset_days((member, day) for member in members for day in member_days[member.id])

        rows = [
            (member, self.market.day(day), generated[(member.id, day)])
            for member in members
            for day in member_days[member.id]
        ]
        if not rows:
            return empty_frame().select(PERIOD_START, *CATEGORY_NAMES)

        stacked = quarter_hour_frame(rows)
        if self.corrections is not None:
            stacked = _apply_corrections(stacked, rows, self.corrections.factors(days))
        quarter_hours = stacked if entity_type == "virtual_asset" else combine_entities(stacked)
        result = roll_up(quarter_hours, resolution)
        period_us = pl.col(PERIOD_START).dt.epoch("us")
        return result.filter(
            period_us >= epoch_microseconds(start_utc),
            period_us < epoch_microseconds(end_utc),
        ).select(PERIOD_START, *CATEGORY_NAMES)

    def revenue_buckets(self, virtual_asset_id: str, product: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Return daily revenue buckets of a virtual asset's product for days starting in ``[start, end)``.

        Each bucket is ``{"start", "end", "revenue"}`` with the local day's midnights in UTC and
        the revenue in EUR, the sum of the product's daily categories in ``PRODUCT_CATEGORIES``.
        Raises KeyError for an unknown virtual asset and ValueError for an unknown product.
        """
        categories = PRODUCT_CATEGORIES.get(product)
        if categories is None:
            raise ValueError(f"unknown revenue product {product!r}; use one of {list(PRODUCT_CATEGORIES)}")
        daily = self._daily_revenue(virtual_asset_id, start, end)
        revenue = daily.select(PERIOD_START, pl.sum_horizontal(categories).alias("revenue"))

        buckets = []
        for period_start, value in revenue.iter_rows():
            day = local_day_of(period_start)
            bucket_start = period_start.astimezone(UTC)
            buckets.append({"start": bucket_start, "end": local_midnight(day + timedelta(days=1)), "revenue": value})
        return buckets

    def _daily_revenue(self, virtual_asset_id: str, start: datetime, end: datetime) -> pl.DataFrame:
        """Return the daily revenue categories of every product, cached unless corrections apply."""
        key = (virtual_asset_id, start, end)
        # Corrections change the values from one request to the next, so they bypass the cache.
        cacheable = self.corrections is None
        if cacheable:
            with self._lock:
                cached = self._daily_revenue_cache.get(key)
                if cached is not None:
                    self._daily_revenue_cache.move_to_end(key)
                    return cached
        daily = self.datapoints("virtual_asset", virtual_asset_id, "daily", start, end)
        revenue = daily.select(PERIOD_START, *_PRODUCT_REVENUE_CATEGORIES)
        if cacheable:
            with self._lock:
                self._daily_revenue_cache[key] = revenue
                while len(self._daily_revenue_cache) > CACHED_REVENUE_WINDOWS:
                    self._daily_revenue_cache.popitem(last=False)
        return revenue

    def _asset_days(self, pairs: Iterable[tuple[VirtualAssetSpec, date]]) -> dict[tuple[str, date], AssetDay]:
        """Return the generated values of each (virtual asset, day), generating missing ones in one batch."""
        found: dict[tuple[str, date], AssetDay] = {}
        missing: list[tuple[VirtualAssetSpec, date]] = []
        with self._lock:
            for asset, day in pairs:
                key = (asset.id, day)
                cached = self._cache.get(key)
                if cached is None:
                    missing.append((asset, day))
                else:
                    self._cache.move_to_end(key)
                    found[key] = cached
        if not missing:
            return found

        generated = generate_asset_days(self.seed, [(asset, self.market.day(day)) for asset, day in missing])
        logger.debug("Generated %d virtual-asset days", len(missing))
        with self._lock:
            for (asset, day), asset_day in zip(missing, generated, strict=True):
                key = (asset.id, day)
                found[key] = asset_day
                self._cache[key] = asset_day
            while len(self._cache) > self._cache_asset_days:
                self._cache.popitem(last=False)
        return found


def _apply_corrections(
    stacked: pl.DataFrame, rows: Sequence[tuple[VirtualAssetSpec, MarketDay, AssetDay]], factors: dict[date, float]
) -> pl.DataFrame:
    """Scale the EUR categories of the stacked 15-minute rows whose delivery day has a factor."""
    if not factors:
        return stacked
    counts = [market_day.quarter_hours for _, market_day, _ in rows]
    row_factors = np.repeat([factors.get(market_day.day, 1.0) for _, market_day, _ in rows], counts)
    factor = pl.Series("_correction_factor", row_factors, dtype=pl.Float64)
    return stacked.with_columns(pl.col(name) * factor for name in EUR_CATEGORIES)
