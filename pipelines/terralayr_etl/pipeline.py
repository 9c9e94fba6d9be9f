"""The pipeline's steps as plain functions: discover the entities and plan the request windows.

Fetching one window lives in ``fetching.py``. The Prefect flow in ``flows.py`` calls these;
tests call them without Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

import pyarrow as pa

from terralayr_etl.client import ApiClient, plan_bucket_windows, plan_windows
from terralayr_etl.config import RESOLUTIONS, Settings
from terralayr_etl.errors import ConfigError, InvalidEntityIdError, MalformedResponseError
from terralayr_etl.ids import validate_entity_id
from terralayr_etl.quarantine import Quarantine
from terralayr_etl.timeutil import LOCAL_TZ, local_day_of, local_midnight, parse_day

logger = logging.getLogger("terralayr_etl.pipeline")

BUCKET_PRODUCTS = ("wholesale", "ancillary", "tolling", "vba")


@dataclass(frozen=True)
class Entity:
    entity_type: str
    entity_id: str
    active_from: datetime
    active_to: datetime
    """Half-open span in which at least one member virtual asset is active (UTC)."""


@dataclass(frozen=True)
class Discovery:
    virtual_assets: tuple[dict, ...]
    """The accepted virtual-asset objects as the API returned them."""
    entities: tuple[Entity, ...]
    members: tuple[tuple[str, str, str], ...]
    """(entity_type, entity_id, virtual_asset_id) rows; a virtual asset lists itself."""
    rejected: tuple[str, ...] = ()
    """One message per virtual-asset object left out because its id or lifetime is invalid."""


@dataclass(frozen=True)
class FetchJob:
    """One request window: data points of an entity at a resolution, or revenue buckets."""

    entity_type: str
    entity_id: str
    resolution: str
    window_start: datetime
    window_end: datetime
    product: str | None = None

    def describe(self) -> str:
        what = f"{self.product} buckets" if self.product else self.resolution
        return f"{self.entity_type} {self.entity_id} {what} {self.window_start:%Y-%m-%dT%H:%MZ}..{self.window_end:%Y-%m-%dT%H:%MZ}"

    def slug(self) -> str:
        """Return a file-name-safe label: ids are validated, the rest are fixed names and digits."""
        series = self.product or self.resolution
        return f"{self.entity_type}-{self.entity_id}-{series}-{self.window_start:%Y%m%dT%H%MZ}"

    def series_key(self) -> tuple[str, str, str]:
        """Return the watermark key (entity_type, entity_id, resolution) this window advances."""
        return self.entity_type, self.entity_id, self.resolution

    def as_dict(self) -> dict[str, str | None]:
        return {
            "entity_type": self.entity_type,
            "entity_id": self.entity_id,
            "resolution": self.resolution,
            "product": self.product,
            "window_start": self.window_start.isoformat(),
            "window_end": self.window_end.isoformat(),
        }


@dataclass
class WindowResult:
    job: FetchJob
    files: list[str] = field(default_factory=list)
    rows: int = 0
    pages: int = 0
    unknown_categories: tuple[str, ...] = ()
    duplicate_instants: int = 0
    missing_categories: tuple[str, ...] = ()
    """Requested documented categories still absent after every re-fetch; loaded without them."""
    fetches: int = 1
    """Fetches of the whole window: 1 plus the re-fetches after a malformed or incomplete response."""
    outside_rows: pa.Table | None = None
    """Rows the API sent outside ``[window_start, window_end)``, resolved by ``boundaries.py``."""


def _parse_api_instant(value: object, field_name: str, asset_id: str) -> datetime:
    if not isinstance(value, str):
        raise MalformedResponseError(f"virtual asset {asset_id!r} has {field_name}={value!r}; expected an RFC 3339 string")
    try:
        instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise MalformedResponseError(f"virtual asset {asset_id!r} has {field_name}={value!r}; expected an RFC 3339 string") from None
    if instant.tzinfo is None:
        raise MalformedResponseError(f"virtual asset {asset_id!r} has {field_name}={value!r} without a UTC offset")
    return instant


def _list_virtual_assets(
    client: ApiClient, start: datetime, end: datetime, quarantine: Quarantine | None, refetch_attempts: int
) -> list[dict]:
    for attempt in range(1, refetch_attempts + 2):
        try:
            return client.list_virtual_assets(start, end)
        except MalformedResponseError as exc:
            if quarantine is not None:
                request = {"path": exc.endpoint, "params": exc.params}
                quarantine.add("virtual-assets", exc, request=request, body=exc.body, attempt=attempt)
            if attempt > refetch_attempts:
                where = f"; the payloads are in {quarantine.folder}" if quarantine is not None else ""
                raise MalformedResponseError(
                    f"the virtual-asset list could not be parsed in {attempt} fetches, so the run stopped{where}. "
                    f"Last error: {exc}"
                ) from None
            logger.warning("Listing the virtual assets again (%d of %d re-fetches): %s", attempt, refetch_attempts, exc)
    raise AssertionError("the re-fetch loop ended without a result")


def _span(spans: Iterable[tuple[datetime, datetime]]) -> tuple[datetime, datetime]:
    spans = list(spans)
    return min(start for start, _ in spans), max(end for _, end in spans)


def discover(
    client: ApiClient,
    settings: Settings,
    start_day: date,
    end_day: date,
    *,
    quarantine: Quarantine | None = None,
    refetch_attempts: int = 0,
) -> Discovery:
    """List the virtual assets active in ``[start_day, end_day)`` and derive every entity.

    Portfolios come from each virtual asset's ``portfolioID``; fleets and physical assets from
    the config, since no endpoint lists them. Aggregates without an active member are skipped.
    A virtual asset with an invalid id or lifetime is left out and listed in ``rejected``. A
    listing that cannot be parsed is quarantined and fetched again up to ``refetch_attempts``
    times.
    """
    window_start, window_end = local_midnight(start_day), local_midnight(end_day)
    assets = _list_virtual_assets(client, window_start, window_end, quarantine, refetch_attempts)

    lifetimes: dict[str, tuple[datetime, datetime]] = {}
    portfolio_members: dict[str, list[str]] = {}
    accepted: list[dict] = []
    rejected: list[str] = []
    for asset in assets:
        try:
            asset_id = validate_entity_id(asset.get("id"), what="virtual asset id")
            portfolio_id = validate_entity_id(asset.get("portfolioID"), what=f"portfolioID of virtual asset {asset_id}")
            lifetime = (
                _parse_api_instant(asset.get("start"), "start", asset_id),
                _parse_api_instant(asset.get("end"), "end", asset_id),
            )
        except (InvalidEntityIdError, MalformedResponseError) as exc:
            # One bad object must not hide the organisation's other assets; the run reports it.
            logger.error("Skipping a virtual asset from the API: %s", exc)
            rejected.append(str(exc))
            continue
        lifetimes[asset_id] = lifetime
        portfolio_members.setdefault(portfolio_id, []).append(asset_id)
        accepted.append(asset)

    groups: list[tuple[str, str, list[str]]] = [("virtual_asset", asset_id, [asset_id]) for asset_id in lifetimes]
    groups += [("portfolio", portfolio_id, members) for portfolio_id, members in portfolio_members.items()]
    for fleet in settings.fleets:
        members = [asset_id for portfolio_id in fleet.portfolio_ids for asset_id in portfolio_members.get(portfolio_id, [])]
        groups.append(("fleet", fleet.id, members))
    for physical_asset in settings.physical_assets:
        members = [asset_id for asset_id in physical_asset.virtual_asset_ids if asset_id in lifetimes]
        groups.append(("physical_asset", physical_asset.id, members))

    entities, member_rows = [], []
    for entity_type, entity_id, members in groups:
        if not members:
            logger.warning("Skipping %s %s: none of its virtual assets is active in the window", entity_type, entity_id)
            continue
        active_from, active_to = _span(lifetimes[asset_id] for asset_id in members)
        entities.append(Entity(entity_type, entity_id, active_from, active_to))
        member_rows += [(entity_type, entity_id, asset_id) for asset_id in members]

    logger.info(
        "Discovered virtual assets: %d, portfolios: %d, fleets: %d, physical assets: %d",
        *(sum(1 for entity in entities if entity.entity_type == kind) for kind in ("virtual_asset", "portfolio", "fleet", "physical_asset")),
    )
    return Discovery(tuple(accepted), tuple(entities), tuple(member_rows), tuple(rejected))


def plan_jobs(
    discovery: Discovery,
    settings: Settings,
    resolutions: Iterable[str],
    start_day: date,
    end_day: date,
    starts: Mapping[tuple[str, str, str], date] | None = None,
) -> list[FetchJob]:
    """Plan every request window, skipping windows outside an entity's active span.

    ``starts`` gives the first local day per (entity_type, entity_id, resolution), as an
    incremental run derives it from the watermarks. A key it lacks starts at ``start_day``.
    Revenue buckets of a virtual asset start at the earliest of its resolutions' first days.
    """
    resolutions = list(resolutions)
    starts = starts or {}
    planned: dict[tuple[str, date], list[tuple[datetime, datetime]]] = {}

    def windows_of(resolution: str, first_day: date) -> list[tuple[datetime, datetime]]:
        if (resolution, first_day) not in planned:
            planned[(resolution, first_day)] = plan_windows(resolution, first_day, end_day, settings)
        return planned[(resolution, first_day)]

    jobs: list[FetchJob] = []
    for entity in discovery.entities:
        first_days = []
        for resolution in resolutions:
            first_day = starts.get((entity.entity_type, entity.entity_id, resolution), start_day)
            first_days.append(first_day)
            for window_start, window_end in windows_of(resolution, first_day):
                if window_start < entity.active_to and entity.active_from < window_end:
                    jobs.append(FetchJob(entity.entity_type, entity.entity_id, resolution, window_start, window_end))
        if entity.entity_type == "virtual_asset" and settings.pipeline.fetch_revenue_buckets and first_days:
            for window_start, window_end in plan_bucket_windows(min(first_days), end_day, settings):
                if window_start < entity.active_to and entity.active_from < window_end:
                    for product in BUCKET_PRODUCTS:
                        jobs.append(FetchJob(entity.entity_type, entity.entity_id, "daily", window_start, window_end, product))
    return jobs


def plan_starts(
    discovery: Discovery,
    resolutions: Iterable[str],
    watermarks: Mapping[tuple[str, str, str], datetime],
    settings: Settings,
) -> dict[tuple[str, str, str], date]:
    """Return each (entity_type, entity_id, resolution)'s first day for an incremental run.

    That is the local day of its own watermark minus ``pipeline.lookback_days``, or
    ``pipeline.history_start`` for a series without a watermark.
    """
    starts = {}
    for entity in discovery.entities:
        for resolution in resolutions:
            key = (entity.entity_type, entity.entity_id, resolution)
            starts[key] = lookback_start(watermarks.get(key), settings)
    return starts


def default_end_day(today: date | None = None) -> date:
    """Return the exclusive end of a nightly run: today, so the last complete day is yesterday."""
    return today or datetime.now(LOCAL_TZ).date()


def lookback_start(watermark: datetime | None, settings: Settings) -> date:
    """First day to fetch: the watermark's local day minus the lookback, or the history start."""
    if watermark is None:
        return settings.pipeline.history_start
    return local_day_of(watermark) - timedelta(days=settings.pipeline.lookback_days)


