"""The sandbox's organisation: virtual assets, portfolios, fleets and physical assets.

The demo organisation is read from ``config/sandbox.toml``; benchmarks build a larger one
with ``synthetic_organisation``. Virtual-asset lifetimes are Europe/Berlin delivery days
(``end`` exclusive), so every lifetime starts and ends at local midnight.
"""

from __future__ import annotations

import tomllib
import uuid
from dataclasses import dataclass, field
from datetime import date, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from terralayr_etl.config import CONFIG_DIR, ENTITY_TYPES
from terralayr_etl.errors import ConfigError, InvalidEntityIdError
from terralayr_etl.ids import validate_entity_id
from terralayr_etl.timeutil import isoformat_z, local_midnight
from terralayr_etl.units import kw_to_mw

DAILY_CYCLE_LIMIT = 2.0
"""Full cycles (energy capacity discharged) a virtual asset may do per delivery day."""

END_STATE_OF_CHARGE_PERCENTAGE = 50.0
"""State of charge at the start and end of every sandbox delivery day, in percent."""

_SYNTHETIC_NAMESPACE = uuid.UUID("5b0f2f0e-6c1d-4d8e-9a59-2f4d3c1b7a10")


@dataclass(frozen=True)
class VirtualAssetSpec:
    """A virtual asset as the sandbox serves it: power in kW, energy in kWh, local-day lifetime."""

    id: str
    name: str
    portfolio_id: str
    power_kw: float
    energy_kwh: float
    start: date
    """First Europe/Berlin delivery day of the lifetime."""
    end: date
    """First Europe/Berlin delivery day after the lifetime (exclusive)."""
    charge_efficiency: float = 0.943
    discharge_efficiency: float = 0.943
    tolling_annual_price_eur_per_mw: float = 0.0
    """Tolling fee in EUR per MW of capacity per year; 0 means the asset has no tolling contract."""
    vba_hurdle_price_eur: float = 0.0
    """Virtual battery auction hurdle price in EUR per delivery day; 0 means no auction contract."""
    delivery_zone: str = "50Hertz"

    def capacity_mw(self) -> float:
        """Return mean(rated charge power, rated discharge power) in MW, the normalisation base."""
        return kw_to_mw((self.power_kw + self.power_kw) / 2)

    def energy_mwh(self) -> float:
        """Return the energy capacity in MWh."""
        return kw_to_mw(self.energy_kwh)

    def is_active(self, day: date) -> bool:
        """Return True when the local delivery day lies inside the lifetime."""
        return self.start <= day < self.end

    def to_api_json(self) -> dict[str, Any]:
        """Return the virtual-asset object of the API, with start and end as UTC local midnights.

        Fields the sandbox does not model (ramp rate, EIC code, feedback) are null.
        """
        lifetime_days = (self.end - self.start).days
        return {
            "id": self.id,
            "name": self.name,
            "portfolioID": self.portfolio_id,
            "start": isoformat_z(local_midnight(self.start)),
            "end": isoformat_z(local_midnight(self.end)),
            "createdAt": isoformat_z(local_midnight(self.start)),
            "ratedChargePower": self.power_kw,
            "ratedDischargePower": self.power_kw,
            "unitsPower": "kW",
            "energyCapacity": self.energy_kwh,
            "availableEnergyCapacity": self.energy_kwh,
            "unitsEnergy": "kWh",
            "chargeEfficiency": self.charge_efficiency,
            "dischargeEfficiency": self.discharge_efficiency,
            "deliveryZone": self.delivery_zone,
            "annualCycleLimit": int(DAILY_CYCLE_LIMIT * 365),
            "dailyCycleLimit": int(DAILY_CYCLE_LIMIT),
            "totalAllowedCycles": int(DAILY_CYCLE_LIMIT * lifetime_days),
            "endStateOfChargePercentage": int(END_STATE_OF_CHARGE_PERCENTAGE),
            "finalSoCTolerance": 0.01,
            "rampRate": None,
            "imbalanceCharge": 0,
            "imbalanceDischarge": 0,
            "feedback": None,
            "blockIDs": [],
            "blockMetadata": [],
            "dispatchGateClosureSeconds": 480,
            "protectedDurationSeconds": 3600,
            "eicCode": None,
        }


