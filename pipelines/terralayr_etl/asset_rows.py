"""Rows for the warehouse's entity tables, built from API objects and validated on the way.

Virtual-asset objects become ``virtual_assets`` rows with power in MW and energy in MWh, and
membership and watermark keys are checked against the known entity types, resolutions and
safe ids before they reach DuckDB.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from terralayr_etl.config import ENTITY_TYPES, RESOLUTIONS
from terralayr_etl.errors import InvalidEntityIdError, MalformedResponseError
from terralayr_etl.ids import validate_entity_id
from terralayr_etl.units import kw_to_mw

VIRTUAL_ASSET_SCHEMA = pa.schema(
    [
        pa.field("virtual_asset_id", pa.string()),
        pa.field("portfolio_id", pa.string()),
        pa.field("start_at", pa.timestamp("us", tz="UTC")),
        pa.field("end_at", pa.timestamp("us", tz="UTC")),
        pa.field("rated_charge_power_mw", pa.float64()),
        pa.field("rated_discharge_power_mw", pa.float64()),
        pa.field("energy_capacity_mwh", pa.float64()),
        pa.field("charge_efficiency", pa.float64()),
        pa.field("discharge_efficiency", pa.float64()),
        pa.field("delivery_zone", pa.string()),
        pa.field("raw_json", pa.string()),
    ]
)
"""Columns of the ``virtual_assets`` table as ``virtual_asset_record`` fills them."""


def watermark_key(entity_type: str, entity_id: str, resolution: str) -> tuple[str, str, str]:
    """Return the validated (entity_type, entity_id, resolution) key of a watermark."""
    if entity_type not in ENTITY_TYPES:
        raise InvalidEntityIdError(f"invalid entity type {entity_type!r}; use one of {list(ENTITY_TYPES)}")
    if resolution not in RESOLUTIONS:
        raise InvalidEntityIdError(f"invalid resolution {resolution!r}; use one of {list(RESOLUTIONS)}")
    return entity_type, validate_entity_id(entity_id), resolution


def member_row(entity_type: str, entity_id: str, virtual_asset_id: str) -> tuple[str, str, str]:
    """Return a validated (entity_type, entity_id, virtual_asset_id) membership row."""
    if entity_type not in ENTITY_TYPES:
        raise InvalidEntityIdError(f"invalid entity type {entity_type!r}; use one of {list(ENTITY_TYPES)}")
    return entity_type, validate_entity_id(entity_id), validate_entity_id(virtual_asset_id, what="virtual asset id")


def virtual_asset_record(asset: dict[str, Any]) -> dict[str, Any]:
    """Map one API virtual-asset object to a virtual_assets row."""
    asset_id = validate_entity_id(asset.get("id"), what="virtual asset id")
    portfolio_id = asset.get("portfolioID")
    if portfolio_id is not None:
        validate_entity_id(portfolio_id, what=f"portfolioID of virtual asset {asset_id}")
    _check_unit(asset, "unitsPower", "kW", asset_id)
    _check_unit(asset, "unitsEnergy", "kWh", asset_id)
    return {
        "virtual_asset_id": asset_id,
        "portfolio_id": portfolio_id,
        "start_at": _instant(asset, "start", asset_id),
        "end_at": _instant(asset, "end", asset_id),
        "rated_charge_power_mw": _megawatts(asset, "ratedChargePower", asset_id),
        "rated_discharge_power_mw": _megawatts(asset, "ratedDischargePower", asset_id),
        "energy_capacity_mwh": _megawatts(asset, "energyCapacity", asset_id),
        "charge_efficiency": _number(asset, "chargeEfficiency", asset_id),
        "discharge_efficiency": _number(asset, "dischargeEfficiency", asset_id),
        "delivery_zone": asset.get("deliveryZone"),
        "raw_json": json.dumps(asset, sort_keys=True),
    }


def _check_unit(asset: dict[str, Any], field: str, expected: str, asset_id: str) -> None:
    unit = asset.get(field)
    if unit is not None and unit != expected:
        raise MalformedResponseError(
            f"virtual asset {asset_id} reports {field} {unit!r}, but terralayr-etl converts only the "
            f"documented unit {expected!r}; report the changed unit so the conversion can be extended"
        )


def _number(asset: dict[str, Any], field: str, asset_id: str) -> float | None:
    value = asset.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedResponseError(f"{field} {value!r} of virtual asset {asset_id} is not a number")
    return float(value)


def _megawatts(asset: dict[str, Any], field: str, asset_id: str) -> float | None:
    """Read a kW (or kWh) field and convert it to MW (or MWh)."""
    value_kw = _number(asset, field, asset_id)
    return None if value_kw is None else kw_to_mw(value_kw)


def _instant(asset: dict[str, Any], field: str, asset_id: str) -> datetime | None:
    text = asset.get(field)
    if text is None:
        return None
    try:
        instant = datetime.fromisoformat(text) if isinstance(text, str) else None
    except ValueError:
        instant = None
    if instant is None or instant.tzinfo is None:
        raise MalformedResponseError(
            f"{field} {text!r} of virtual asset {asset_id} is not an RFC 3339 timestamp with 'Z' or an offset"
        )
    return instant.astimezone(UTC)
