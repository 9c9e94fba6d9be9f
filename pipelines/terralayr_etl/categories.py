"""The documented data-point categories, their units and how they aggregate.

Every category is reported per delivery period. Coarser periods (hourly, daily) and
aggregate entities (portfolio, fleet, physical asset) are derived from the 15-minute
values of the virtual assets with the rules below. The sandbox generates data with these
rules, and the SQL checks recompute them independently.

Rules over time (15-minute periods into hours or Europe/Berlin delivery days):
- ``sum``: additive (revenue, volumes, weighted FCR figures, delivery hours).
- ``weighted``: weighted mean with the category named in ``weight`` as weight, null when
  the weights sum to zero (VWAPs by volume, FCR averages by delivery hours).
- ``mean``: plain mean of the 15-minute values, which equals the hour-weighted mean
  because every 15-minute period lasts 0.25 h (contract prices such as the tolling
  annual price).

Rules across entities (members into a portfolio, fleet or physical asset, per period):
- ``sum``: additive.
- ``weighted``: weighted mean by ``weight``, as over time.
- ``max``: the period's value is shared by all members, such as FCR delivery hours,
  which measure time and do not add up across members.
- ``mean``: plain mean of the members that report a value (market prices that are the
  same for every member).
- ``capacity_weighted``: mean weighted by each member's rated capacity in MW, over the
  members that report a value (contract prices).
- ``net_off``: ``min(sum of buy volume, sum of sell volume)`` of the members, the energy
  netted inside the aggregate instead of traded; 0 for a single virtual asset.
- ``normalised``: recomputed as the aggregate's revenue divided by its rated capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

PRODUCTS = ("wholesale", "fcr", "afrr_capacity", "afrr_energy", "tolling", "vba")
"""Revenue products whose sum is ``revenue_total_revenue``."""

NORMALISED_SUFFIXES = (
    "total",
    "wholesale",
    "fcr",
    "afrr_capacity",
    "afrr_energy",
    "afrr_energy_pos",
    "afrr_energy_neg",
    "vba",
    "tolling",
)

DAYS_PER_YEAR = 365
"""Per-year categories multiply the per-MW value by this many days."""


@dataclass(frozen=True)
class Category:
    """A documented data-point category and its aggregation rules."""

    name: str
    unit: str
    over_time: str
    over_entities: str
    weight: str | None = None
    revenue: str | None = None
    """For normalised categories: the absolute revenue category they divide by MW."""
    per_year: bool = False


def _revenue_category(suffix: str) -> str:
    return "revenue_total_revenue" if suffix == "total" else f"revenue_{suffix}"


def _build() -> dict[str, Category]:
    rows = [
        Category("revenue_total_revenue", "EUR", "sum", "sum"),
        Category("revenue_wholesale", "EUR", "sum", "sum"),
        Category("buy_vwap_wholesale", "EUR/MWh", "weighted", "weighted", weight="buy_volume_wholesale"),
        Category("sell_vwap_wholesale", "EUR/MWh", "weighted", "weighted", weight="sell_volume_wholesale"),
        Category("buy_volume_wholesale", "MWh", "sum", "sum"),
        Category("sell_volume_wholesale", "MWh", "sum", "sum"),
        Category("net_volume_wholesale", "MWh", "sum", "sum"),
        Category("net_off_volume_wholesale", "MWh", "sum", "net_off"),
        Category("revenue_fcr", "EUR", "sum", "sum"),
        Category("capacity_fcr", "MW", "weighted", "sum", weight="delivery_hours_fcr"),
        Category("settlement_price_fcr", "EUR/MW/h", "weighted", "mean", weight="delivery_hours_fcr"),
        Category("weighted_capacity_fcr", "MW*h", "sum", "sum"),
        Category("weighted_settlement_price_fcr", "EUR/MW", "sum", "mean"),
        Category("delivery_hours_fcr", "h", "sum", "max"),
        Category("capacity_fcr_weighted_avg", "MW", "weighted", "sum", weight="delivery_hours_fcr"),
        Category(
            "settlement_price_fcr_weighted_avg",
            "EUR/MW/h",
            "weighted",
            "weighted",
            weight="weighted_capacity_fcr",
        ),
        Category("revenue_afrr_capacity", "EUR", "sum", "sum"),
        Category("revenue_afrr_energy", "EUR", "sum", "sum"),
        Category("revenue_afrr_energy_pos", "EUR", "sum", "sum"),
        Category("revenue_afrr_energy_neg", "EUR", "sum", "sum"),
        Category(
            "settlement_price_afrr_energy_pos",
            "EUR/MWh",
            "weighted",
            "weighted",
            weight="total_volume_afrr_energy_pos",
        ),
        Category(
            "settlement_price_afrr_energy_neg",
            "EUR/MWh",
            "weighted",
            "weighted",
            weight="total_volume_afrr_energy_neg",
        ),
        Category("total_volume_afrr_energy_pos", "MWh", "sum", "sum"),
        Category("total_volume_afrr_energy_neg", "MWh", "sum", "sum"),
        Category("revenue_tolling", "EUR", "sum", "sum"),
        Category("annual_price_tolling", "EUR/MW/year", "mean", "capacity_weighted"),
        Category("revenue_vba", "EUR", "sum", "sum"),
        Category("hurdle_price_vba", "EUR", "mean", "capacity_weighted"),
    ]
    for suffix in NORMALISED_SUFFIXES:
        revenue = _revenue_category(suffix)
        rows.append(Category(f"revenue_normalised_{suffix}", "EUR/MW", "sum", "normalised", revenue=revenue))
        rows.append(
            Category(
                f"revenue_normalised_per_year_{suffix}",
                "EUR/MW/year",
                "sum",
                "normalised",
                revenue=revenue,
                per_year=True,
            )
        )
    return {row.name: row for row in rows}


CATEGORIES: dict[str, Category] = _build()
"""All documented categories by name, in documentation order."""

CATEGORY_NAMES: tuple[str, ...] = tuple(CATEGORIES)


def unit_of(name: str) -> str | None:
    """Return the unit of a documented category, or None for a category we do not know."""
    category = CATEGORIES.get(name)
    return category.unit if category else None