@dataclass(frozen=True)
class Organisation:
    """The sandbox organisation: credentials, seed and the entity hierarchy."""

    id: str
    username: str
    password: str = field(repr=False)
    token_lifetime_seconds: int
    seed: int
    page_max_values: int
    virtual_assets: tuple[VirtualAssetSpec, ...]
    fleets: dict[str, tuple[str, ...]]
    """Fleet id to its portfolio ids."""
    physical_assets: dict[str, tuple[str, ...]]
    """Physical asset id to its virtual-asset ids."""
    faults: str = ""
    """Fault injection spec applied when no other is given (docs/faults.md); empty for none."""

    @cached_property
    def _by_id(self) -> dict[str, VirtualAssetSpec]:
        return {asset.id: asset for asset in self.virtual_assets}

    def portfolios(self) -> dict[str, tuple[str, ...]]:
        """Return portfolio id to virtual-asset ids, in the order the assets are listed."""
        members: dict[str, list[str]] = {}
        for asset in self.virtual_assets:
            members.setdefault(asset.portfolio_id, []).append(asset.id)
        return {portfolio_id: tuple(ids) for portfolio_id, ids in members.items()}

    def virtual_asset(self, virtual_asset_id: str) -> VirtualAssetSpec:
        """Return one virtual asset; KeyError when the id is unknown."""
        try:
            return self._by_id[virtual_asset_id]
        except KeyError:
            raise KeyError(f"virtual asset {virtual_asset_id!r} not found") from None

    def members(self, entity_type: str, entity_id: str) -> tuple[VirtualAssetSpec, ...]:
        """Return the virtual assets an entity consists of (a virtual asset is its own member).

        Raises KeyError for an unknown entity type or id.
        """
        if entity_type == "virtual_asset":
            return (self.virtual_asset(entity_id),)
        if entity_type == "portfolio":
            ids = self.portfolios().get(entity_id)
        elif entity_type == "fleet":
            portfolio_ids = self.fleets.get(entity_id)
            portfolios = self.portfolios()
            ids = None if portfolio_ids is None else tuple(i for p in portfolio_ids for i in portfolios.get(p, ()))
        elif entity_type == "physical_asset":
            ids = self.physical_assets.get(entity_id)
        else:
            raise KeyError(f"unknown entity type {entity_type!r}; use one of {list(ENTITY_TYPES)}")
        if ids is None:
            raise KeyError(f"{entity_type} {entity_id!r} not found")
        return tuple(self._by_id[i] for i in dict.fromkeys(ids))


# The schema of config/sandbox.toml, validated before the dataclasses above are built.


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _safe_id(value: str) -> str:
    try:
        return validate_entity_id(value)
    except InvalidEntityIdError as exc:
        raise ValueError(str(exc)) from None


class _SandboxSection(_Strict):
    organisation_id: str
    username: str = Field(min_length=1)
    password: str = Field(min_length=1)
    token_lifetime_seconds: int = Field(default=3600, gt=0)
    seed: int = Field(ge=0)
    page_max_values: int = Field(default=400_000, gt=0)
    faults: str = ""

    _check_id = field_validator("organisation_id")(lambda cls, v: _safe_id(v))


