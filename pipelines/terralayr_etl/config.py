"""Settings: the TOML files in ``config/`` plus credentials from the environment.

Credentials never come from a file. ``TERRALAYR_USERNAME`` and ``TERRALAYR_PASSWORD`` are read
from the environment or, when ``TERRALAYR_PREFECT_SECRET`` names one, from a Prefect Secret
block holding ``{"username": ..., "password": ...}``.
"""

from __future__ import annotations

import os
import tomllib
from datetime import date
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from terralayr_etl.errors import ConfigError
from terralayr_etl.ids import validate_entity_id

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = Path(os.environ.get("TERRALAYR_CONFIG_DIR", PROJECT_ROOT / "config"))
"""The config folder when this module was imported; ``config_dir()`` reads the variable again."""


def config_dir() -> Path:
    """Return the folder named by ``TERRALAYR_CONFIG_DIR`` now, or ``config/`` of the project."""
    return Path(os.environ.get("TERRALAYR_CONFIG_DIR", PROJECT_ROOT / "config"))

RESOLUTIONS = ("raw", "15min", "hourly", "daily")
ENTITY_TYPES = ("virtual_asset", "portfolio", "fleet", "physical_asset")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiPaths(_Strict):
    authenticate: str
    virtual_assets: str
    virtual_asset: str
    datapoints_virtual_asset: str
    datapoints_portfolio: str
    datapoints_fleet: str
    datapoints_physical_asset: str
    revenue_wholesale: str
    revenue_ancillary: str
    revenue_tolling: str
    revenue_vba: str

    def datapoints(self, entity_type: str) -> str:
        """Return the data-point path template for an entity type."""
        return getattr(self, f"datapoints_{entity_type}")

    def revenue(self, product: str) -> str:
        """Return the revenue-bucket path template for a product."""
        return getattr(self, f"revenue_{product}")


class ApiParameters(_Strict):
    start: str = "start"
    end: str = "end"
    resolution: str = "resolution"
    datapoints: str = "datapoints"
    cursor: str = "cursor"


