"""Market prices of the sandbox: the 2024 day-ahead replay and the seeded per-day market draws.

Every local delivery day gets one ``MarketDay``, shared by all virtual assets: quarter-hour
day-ahead and intraday prices, FCR and aFRR capacity prices per EFA block, and aFRR energy
prices and activations per quarter-hour. Its random draws come from a generator seeded with
(seed, "market", day), so a day's values never depend on which range was requested.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from terralayr_etl.config import PROJECT_ROOT
from terralayr_etl.errors import ConfigError
from terralayr_etl.timeutil import LOCAL_TZ, local_midnight

DEFAULT_PRICES_PATH = PROJECT_ROOT / "data" / "reference" / "de_lu_day_ahead_hourly_2024.csv"
DEFAULT_PARAMETERS_PATH = PROJECT_ROOT / "data" / "reference" / "market_parameters.json"

REPLAY_YEAR = 2024
EFA_BLOCK_COUNT = 6
MAX_QUARTER_HOURS = 100
"""Quarter-hours of the longest local day (the day DST ends)."""

QUARTER_OFFSETS_H = np.array([-0.375, -0.125, 0.125, 0.375])
"""Centre of each quarter-hour relative to the centre of its hour, in hours."""

_IQR_PER_SIGMA = 1.349
"""Interquartile range of a standard normal distribution, to turn quartiles into a sigma."""


def stable_key(text: str) -> int:
    """Return a 64-bit integer for ``text`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def day_rng(seed: int, key: str, day: date) -> np.random.Generator:
    """Return the generator for one (seed, key, local day), independent of any requested range."""
    return np.random.default_rng([seed, stable_key(key), day.toordinal()])


def source_day(target: date) -> date:
    """Return the 2024 day whose day-ahead prices are replayed on the local day ``target``.

    The source day has the same weekday as ``target`` and lies nearest to the same day-of-year
    position in 2024. A match that falls outside 2024 moves one week back into it.
    """
    day_of_year = target.timetuple().tm_yday
    base = date(REPLAY_YEAR, 1, 1) + timedelta(days=day_of_year - 1)
    shift = (target.weekday() - base.weekday()) % 7
    if shift > 3:
        shift -= 7
    result = base + timedelta(days=shift)
    if result.year < REPLAY_YEAR:
        result += timedelta(days=7)
    elif result.year > REPLAY_YEAR:
        result -= timedelta(days=7)
    return result


def local_hours(day: date) -> tuple[np.ndarray, np.ndarray]:
    """Return the wall-clock hour and its occurrence (0 first, 1 repeated) for each hour of a local day.

    A day has 23, 24 or 25 hours. On the day DST ends the repeated hour appears twice.
    """
    start = local_midnight(day)
    stop = local_midnight(day + timedelta(days=1))
    hour_count = int((stop - start) / timedelta(hours=1))
    hours = np.empty(hour_count, dtype=np.int64)
    occurrences = np.empty(hour_count, dtype=np.int64)
    for index in range(hour_count):
        local = (start + timedelta(hours=index)).astimezone(LOCAL_TZ)
        hours[index] = local.hour
        occurrences[index] = local.fold
    return hours, occurrences


def shape_quarter_hours(hourly_eur_per_mwh: np.ndarray) -> np.ndarray:
    """Spread hourly prices over quarter-hours along a ramp toward the neighbouring hours.

    Each hour's ramp has the central slope (next - previous) / 2 per hour, and the four quarters
    sit at -3/8, -1/8, +1/8 and +3/8 h from the hour's centre, so they average to the hourly
    price. The first and last hour of the day use their own price as the missing neighbour.
    """
    previous = np.concatenate([hourly_eur_per_mwh[:1], hourly_eur_per_mwh[:-1]])
    following = np.concatenate([hourly_eur_per_mwh[1:], hourly_eur_per_mwh[-1:]])
    slope_per_h = (following - previous) / 2.0
    quarters = hourly_eur_per_mwh[:, None] + slope_per_h[:, None] * QUARTER_OFFSETS_H[None, :]
    return quarters.reshape(-1)


class DayAheadReplay:
    """The hourly 2024 DE-LU day-ahead series, replayed onto any local delivery day."""

    def __init__(self, path: Path | None = None):
        self.path = path or DEFAULT_PRICES_PATH
        self._prices = self._load(self.path)

    @staticmethod
    def _load(path: Path) -> np.ndarray:
        """Return prices indexed by [day of 2024, local hour, occurrence], gaps filled.

        A local hour missing from a day (DST start) takes the nearest existing hour, the earlier
        one on a tie. An hour that occurs once has the same price at both occurrences.
        """
        try:
            frame = pl.read_csv(path, schema_overrides={"price_eur_mwh": pl.Float64})
        except (FileNotFoundError, pl.exceptions.PolarsError) as exc:
            raise ConfigError(f"day-ahead price file {path} could not be read ({exc}); pass a valid prices_path") from None
        frame = frame.select(
            pl.col("timestamp_local").str.slice(0, 10).str.to_date().alias("local_date"),
            pl.col("timestamp_local").str.slice(11, 2).cast(pl.Int64).alias("hour"),
            pl.col("price_eur_mwh"),
        ).with_columns(pl.int_range(pl.len()).over("local_date", "hour").alias("occurrence"))

        day_count = (date(REPLAY_YEAR + 1, 1, 1) - date(REPLAY_YEAR, 1, 1)).days
        prices = np.full((day_count, 24, 2), np.nan)
        day_index = (frame["local_date"] - date(REPLAY_YEAR, 1, 1)).dt.total_days().to_numpy()
        if day_index.min() != 0 or day_index.max() != day_count - 1 or frame["occurrence"].max() > 1:
            raise ConfigError(f"day-ahead price file {path} must cover every local hour of {REPLAY_YEAR} exactly once")
        prices[day_index, frame["hour"].to_numpy(), frame["occurrence"].to_numpy()] = frame["price_eur_mwh"].to_numpy()

        repeated_missing = np.isnan(prices[:, :, 1])
        prices[:, :, 1][repeated_missing] = prices[:, :, 0][repeated_missing]
        for day_number, hour in zip(*np.nonzero(np.isnan(prices[:, :, 0])), strict=True):
            prices[day_number, hour] = prices[day_number, _nearest_hour(prices[day_number, :, 0], hour)]
        return prices

    def source_prices(self, source: date) -> np.ndarray:
        """Return a 2024 day's prices indexed by [local hour, occurrence], gaps filled.

        Occurrence 1 differs from occurrence 0 only for the hour repeated when DST ends. A
        target day without a repeated hour reads occurrence 0, the first.
        """
        return self._prices[(source - date(REPLAY_YEAR, 1, 1)).days]

    def hourly_prices(self, day: date) -> np.ndarray:
        """Return one price in EUR/MWh per hour of the local day (23, 24 or 25 values)."""
        hours, occurrences = local_hours(day)
        return self.source_prices(source_day(day))[hours, occurrences]

    def quarter_hour_prices(self, day: date) -> np.ndarray:
        """Return the day's quarter-hour prices in EUR/MWh (92, 96 or 100 values)."""
        return shape_quarter_hours(self.hourly_prices(day))


def _nearest_hour(hour_prices: np.ndarray, hour: int) -> int:
    for distance in range(1, 24):
        for candidate in (hour - distance, hour + distance):
            if 0 <= candidate < 24 and not np.isnan(hour_prices[candidate]):
                return candidate
    raise ConfigError("a day of the day-ahead price file has no price at all; fix the file")


@dataclass(frozen=True)
class Quartiles:
    """First quartile, median and third quartile of a market quantity, per EFA block or overall."""

    q25: np.ndarray
    median: np.ndarray
    q75: np.ndarray

    @classmethod
    def from_json(cls, entry: dict[str, Any], name: str, *, per_block: bool = True) -> Quartiles:
        try:
            values = [np.asarray(entry[key], dtype=np.float64) for key in ("q25", "median", "q75")]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"market parameter {name} is missing q25, median or q75 ({exc}); regenerate the JSON") from None
        shape = (EFA_BLOCK_COUNT,) if per_block else ()
        if any(value.shape != shape for value in values):
            expected = f"{EFA_BLOCK_COUNT} values, one per EFA block" if per_block else "one number"
            raise ConfigError(f"market parameter {name} must have {expected} per quartile; regenerate the JSON")
        return cls(*values)

    def sample_normal(self, z: np.ndarray) -> np.ndarray:
        """Map standard normal draws to a normal distribution with these quartiles."""
        return self.median + z * (self.q75 - self.q25) / _IQR_PER_SIGMA

    def sample_lognormal(self, z: np.ndarray) -> np.ndarray:
        """Map standard normal draws to a log-normal distribution with these quartiles (all > 0)."""
        sigma = np.log(self.q75 / self.q25) / _IQR_PER_SIGMA
        return self.median * np.exp(z * sigma)


@dataclass(frozen=True)
class MarketParameters:
    """The derived market parameters that ``derive_parameters`` writes to JSON."""

    fcr_price_eur_per_mw_h: Quartiles
    afrr_capacity_price_pos_eur_per_mw_h: Quartiles
    afrr_capacity_price_neg_eur_per_mw_h: Quartiles
    afrr_energy_spread_pos_eur_per_mwh: Quartiles
    afrr_energy_spread_neg_eur_per_mwh: Quartiles
    activation_rate_pos: float
    activation_rate_neg: float
    mean_activated_share: float
    intraday_deviation_eur_per_mwh: Quartiles
    """Intraday minus day-ahead price, one set of quartiles for the whole day."""
    spike_threshold_eur_per_mwh: float
    spike_rate: float
    spike_positive_share: float
    spike_excess_median_eur_per_mwh: float

    @classmethod
    def load(cls, path: Path | None = None) -> MarketParameters:
        """Read ``data/reference/market_parameters.json`` (or ``path``)."""
        path = path or DEFAULT_PARAMETERS_PATH
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"market parameters {path} not found; run terralayr_etl.sandbox.derive_parameters") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"market parameters {path} are not valid JSON: {exc}") from None

        try:
            afrr_capacity = raw["afrr_capacity_price_eur_per_mw_h"]
            spread = raw["afrr_energy_price_spread_to_day_ahead_eur_per_mwh"]
            activation = raw["afrr_activation"]
            intraday = raw["intraday_deviation_from_day_ahead_eur_per_mwh"]
            return cls(
                fcr_price_eur_per_mw_h=Quartiles.from_json(raw["fcr_settlement_price_eur_per_mw_h"], "fcr"),
                afrr_capacity_price_pos_eur_per_mw_h=Quartiles.from_json(afrr_capacity["pos"], "afrr capacity pos"),
                afrr_capacity_price_neg_eur_per_mw_h=Quartiles.from_json(afrr_capacity["neg"], "afrr capacity neg"),
                afrr_energy_spread_pos_eur_per_mwh=Quartiles.from_json(spread["pos"], "afrr energy spread pos"),
                afrr_energy_spread_neg_eur_per_mwh=Quartiles.from_json(spread["neg"], "afrr energy spread neg"),
                activation_rate_pos=float(activation["rate_pos"]),
                activation_rate_neg=float(activation["rate_neg"]),
                mean_activated_share=float(activation["mean_activated_share"]),
                intraday_deviation_eur_per_mwh=Quartiles.from_json(intraday, "intraday deviation", per_block=False),
                spike_threshold_eur_per_mwh=float(intraday["spike_threshold_eur_per_mwh"]),
                spike_rate=float(intraday["spike_rate"]),
                spike_positive_share=float(intraday["spike_positive_share"]),
                spike_excess_median_eur_per_mwh=float(intraday["spike_excess_median_eur_per_mwh"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"market parameters {path} lack an entry ({exc}); regenerate them") from None


@dataclass(frozen=True)
class MarketDay:
    """Market prices of one local delivery day, shared by every virtual asset."""

    day: date
    start_utc: datetime
    """Local midnight at the start of the day, in UTC."""
    efa_block: np.ndarray
    """EFA block (0 to 5, local clock hour // 4) of each quarter-hour."""
    day_ahead_eur_per_mwh: np.ndarray
    intraday_eur_per_mwh: np.ndarray
    fcr_price_eur_per_mw_h: np.ndarray
    """FCR settlement price per EFA block."""
    afrr_capacity_price_pos_eur_per_mw_h: np.ndarray
    afrr_capacity_price_neg_eur_per_mw_h: np.ndarray
    afrr_energy_price_pos_eur_per_mwh: np.ndarray
    afrr_energy_price_neg_eur_per_mwh: np.ndarray
    """Price the provider pays for downward energy. A negative price means the provider is paid."""
    afrr_activated_share_pos: np.ndarray
    """Share of the reserved upward energy activated in each quarter-hour (0 when not activated)."""
    afrr_activated_share_neg: np.ndarray

    @property
    def quarter_hours(self) -> int:
        return len(self.day_ahead_eur_per_mwh)


class Market:
    """Source of ``MarketDay`` values, built from the replay, the parameters and the seed and cached."""

    def __init__(
        self,
        seed: int,
        *,
        parameters_path: Path | None = None,
        prices_path: Path | None = None,
        cache_days: int = 4096,
    ):
        self.seed = seed
        self.parameters = MarketParameters.load(parameters_path)
        self.replay = DayAheadReplay(prices_path)
        self._cache: OrderedDict[date, MarketDay] = OrderedDict()
        self._cache_days = cache_days
        self._lock = threading.Lock()

    def day(self, day: date) -> MarketDay:
        """Return the market of one local delivery day (cached, least recently used dropped first)."""
        with self._lock:
            cached = self._cache.get(day)
            if cached is not None:
                self._cache.move_to_end(day)
                return cached
        market_day = self._build(day)
        with self._lock:
            self._cache[day] = market_day
            while len(self._cache) > self._cache_days:
                self._cache.popitem(last=False)
        return market_day

    def _build(self, day: date) -> MarketDay:
        parameters = self.parameters
        hours, _ = local_hours(day)
        efa_block = np.repeat(hours // 4, 4)
        day_ahead = shape_quarter_hours(self.replay.hourly_prices(day))
        quarter_count = len(day_ahead)
        rng = day_rng(self.seed, "market", day)

        # One draw per block for the capacity auctions, which settle per EFA block.
        fcr_price = parameters.fcr_price_eur_per_mw_h.sample_lognormal(rng.standard_normal(EFA_BLOCK_COUNT))
        capacity_pos = parameters.afrr_capacity_price_pos_eur_per_mw_h.sample_lognormal(rng.standard_normal(EFA_BLOCK_COUNT))
        capacity_neg = parameters.afrr_capacity_price_neg_eur_per_mw_h.sample_lognormal(rng.standard_normal(EFA_BLOCK_COUNT))

        intraday = day_ahead + self._intraday_deviation(rng, quarter_count)

        spread_pos = parameters.afrr_energy_spread_pos_eur_per_mwh.sample_normal(rng.standard_normal((quarter_count, 1)))
        spread_neg = parameters.afrr_energy_spread_neg_eur_per_mwh.sample_normal(rng.standard_normal((quarter_count, 1)))
        rows = np.arange(quarter_count)
        energy_price_pos = day_ahead + spread_pos[rows, efa_block]
        energy_price_neg = day_ahead + spread_neg[rows, efa_block]

        # Each quarter-hour is activated upward, downward or not at all.
        state = rng.random(quarter_count)
        share = np.minimum(1.0, rng.random(quarter_count) * 2.0 * parameters.mean_activated_share)
        is_pos = state < parameters.activation_rate_pos
        is_neg = ~is_pos & (state < parameters.activation_rate_pos + parameters.activation_rate_neg)

        return MarketDay(
            day=day,
            start_utc=local_midnight(day),
            efa_block=efa_block,
            day_ahead_eur_per_mwh=day_ahead,
            intraday_eur_per_mwh=intraday,
            fcr_price_eur_per_mw_h=fcr_price,
            afrr_capacity_price_pos_eur_per_mw_h=capacity_pos,
            afrr_capacity_price_neg_eur_per_mw_h=capacity_neg,
            afrr_energy_price_pos_eur_per_mwh=energy_price_pos,
            afrr_energy_price_neg_eur_per_mwh=energy_price_neg,
            afrr_activated_share_pos=np.where(is_pos, share, 0.0),
            afrr_activated_share_neg=np.where(is_neg, share, 0.0),
        )

    def _intraday_deviation(self, rng: np.random.Generator, quarter_count: int) -> np.ndarray:
        """Draw intraday-minus-day-ahead deviations: a normal body with occasional spikes."""
        parameters = self.parameters
        body = parameters.intraday_deviation_eur_per_mwh.sample_normal(rng.standard_normal(quarter_count))
        is_spike = rng.random(quarter_count) < parameters.spike_rate
        sign = np.where(rng.random(quarter_count) < parameters.spike_positive_share, 1.0, -1.0)
        # An exponential excess with this scale has the derived median excess.
        excess = rng.exponential(parameters.spike_excess_median_eur_per_mwh / math.log(2), quarter_count)
        spike = sign * (parameters.spike_threshold_eur_per_mwh + excess)
        return np.where(is_spike, spike, body)