class _VirtualAssetEntry(_Strict):
    id: str
    name: str = ""
    portfolio_id: str
    power_kw: float = Field(gt=0)
    energy_kwh: float = Field(gt=0)
    start: date
    end: date
    charge_efficiency: float = Field(default=0.943, gt=0, le=1)
    discharge_efficiency: float = Field(default=0.943, gt=0, le=1)
    tolling_annual_price_eur_per_mw: float = Field(default=0.0, ge=0)
    vba_hurdle_price_eur: float = Field(default=0.0, ge=0)
    delivery_zone: str = "50Hertz"

    _check_ids = field_validator("id", "portfolio_id")(lambda cls, v: _safe_id(v))

    @model_validator(mode="after")
    def _lifetime_not_empty(self) -> _VirtualAssetEntry:
        if self.end <= self.start:
            raise ValueError(f"end {self.end} is not after start {self.start}; end is the first day after the lifetime")
        return self


class _FleetEntry(_Strict):
    id: str
    name: str = ""
    portfolio_ids: tuple[str, ...] = Field(min_length=1)

    _check_id = field_validator("id")(lambda cls, v: _safe_id(v))


class _PhysicalAssetEntry(_Strict):
    id: str
    name: str = ""
    virtual_asset_ids: tuple[str, ...] = Field(min_length=1)

    _check_id = field_validator("id")(lambda cls, v: _safe_id(v))


class _SandboxFile(_Strict):
    sandbox: _SandboxSection
    virtual_assets: tuple[_VirtualAssetEntry, ...] = Field(min_length=1)
    fleets: tuple[_FleetEntry, ...] = ()
    physical_assets: tuple[_PhysicalAssetEntry, ...] = ()


def _format_validation_error(path: Path, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
    return f"invalid sandbox organisation in {path}: " + "; ".join(problems) + "; fix these values in the file"


def _check_references(path: Path, parsed: _SandboxFile) -> None:
    """Raise ConfigError for duplicate ids and for fleets or physical assets naming unknown members."""
    asset_ids = [entry.id for entry in parsed.virtual_assets]
    duplicates = sorted({i for i in asset_ids if asset_ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"{path}: virtual asset ids {duplicates} appear more than once; give each asset its own id")

    portfolio_ids = {entry.portfolio_id for entry in parsed.virtual_assets}
    for fleet in parsed.fleets:
        unknown = [p for p in fleet.portfolio_ids if p not in portfolio_ids]
        if unknown:
            raise ConfigError(
                f"{path}: fleet {fleet.id!r} lists portfolios {unknown} that no virtual asset belongs to; "
                "fix the portfolio_ids or add virtual assets with that portfolio_id"
            )
    known_assets = set(asset_ids)
    for physical in parsed.physical_assets:
        unknown = [v for v in physical.virtual_asset_ids if v not in known_assets]
        if unknown:
            raise ConfigError(
                f"{path}: physical asset {physical.id!r} lists unknown virtual assets {unknown}; "
                "fix the virtual_asset_ids"
            )

    entity_ids = {"fleet": [f.id for f in parsed.fleets], "physical asset": [p.id for p in parsed.physical_assets]}
    for what, ids in entity_ids.items():
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ConfigError(f"{path}: {what} ids {repeated} appear more than once; give each its own id")


def load_organisation(path: Path | None = None) -> Organisation:
    """Load and validate the sandbox organisation, by default from ``config/sandbox.toml``.

    Raises ConfigError naming the invalid value and the fix.
    """
    path = path or CONFIG_DIR / "sandbox.toml"
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"sandbox config {path} not found; create it or set TERRALAYR_CONFIG_DIR") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"sandbox config {path} is not valid TOML: {exc}") from None

    try:
        parsed = _SandboxFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc)) from None
    _check_references(path, parsed)

    assets = tuple(
        VirtualAssetSpec(
            id=entry.id,
            name=entry.name or entry.id,
            portfolio_id=entry.portfolio_id,
            power_kw=entry.power_kw,
            energy_kwh=entry.energy_kwh,
            start=entry.start,
            end=entry.end,
            charge_efficiency=entry.charge_efficiency,
            discharge_efficiency=entry.discharge_efficiency,
            tolling_annual_price_eur_per_mw=entry.tolling_annual_price_eur_per_mw,
            vba_hurdle_price_eur=entry.vba_hurdle_price_eur,
            delivery_zone=entry.delivery_zone,
        )
        for entry in parsed.virtual_assets
    )
    section = parsed.sandbox
    return Organisation(
        id=section.organisation_id,
        username=section.username,
        password=section.password,
        token_lifetime_seconds=section.token_lifetime_seconds,
        seed=section.seed,
        page_max_values=section.page_max_values,
        virtual_assets=assets,
        fleets={fleet.id: fleet.portfolio_ids for fleet in parsed.fleets},
        physical_assets={physical.id: physical.virtual_asset_ids for physical in parsed.physical_assets},
        faults=section.faults,
    )


