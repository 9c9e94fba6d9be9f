"""Daily battery dispatch of virtual assets against quarter-hour prices.

Each row is one virtual asset on one local delivery day, padded to a common number of
quarter-hour steps (padding steps have zero power). The state of charge starts and ends
every day at the same level, so days are independent of each other and of the requested
range. The heuristic charges in the day's cheapest quarter-hours and discharges in the
dearest ones. It is not an optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUARTER_HOUR_H = 0.25


@dataclass(frozen=True)
class DispatchResult:
    """Grid-side volumes and the state of charge per row and quarter-hour step."""

    buy_mwh: np.ndarray
    """Energy drawn from the grid while charging, in MWh."""
    sell_mwh: np.ndarray
    """Energy fed into the grid while discharging, in MWh."""
    soc_mwh: np.ndarray
    """State of charge at the end of each step, in MWh."""


def dispatch_days(
    price_eur_per_mwh: np.ndarray,
    charge_power_mw: np.ndarray,
    discharge_power_mw: np.ndarray,
    energy_mwh: np.ndarray,
    charge_efficiency: np.ndarray,
    discharge_efficiency: np.ndarray,
    *,
    start_soc_fraction: float = 0.5,
    daily_cycle_limit: float = 2.0,
) -> DispatchResult:
    """Dispatch every row (one asset-day) within its power, energy and cycle limits.

    Args:
        price_eur_per_mwh: (rows, steps) prices; NaN marks padding steps.
        charge_power_mw, discharge_power_mw: (rows, steps) grid-side power available to trade;
            0 on padding steps.
        energy_mwh, charge_efficiency, discharge_efficiency: (rows,) per asset.
        start_soc_fraction: state of charge at the start and the end of the day.
        daily_cycle_limit: the energy taken out of the battery per day is at most this many
            times its energy capacity.

    Returns:
        Grid volumes per step, with buy <= charge power x 0.25 h, sell <= discharge power x
        0.25 h, never both in one step, and a state of charge within [0, energy] that ends
        where it started.
    """
    rows, steps = price_eur_per_mwh.shape
    energy = energy_mwh[:, None]
    start_soc = start_soc_fraction * energy_mwh

    # Maximum rise and fall of the state of charge in each step, in MWh.
    charge_step = charge_power_mw * QUARTER_HOUR_H * charge_efficiency[:, None]
    discharge_step = discharge_power_mw * QUARTER_HOUR_H / discharge_efficiency[:, None]

    # How far the state of charge can still move after each step, so the plan can always
    # return to the start level by the end of the day.
    rise_after = np.cumsum(charge_step[:, ::-1], axis=1)[:, ::-1] - charge_step
    fall_after = np.cumsum(discharge_step[:, ::-1], axis=1)[:, ::-1] - discharge_step
    lower = np.maximum(0.0, start_soc[:, None] - rise_after)
    upper = np.minimum(energy, start_soc[:, None] + fall_after)

    cheap, dear = _price_thresholds(price_eur_per_mwh, charge_step, discharge_step, energy_mwh, daily_cycle_limit)
    round_trip = charge_efficiency * discharge_efficiency
    worth_trading = (dear * round_trip > cheap)[:, None]
    wants_charge = worth_trading & (price_eur_per_mwh <= cheap[:, None])
    wants_discharge = worth_trading & ~wants_charge & (price_eur_per_mwh >= dear[:, None])
    desired = np.where(wants_charge, charge_step, np.where(wants_discharge, -discharge_step, 0.0))

    # The only per-step loop: the state of charge of step t depends on step t - 1.
    delta = np.empty((rows, steps))
    soc = start_soc.copy()
    for step in range(steps):
        moved = np.clip(soc + desired[:, step], lower[:, step], upper[:, step])
        delta[:, step] = moved - soc
        soc = moved

    # Scaling every move toward zero keeps the path between the start level and the old path,
    # so the bounds and the end level still hold while the cycle limit is met.
    discharged = np.maximum(-delta, 0.0).sum(axis=1)
    allowed = daily_cycle_limit * energy_mwh
    scale = np.where(discharged > allowed, allowed / np.maximum(discharged, 1e-300), 1.0)
    delta *= scale[:, None]

    buy = np.maximum(delta, 0.0) / charge_efficiency[:, None]
    sell = np.maximum(-delta, 0.0) * discharge_efficiency[:, None]
    soc_path = start_soc[:, None] + np.cumsum(delta, axis=1)
    return DispatchResult(buy_mwh=buy, sell_mwh=sell, soc_mwh=soc_path)


def _price_thresholds(
    price: np.ndarray,
    charge_step: np.ndarray,
    discharge_step: np.ndarray,
    energy_mwh: np.ndarray,
    daily_cycle_limit: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return per row the price at or below which to charge and at or above which to discharge.

    The thresholds pick as many of the cheapest (dearest) quarter-hours as full-power steps
    need to move the daily cycle budget, at least one and at most half of the day.
    """
    valid = ~np.isnan(price)
    valid_steps = valid.sum(axis=1)
    ordered = np.sort(np.where(valid, price, np.inf), axis=1)

    budget = daily_cycle_limit * energy_mwh
    mean_charge = charge_step.sum(axis=1) / np.maximum(valid_steps, 1)
    mean_discharge = discharge_step.sum(axis=1) / np.maximum(valid_steps, 1)
    half_day = np.maximum(valid_steps // 2, 1)
    charge_count = np.clip(np.ceil(budget / np.maximum(mean_charge, 1e-12)), 1, half_day).astype(np.int64)
    discharge_count = np.clip(np.ceil(budget / np.maximum(mean_discharge, 1e-12)), 1, half_day).astype(np.int64)

    row = np.arange(len(price))
    cheap = ordered[row, charge_count - 1]
    dear = ordered[row, np.maximum(valid_steps - discharge_count, 0)]
    return cheap, dear