@dataclass(frozen=True)
class RunSpan:
    """The local days a run covers. ``end_day`` is exclusive."""

    first_day: date
    """First day for series without a start of their own (all series unless incremental)."""
    end_day: date
    incremental: bool
    """True when each series starts at its own watermark minus the lookback."""


def resolve_span(start: str | None, end: str | None, settings: Settings, today: date | None = None) -> RunSpan:
    """Turn the ``--start`` and ``--end`` texts into the run's days.

    Without ``start`` the run is incremental: discovery covers ``pipeline.history_start`` to
    the end, so that series without a watermark start there. Raises ConfigError for an invalid
    date or an end that is not after the start.
    """
    end_day = parse_day(end, option="--end") if end else default_end_day(today)
    if start:
        first_day = parse_day(start, option="--start")
        if end_day <= first_day:
            raise ConfigError(f"--end {end_day} is not after --start {first_day}; --end is the day after the last day to fetch")
        return RunSpan(first_day, end_day, incremental=False)

    history_start = settings.pipeline.history_start
    if end_day <= history_start:
        raise ConfigError(
            f"pipeline.history_start {history_start} is not before the end day {end_day}; "
            "set an earlier history_start or pass --end"
        )
    return RunSpan(history_start, end_day, incremental=True)


def check_resolutions(names: Iterable[str], settings: Settings) -> list[str]:
    """Return the resolution names, or raise ConfigError naming an unknown or unconfigured one."""
    names = list(dict.fromkeys(names))
    for name in names:
        if name not in RESOLUTIONS:
            raise ConfigError(f"unknown resolution {name!r}; use one of {', '.join(RESOLUTIONS)}")
        if name not in settings.api.resolutions or name not in settings.api.max_range_days:
            raise ConfigError(
                f"resolution {name!r} needs an entry in api.resolutions and api.max_range_days of the config"
            )
    if not names:
        raise ConfigError("no resolution given; pass --resolution or set pipeline.resolutions")
    return names