def _synthetic_id(seed: int, kind: str, index: int) -> str:
    return str(uuid.uuid5(_SYNTHETIC_NAMESPACE, f"{seed}/{kind}/{index}"))


def synthetic_organisation(virtual_assets: int, *, seed: int = 1) -> Organisation:
    """Build a deterministic organisation of ``virtual_assets`` assets for benchmarks.

    Assets have 1 to 50 MW and 1 to 2 hours of energy, five to a portfolio, all active from
    2024-01-01 to 2031-01-01. One fleet contains every portfolio, and two physical assets
    split the assets into halves (both contain the only asset when there is one).

    >>> organisation = synthetic_organisation(200)
    >>> len(organisation.members("fleet", next(iter(organisation.fleets))))
    200
    """
    if virtual_assets < 1:
        raise ValueError(f"virtual_assets is {virtual_assets}; a synthetic organisation needs at least 1")
    rng = np.random.default_rng([seed, virtual_assets])
    power_mw = rng.integers(1, 51, size=virtual_assets)
    duration_h = rng.choice([1.0, 1.5, 2.0], size=virtual_assets)

    assets = []
    for index in range(virtual_assets):
        # Every fifth asset has a tolling contract and every seventh a battery auction contract,
        # so those products appear in benchmarks too.
        tolling = 100_000.0 if index % 5 == 4 else 0.0
        hurdle = 50.0 * float(power_mw[index]) if index % 7 == 6 else 0.0
        assets.append(
            VirtualAssetSpec(
                id=_synthetic_id(seed, "virtual-asset", index),
                name=f"SYN-{index + 1:04d}",
                portfolio_id=_synthetic_id(seed, "portfolio", index // 5),
                power_kw=float(power_mw[index]) * 1000.0,
                energy_kwh=float(power_mw[index]) * float(duration_h[index]) * 1000.0,
                start=date(2024, 1, 1),
                end=date(2031, 1, 1),
                tolling_annual_price_eur_per_mw=tolling,
                vba_hurdle_price_eur=hurdle,
            )
        )
    assets_tuple = tuple(assets)

    portfolio_ids = tuple(dict.fromkeys(asset.portfolio_id for asset in assets_tuple))
    half = max(1, virtual_assets // 2)
    first_half = tuple(asset.id for asset in assets_tuple[:half])
    second_half = tuple(asset.id for asset in assets_tuple[half:]) or first_half
    return Organisation(
        id=_synthetic_id(seed, "organisation", 0),
        username="bench@terralayr.example",
        password="sandbox-bench-password",
        token_lifetime_seconds=3600,
        seed=seed,
        page_max_values=400_000,
        virtual_assets=assets_tuple,
        fleets={_synthetic_id(seed, "fleet", 0): portfolio_ids},
        physical_assets={
            _synthetic_id(seed, "physical-asset", 0): first_half,
            _synthetic_id(seed, "physical-asset", 1): second_half,
        },
    )


def lifetime_days(asset: VirtualAssetSpec, first: date, stop: date) -> list[date]:
    """Return the local days in ``[first, stop)`` that lie inside the asset's lifetime."""
    begin = max(first, asset.start)
    end = min(stop, asset.end)
    return [begin + timedelta(days=offset) for offset in range(max(0, (end - begin).days))]