class ApiSettings(_Strict):
    base_url: str
    timeout_seconds: float = Field(gt=0)
    connect_timeout_seconds: float = Field(gt=0)
    max_concurrency: int = Field(ge=1, le=256)
    token_refresh_margin_seconds: float = Field(ge=0)
    end_inclusive: bool = True
    paths: ApiPaths
    parameters: ApiParameters = ApiParameters()
    resolutions: dict[str, str]
    max_range_days: dict[str, float]

    @field_validator("resolutions")
    @classmethod
    def _known_resolutions(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = set(value) - set(RESOLUTIONS)
        if unknown:
            raise ValueError(f"unknown resolution names {sorted(unknown)}; use {list(RESOLUTIONS)}")
        return value

    @field_validator("max_range_days")
    @classmethod
    def _positive_ranges(cls, value: dict[str, float]) -> dict[str, float]:
        for name, days in value.items():
            if days <= 0:
                raise ValueError(f"max_range_days.{name} is {days}; it must be above 0")
        return value


class RetrySettings(_Strict):
    attempts: int = Field(ge=1, le=50)
    wait_initial_seconds: float = Field(ge=0)
    wait_max_seconds: float = Field(ge=0)
    wait_jitter_seconds: float = Field(ge=0)
    max_retry_after_seconds: float = Field(ge=0)
    total_timeout_seconds: float = Field(gt=0)


class PipelineSettings(_Strict):
    data_dir: str = "data"
    resolutions: tuple[str, ...] = ("15min", "hourly", "daily")
    lookback_days: int = Field(default=3, ge=0, le=366)
    local_timezone: str = "Europe/Berlin"
    history_start: date = date(2024, 1, 1)
    fetch_revenue_buckets: bool = True
    refetch_attempts: int = Field(default=3, ge=0, le=20)
    """Extra fetches of a window whose response could not be parsed or lacks a requested category."""
    windows_per_task: int = Field(default=16, ge=1, le=10_000)
    """Request windows of one entity fetched one after another by one Prefect task run."""
    windows_waiting_for_cpu: int = Field(default=4, ge=0, le=256)
    """Fetched windows that may wait, with their responses in memory, for a CPU to decode them
    while ``api.max_concurrency`` further requests are in flight."""
    load_batch_rows: int = Field(default=8_000_000, ge=1)
    """Parquet rows loaded into DuckDB by one batch, which commits on its own."""
    check_chunk_rows: int = Field(default=500_000, ge=1)
    """Stored data-point rows the checks compare at a time, rounded to whole local days."""

    @field_validator("resolutions")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name not in RESOLUTIONS:
                raise ValueError(f"unknown resolution {name!r}; use one of {list(RESOLUTIONS)}")
        return value


class FleetSettings(_Strict):
    id: str
    name: str = ""
    portfolio_ids: tuple[str, ...]

    _check_ids = field_validator("id")(lambda cls, v: validate_entity_id(v))
    _check_members = field_validator("portfolio_ids")(
        lambda cls, ids: tuple(validate_entity_id(value, what="portfolio id") for value in ids)
    )


class PhysicalAssetSettings(_Strict):
    id: str
    name: str = ""
    virtual_asset_ids: tuple[str, ...]

    _check_ids = field_validator("id")(lambda cls, v: validate_entity_id(v))
    _check_members = field_validator("virtual_asset_ids")(
        lambda cls, ids: tuple(validate_entity_id(value, what="virtual asset id") for value in ids)
    )


class Settings(_Strict):
    api: ApiSettings
    retry: RetrySettings
    pipeline: PipelineSettings = PipelineSettings()
    fleets: tuple[FleetSettings, ...] = ()
    physical_assets: tuple[PhysicalAssetSettings, ...] = ()


class Credentials(BaseModel):
    """Username and password for the authenticate endpoint. The password is a SecretStr,
    so it prints as ``**********`` in reprs, logs and Prefect parameters."""

    model_config = ConfigDict(frozen=True)

    username: str
    password: SecretStr
    organisation_id: str


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; create it or set TERRALAYR_CONFIG_DIR") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _format_validation_error(path: Path, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {error['msg']} (got {error.get('input')!r})")
    return f"invalid settings in {path}: " + "; ".join(problems)


def load_settings(path: Path | None = None, *, base_url: str | None = None) -> Settings:
    """Load ``config/terralayr.toml`` and apply ``TERRALAYR_BASE_URL`` (or ``base_url``)."""
    path = path or config_dir() / "terralayr.toml"
    raw = _read_toml(path)
    override = base_url or os.environ.get("TERRALAYR_BASE_URL")
    if override:
        raw.setdefault("api", {})["base_url"] = override
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc)) from None


def _credentials_from_prefect_secret(block_name: str) -> dict[str, str]:
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name).get()
    except ValueError as exc:
        raise ConfigError(f"Prefect Secret block {block_name!r} could not be loaded: {exc}") from None
    if not isinstance(value, dict) or not {"username", "password"} <= set(value):
        raise ConfigError(
            f"Prefect Secret block {block_name!r} must hold a JSON object with 'username' and 'password'"
        )
    return value


def load_credentials(environ: dict[str, str] | None = None) -> Credentials:
    """Read the API credentials and organisation id from the environment."""
    env = os.environ if environ is None else environ
    organisation_id = env.get("TERRALAYR_ORGANISATION_ID", "")
    if not organisation_id:
        raise ConfigError("TERRALAYR_ORGANISATION_ID is not set; set it to your organisation's UUID")
    organisation_id = validate_entity_id(organisation_id, what="TERRALAYR_ORGANISATION_ID")

    block_name = env.get("TERRALAYR_PREFECT_SECRET")
    if block_name:
        secret = _credentials_from_prefect_secret(block_name)
        return Credentials(username=secret["username"], password=secret["password"], organisation_id=organisation_id)

    username = env.get("TERRALAYR_USERNAME", "")
    password = env.get("TERRALAYR_PASSWORD", "")
    missing = [name for name, value in (("TERRALAYR_USERNAME", username), ("TERRALAYR_PASSWORD", password)) if not value]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} not set; export the API credentials before running")
    return Credentials(username=username, password=password, organisation_id=organisation_id)
