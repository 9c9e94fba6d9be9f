"""Derive the sandbox's market parameters from published German market results.

Only summary statistics leave this script: the raw FCR, aFRR and intraday files are not
redistributable, so the sandbox ships ``data/reference/market_parameters.json`` instead.
Every parameter names the files it was computed from.

Run::

    python -m terralayr_etl.sandbox.derive_parameters --source DIR --output data/reference/market_parameters.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import polars as pl

from terralayr_etl.errors import ConfigError

logger = logging.getLogger(__name__)

DAY_AHEAD_2024 = "de_lu_day_ahead_hourly_2024.csv"
DAY_AHEAD_2020_2022 = "de_lu_day_ahead_hourly_2020-07_2022-07.csv"
INTRADAY_2024 = "de_intraday_id_aep_15min_2024.csv"
FCR_2020_2022 = "fcr_de_capacity_results_2020-01_2022-05.csv"
AFRR_OLD_DESIGN = "afrr_de_capacity_energy_results_2018-07_2020-09.csv"
AFRR_CAPACITY_2024 = "afrr_de_capacity_results_2024-01_2024-08.csv"

EFA_BLOCKS = ("00-04", "04-08", "08-12", "12-16", "16-20", "20-24")

ACTIVATION_THRESHOLD_EUR_PER_MWH = 50.0
"""An intraday index this far above (below) day-ahead counts as upward (downward) activation."""

SPIKE_THRESHOLD_EUR_PER_MWH = 100.0
"""An intraday deviation from day-ahead larger than this counts as a spike."""

MEAN_ACTIVATED_SHARE = 0.5
"""Mean share of the reserved aFRR energy delivered in an activated quarter-hour (an assumption)."""


def _read(source: Path, name: str) -> pl.DataFrame:
    path = source / name
    if not path.is_file():
        raise ConfigError(f"market file {path} not found; pass the folder that contains {name} as --source")
    return pl.read_csv(path, infer_schema_length=None)


def _rounded(values: list[float]) -> list[float]:
    # Six decimals keep the JSON readable. Every statistic here is far coarser than that.
    return [round(value, 6) for value in values]


def _quartiles(frame: pl.DataFrame, value: str, group: str = "block") -> dict[str, list[float]]:
    """Return q25, median, q75 and count of ``value`` per EFA block, blocks 0 to 5 in order."""
    stats = (
        frame.group_by(group)
        .agg(
            pl.col(value).quantile(0.25, "linear").alias("q25"),
            pl.col(value).median().alias("median"),
            pl.col(value).quantile(0.75, "linear").alias("q75"),
            pl.col(value).count().alias("count"),
        )
        .sort(group)
    )
    if stats.height != len(EFA_BLOCKS):
        raise ConfigError(f"expected {len(EFA_BLOCKS)} EFA blocks of {value}, found {stats.height}; check the source file")
    return {
        "q25": _rounded(stats["q25"].to_list()),
        "median": _rounded(stats["median"].to_list()),
        "q75": _rounded(stats["q75"].to_list()),
        "count": stats["count"].to_list(),
    }


def _block_of_product(product: pl.Expr) -> pl.Expr:
    """Map a product name such as ``POS_08_12`` to its EFA block index 2 (local start hour // 4)."""
    return (product.str.extract(r"_(\d\d)_\d\d$").cast(pl.Int32) // 4).alias("block")


def _day_ahead_hourly(source: Path, name: str) -> pl.DataFrame:
    """Read a day-ahead file with each hour's UTC start, local delivery date and EFA block."""
    return _read(source, name).select(
        pl.col("timestamp_utc").str.to_datetime(time_zone="UTC").alias("hour_utc"),
        pl.col("timestamp_local").str.slice(0, 10).alias("local_date"),
        (pl.col("timestamp_local").str.slice(11, 2).cast(pl.Int32) // 4).alias("block"),
        pl.col("price_eur_mwh"),
    )


def derive_fcr(source: Path) -> dict[str, Any]:
    """Derive the FCR settlement price per EFA block in EUR/MW/h."""
    frame = _read(source, FCR_2020_2022).filter(
        pl.col("is_primary_result") == 1,
        pl.col("product") != "NEGPOS_00_24",
    )
    frame = frame.with_columns(
        _block_of_product(pl.col("product")),
        (pl.col("de_settlement_price_eur_per_mw") / pl.col("block_hours")).alias("price_eur_per_mw_h"),
    ).drop_nulls("price_eur_per_mw_h")
    return {
        "source_files": [FCR_2020_2022],
        "period": f"{frame['delivery_date'].min()} to {frame['delivery_date'].max()}",
        "method": (
            "Primary results (is_primary_result = 1) of the 4-hour products; "
            "de_settlement_price_eur_per_mw divided by block_hours; quartiles per EFA block."
        ),
        **_quartiles(frame, "price_eur_per_mw_h"),
    }


def derive_afrr_capacity(source: Path) -> dict[str, Any]:
    """Derive the aFRR capacity price per EFA block and direction in EUR/MW/h."""
    frame = _read(source, AFRR_CAPACITY_2024).with_columns(_block_of_product(pl.col("product")))
    result: dict[str, Any] = {
        "source_files": [AFRR_CAPACITY_2024],
        "period": f"{frame['delivery_date'].min()} to {frame['delivery_date'].max()}",
        "method": "de_avg_capacity_price_eur_per_mw_h (pay-as-bid average of accepted bids); quartiles per EFA block.",
    }
    for direction in ("POS", "NEG"):
        subset = frame.filter(pl.col("direction") == direction)
        result[direction.lower()] = _quartiles(subset, "de_avg_capacity_price_eur_per_mw_h")
    return result


def derive_afrr_energy_spread(source: Path) -> dict[str, Any]:
    """Derive the aFRR energy price minus the block's mean day-ahead price, per block and direction.

    The energy prices come from the tender design before 2020-11-02 and overlap the hourly
    day-ahead file from 2020-07-01 to 2020-09-30 only, so the spreads describe that quarter.
    """
    day_ahead = (
        _day_ahead_hourly(source, DAY_AHEAD_2020_2022)
        .group_by("local_date", "block")
        .agg(pl.col("price_eur_mwh").mean().alias("day_ahead_eur_per_mwh"))
    )
    frame = (
        _read(source, AFRR_OLD_DESIGN)
        .with_columns(_block_of_product(pl.col("product")), pl.col("delivery_date").alias("local_date"))
        .join(day_ahead, on=["local_date", "block"], how="inner")
        .with_columns(
            (pl.col("de_min_energy_price_eur_per_mwh") - pl.col("day_ahead_eur_per_mwh")).alias("spread_eur_per_mwh")
        )
    )
    result: dict[str, Any] = {
        "source_files": [AFRR_OLD_DESIGN, DAY_AHEAD_2020_2022],
        "period": f"{frame['local_date'].min()} to {frame['local_date'].max()}",
        "method": (
            "de_min_energy_price_eur_per_mwh (the accepted bid first in the merit order) minus the mean "
            "day-ahead price of the block's hours; quartiles per EFA block. For NEG a positive price is "
            "paid by the provider, so the sandbox books revenue_afrr_energy_neg = volume x (-price)."
        ),
    }
    for direction in ("POS", "NEG"):
        subset = frame.filter(pl.col("direction") == direction)
        result[direction.lower()] = _quartiles(subset, "spread_eur_per_mwh")
    return result


def _intraday_deviation(source: Path) -> pl.DataFrame:
    """Join each ID AEP quarter-hour with the day-ahead price of its hour (both 2024)."""
    day_ahead = _day_ahead_hourly(source, DAY_AHEAD_2024).select("hour_utc", "price_eur_mwh")
    intraday = _read(source, INTRADAY_2024).select(
        pl.col("timestamp_utc").str.to_datetime(time_zone="UTC").alias("quarter_utc"),
        pl.col("id_aep_eur_mwh"),
    )
    joined = intraday.with_columns(pl.col("quarter_utc").dt.truncate("1h").alias("hour_utc")).join(
        day_ahead, on="hour_utc", how="inner"
    )
    if joined.height != intraday.height:
        raise ConfigError(
            f"{intraday.height - joined.height} intraday quarter-hours have no day-ahead hour; "
            f"check that {INTRADAY_2024} and {DAY_AHEAD_2024} cover the same year"
        )
    return joined.with_columns((pl.col("id_aep_eur_mwh") - pl.col("price_eur_mwh")).alias("deviation"))


def derive_intraday(source: Path) -> dict[str, Any]:
    """Derive the distribution of the intraday index minus the day-ahead price, spikes included."""
    frame = _intraday_deviation(source)
    deviation = frame["deviation"]
    spikes = deviation.filter(deviation.abs() > SPIKE_THRESHOLD_EUR_PER_MWH)
    excess = spikes.abs() - SPIKE_THRESHOLD_EUR_PER_MWH
    return {
        "source_files": [INTRADAY_2024, DAY_AHEAD_2024],
        "period": "2024-01-01 to 2024-12-31",
        "method": (
            "ID AEP quarter-hour index minus the day-ahead price of the same hour. Quartiles of all "
            f"deviations; a spike is a deviation beyond +-{SPIKE_THRESHOLD_EUR_PER_MWH:g} EUR/MWh."
        ),
        "q25": round(deviation.quantile(0.25, "linear"), 6),
        "median": round(deviation.median(), 6),
        "q75": round(deviation.quantile(0.75, "linear"), 6),
        "count": deviation.len(),
        "spike_threshold_eur_per_mwh": SPIKE_THRESHOLD_EUR_PER_MWH,
        "spike_rate": round(spikes.len() / deviation.len(), 6),
        "spike_positive_share": round(float((spikes > 0).mean()), 6),
        "spike_excess_median_eur_per_mwh": round(excess.median(), 6),
    }


def derive_afrr_activation(source: Path) -> dict[str, Any]:
    """Derive per-direction activation rates from the intraday index as a system-imbalance proxy."""
    deviation = _intraday_deviation(source)["deviation"]
    return {
        "source_files": [INTRADAY_2024, DAY_AHEAD_2024],
        "period": "2024-01-01 to 2024-12-31",
        "method": (
            "No activation volumes are available, so the rate is a proxy: the share of 2024 quarter-hours "
            f"whose ID AEP index lies more than {ACTIVATION_THRESHOLD_EUR_PER_MWH:g} EUR/MWh above (pos) or "
            "below (neg) the day-ahead price of the hour. mean_activated_share is an assumption, not derived."
        ),
        "threshold_eur_per_mwh": ACTIVATION_THRESHOLD_EUR_PER_MWH,
        "rate_pos": round(float((deviation > ACTIVATION_THRESHOLD_EUR_PER_MWH).mean()), 6),
        "rate_neg": round(float((deviation < -ACTIVATION_THRESHOLD_EUR_PER_MWH).mean()), 6),
        "mean_activated_share": MEAN_ACTIVATED_SHARE,
    }


def derive_parameters(source: Path) -> dict[str, Any]:
    """Compute every market parameter from the files in ``source``."""
    return {
        "description": (
            "Market parameters of the terralayr sandbox, derived from published German market results. "
            "Prices in EUR; EFA blocks are local (Europe/Berlin) 4-hour blocks of the delivery day."
        ),
        "generated_by": "python -m terralayr_etl.sandbox.derive_parameters",
        "efa_blocks": list(EFA_BLOCKS),
        "fcr_settlement_price_eur_per_mw_h": derive_fcr(source),
        "afrr_capacity_price_eur_per_mw_h": derive_afrr_capacity(source),
        "afrr_energy_price_spread_to_day_ahead_eur_per_mwh": derive_afrr_energy_spread(source),
        "afrr_activation": derive_afrr_activation(source),
        "intraday_deviation_from_day_ahead_eur_per_mwh": derive_intraday(source),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="folder with the market CSV files")
    parser.add_argument("--output", type=Path, required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    try:
        parameters = derive_parameters(args.source)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(parameters, indent=2) + "\n", encoding="utf-8")
    logger.info("Wrote market parameters to %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
