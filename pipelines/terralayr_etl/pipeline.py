"""The pipeline's steps as plain functions: discover, plan, fetch one window, load.

The Prefect flow in ``flows.py`` calls these; tests call them without Prefect.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from terralayr_etl.client import ApiClient, plan_bucket_windows, plan_windows
from terralayr_etl.config import Settings
from terralayr_etl.errors import MalformedResponseError
from terralayr_etl.ids import validate_entity_id
from terralayr_etl.normalise import normalise_datapoints, normalise_revenue_buckets
from terralayr_etl.storage import ParquetStore
from terralayr_etl.timeutil import local_midnight

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
    entities: tuple[Entity, ...]
    members: tuple[tuple[str, str, str], ...]
    """(entity_type, entity_id, virtual_asset_id) rows; a virtual asset lists itself."""


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


@dataclass
class WindowResult:
    job: FetchJob
    files: list[str] = field(default_factory=list)
    rows: int = 0
    pages: int = 0
    unknown_categories: tuple[str, ...] = ()
    duplicate_instants: int = 0


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


def _span(spans: Iterable[tuple[datetime, datetime]]) -> tuple[datetime, datetime]:
    spans = list(spans)
    return min(start for start, _ in spans), max(end for _, end in spans)


def discover(client: ApiClient, settings: Settings, start_day: date, end_day: date) -> Discovery:
    """List the virtual assets active in ``[start_day, end_day)`` and derive every entity.

    Portfolios come from each virtual asset's ``portfolioID``; fleets and physical assets from
    the config, since no endpoint lists them. Aggregates without an active member are skipped.
    """
    window_start, window_end = local_midnight(start_day), local_midnight(end_day)
    assets = client.list_virtual_assets(window_start, window_end)

    lifetimes: dict[str, tuple[datetime, datetime]] = {}
    portfolio_members: dict[str, list[str]] = {}
    for asset in assets:
        asset_id = validate_entity_id(asset.get("id"), what="virtual asset id")
        portfolio_id = validate_entity_id(asset.get("portfolioID"), what=f"portfolioID of virtual asset {asset_id}")
        lifetimes[asset_id] = (
            _parse_api_instant(asset.get("start"), "start", asset_id),
            _parse_api_instant(asset.get("end"), "end", asset_id),
        )
        portfolio_members.setdefault(portfolio_id, []).append(asset_id)

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
        "Discovered %d virtual assets, %d portfolios, %d fleets, %d physical assets",
        *(sum(1 for entity in entities if entity.entity_type == kind) for kind in ("virtual_asset", "portfolio", "fleet", "physical_asset")),
    )
    return Discovery(tuple(assets), tuple(entities), tuple(member_rows))


def plan_jobs(
    discovery: Discovery, settings: Settings, resolutions: Iterable[str], start_day: date, end_day: date
) -> list[FetchJob]:
    """Plan every request window, skipping windows outside an entity's active span."""
    resolutions = list(resolutions)
    jobs: list[FetchJob] = []
    for entity in discovery.entities:
        for resolution in resolutions:
            for window_start, window_end in plan_windows(resolution, start_day, end_day, settings):
                if window_start < entity.active_to and entity.active_from < window_end:
                    jobs.append(FetchJob(entity.entity_type, entity.entity_id, resolution, window_start, window_end))
        if entity.entity_type == "virtual_asset" and settings.pipeline.fetch_revenue_buckets:
            for window_start, window_end in plan_bucket_windows(start_day, end_day, settings):
                if window_start < entity.active_to and entity.active_from < window_end:
                    for product in BUCKET_PRODUCTS:
                        jobs.append(FetchJob(entity.entity_type, entity.entity_id, "daily", window_start, window_end, product))
    return jobs


def fetch_window(client: ApiClient, store: ParquetStore, job: FetchJob, run_id: str) -> WindowResult:
    """Fetch one window, normalise every page and write it to Parquet.

    The window's pages are normalised in full before anything is written, so a page that
    cannot be parsed leaves no partial window behind.
    """
    result = WindowResult(job)
    if job.product:
        response = client.fetch_revenue_buckets(job.entity_id, job.product, job.window_start, job.window_end)
        table = normalise_revenue_buckets(
            response.body,
            virtual_asset_id=job.entity_id,
            product=job.product,
            run_id=run_id,
            fetched_at=response.fetched_at,
            endpoint=response.endpoint,
        )
        result.pages = 1
        result.rows = table.num_rows
        result.files = [str(path) for path in store.write_revenue_buckets(table)]
        return result

    responses = client.fetch_datapoints(job.entity_type, job.entity_id, job.resolution, job.window_start, job.window_end)
    pages = [
        normalise_datapoints(
            response.body,
            entity_type=job.entity_type,
            entity_id=job.entity_id,
            resolution=job.resolution,
            run_id=run_id,
            fetched_at=response.fetched_at,
            endpoint=response.endpoint,
        )
        for response in responses
    ]
    import pyarrow as pa

    table = pa.concat_tables([page.table for page in pages]) if pages else None
    result.pages = len(pages)
    result.unknown_categories = tuple(sorted({name for page in pages for name in page.unknown_categories}))
    result.duplicate_instants = sum(page.duplicate_instants for page in pages)
    if table is not None and table.num_rows:
        result.rows = table.num_rows
        result.files = [str(path) for path in store.write_datapoints(table)]
    logger.info("Fetched %s: %d pages, %d rows", job.describe(), result.pages, result.rows)
    return result


def default_end_day(today: date | None = None) -> date:
    """The exclusive end of a nightly run: today, so the last complete day is yesterday."""
    from terralayr_etl.timeutil import LOCAL_TZ

    return today or datetime.now(LOCAL_TZ).date()


def lookback_start(watermark: datetime | None, settings: Settings) -> date:
    """First day to fetch: the watermark's day minus the lookback, or the history start."""
    if watermark is None:
        return settings.pipeline.history_start
    from terralayr_etl.timeutil import local_day_of

    return local_day_of(watermark) - timedelta(days=settings.pipeline.lookback_days)
