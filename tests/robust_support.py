"""Helpers for the robustness tests: a small organisation, scripted replies and content digests.

The small organisation keeps end-to-end runs to seconds: two virtual assets in one portfolio,
one fleet and one physical asset. ``ScriptedReplies`` wraps the sandbox app and lets a test
queue one-off replies per path (an error status, a cut-off body, a changed body) in front of
the sandbox's real responses.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import duckdb
import msgspec
import pytest

from benchmarks.config_dir import dump_toml
from terralayr_etl.config import PROJECT_ROOT, Settings, load_settings
from terralayr_etl.sandbox.app import create_app
from terralayr_etl.sandbox.engine import Engine
from terralayr_etl.sandbox.faults import ResponseRecorder, bearer_token
from terralayr_etl.sandbox.organisation import Organisation, load_organisation
from terralayr_etl.sandbox.server import SandboxServer

ORGANISATION_ID = "5e2b9c1e-7d3a-4f0b-9a61-0c8e2d4b6a10"
USERNAME = "robust@terralayr.example"
PASSWORD = "robust-sandbox-password-7f3e"
VA_SMALL = "a1c3e5f7-1111-4a2b-8c3d-000000000001"
VA_LARGE = "a1c3e5f7-2222-4a2b-8c3d-000000000002"
PORTFOLIO = "b2d4f6a8-3333-4b5c-9d6e-000000000003"
FLEET = "c3e5a7b9-4444-4c6d-8e7f-000000000004"
PHYSICAL_ASSET = "d4f6b8c0-5555-4d7e-9f80-000000000005"

LINEAGE_COLUMNS = ("run_id", "fetched_at")

FAST_RETRIES = {
    "attempts": 6,
    "wait_initial_seconds": 0.05,
    "wait_max_seconds": 0.2,
    "wait_jitter_seconds": 0.05,
    "max_retry_after_seconds": 3.0,
    "total_timeout_seconds": 60.0,
}


@dataclass(frozen=True)
class SmallOrg:
    """A config folder for the small organisation, with its settings and organisation."""

    config_dir: Path
    settings: Settings
    organisation: Organisation


def write_small_org(
    folder: Path,
    *,
    api: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
    pipeline: dict[str, Any] | None = None,
    sandbox: dict[str, Any] | None = None,
) -> SmallOrg:
    """Write ``terralayr.toml`` and ``sandbox.toml`` of the small organisation into ``folder``.

    The keyword dicts override keys of the matching sections. Retries are fast by default.
    """
    with (PROJECT_ROOT / "config" / "terralayr.toml").open("rb") as handle:
        settings = tomllib.load(handle)
    # A discard address on loopback, so that a test without TERRALAYR_BASE_URL fails at once
    # instead of reaching the production API named in config/terralayr.toml.
    settings["api"].update(
        {"base_url": "http://127.0.0.1:9", "timeout_seconds": 10.0, "connect_timeout_seconds": 5.0, **(api or {})}
    )
    settings["retry"].update({**FAST_RETRIES, **(retry or {})})
    settings["pipeline"].update(pipeline or {})
    settings["fleets"] = [{"id": FLEET, "name": "Small fleet", "portfolio_ids": [PORTFOLIO]}]
    settings["physical_assets"] = [
        {"id": PHYSICAL_ASSET, "name": "Small BESS", "virtual_asset_ids": [VA_SMALL, VA_LARGE]}
    ]

    organisation = {
        "sandbox": {
            "organisation_id": ORGANISATION_ID,
            "username": USERNAME,
            "password": PASSWORD,
            "token_lifetime_seconds": 3600,
            "seed": 20241020,
            "page_max_values": 400000,
            **(sandbox or {}),
        },
        "virtual_assets": [
            {
                "id": VA_SMALL,
                "name": "VA-S",
                "portfolio_id": PORTFOLIO,
                "power_kw": 1000,
                "energy_kwh": 2000,
                "start": "2024-01-01",
                "end": "2031-01-01",
                "vba_hurdle_price_eur": 120,
            },
            {
                "id": VA_LARGE,
                "name": "VA-L",
                "portfolio_id": PORTFOLIO,
                "power_kw": 4000,
                "energy_kwh": 4000,
                "start": "2024-01-01",
                "end": "2031-01-01",
                "tolling_annual_price_eur_per_mw": 90000,
            },
        ],
        "fleets": [{"id": FLEET, "portfolio_ids": [PORTFOLIO]}],
        "physical_assets": [{"id": PHYSICAL_ASSET, "virtual_asset_ids": [VA_SMALL, VA_LARGE]}],
    }

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "terralayr.toml").write_text(dump_toml(settings), encoding="utf-8")
    (folder / "sandbox.toml").write_text(dump_toml(organisation), encoding="utf-8")
    return SmallOrg(
        config_dir=folder,
        settings=load_settings(folder / "terralayr.toml"),
        organisation=load_organisation(folder / "sandbox.toml"),
    )


def pipeline_env(org: SmallOrg, base_url: str) -> dict[str, str]:
    """Environment variables that point the pipeline at a sandbox serving ``org``."""
    return {
        "TERRALAYR_CONFIG_DIR": str(org.config_dir),
        "TERRALAYR_BASE_URL": base_url,
        "TERRALAYR_USERNAME": org.organisation.username,
        "TERRALAYR_PASSWORD": org.organisation.password,
        "TERRALAYR_ORGANISATION_ID": org.organisation.id,
    }


def apply_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


# Scripted replies in front of the sandbox


@dataclass
class Reply:
    """A reply a path sends once instead of, or on top of, the sandbox's response.

    ``status`` other than 200 sends the JSON error body with ``headers``. ``cut_off`` sends half
    of the real body under the full Content-Length and closes the connection. ``truncate``
    sends a 200 whose body is cut to half, with a matching Content-Length. ``rewrite`` changes
    the real body.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    cut_off: bool = False
    truncate: bool = False
    rewrite: Callable[[bytes], bytes] | None = None


@dataclass
class Served:
    path: str
    query: str
    status: int
    received_at: float
    """``time.monotonic()`` when the request arrived."""
    token: str | None
    """The bearer token the request carried, kept in memory for token-lifetime checks."""


class ScriptedReplies:
    """ASGI middleware: replies queued per path, and a record of every response's status."""

    def __init__(self, app: Any):
        self.app = app
        self._lock = threading.Lock()
        self._queues: dict[tuple[str, str], deque[Reply]] = {}
        self._rewrites: list[Callable[[str, str, bytes], bytes]] = []
        self._held_prefix: str | None = None
        self._release = threading.Event()
        self.served: list[Served] = []
        self.in_flight = 0
        self.max_in_flight = 0
        """Most requests the server was handling at once, from arrival to the last body byte sent."""

    def script(self, path: str, *replies: Reply, query_contains: str = "") -> None:
        """Queue replies for requests to ``path`` whose query string contains ``query_contains``."""
        with self._lock:
            self._queues.setdefault((path, query_contains), deque()).extend(replies)

    def rewrite_all(self, rewrite: Callable[[str, str, bytes], bytes] | None) -> None:
        """Pass every 200 body through ``rewrite(path, query, body)``; None stops rewriting."""
        with self._lock:
            self._rewrites = [rewrite] if rewrite else []

    def hold(self, path_prefix: str) -> None:
        """Make requests whose path starts with ``path_prefix`` wait until ``release``."""
        self._release.clear()
        self._held_prefix = path_prefix

    def release(self) -> None:
        self._release.set()

    def _pop_reply(self, path: str, query: str) -> Reply | None:
        with self._lock:
            for (queued_path, fragment), queue in self._queues.items():
                if queued_path == path and fragment in query and queue:
                    return queue.popleft()
        return None

    def served_to(self, path: str) -> list[Served]:
        with self._lock:
            return [item for item in self.served if item.path == path]

    def statuses(self) -> list[int]:
        with self._lock:
            return [item.status for item in self.served]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._serve(scope, receive, send)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _serve(self, scope, receive, send) -> None:
        path = scope["path"]
        query = unquote(scope.get("query_string", b"").decode("latin-1"))
        received_at = time.monotonic()
        token = bearer_token(scope)
        if self._held_prefix is not None and path.startswith(self._held_prefix):
            while not self._release.is_set():
                await asyncio.sleep(0.02)
        reply = self._pop_reply(path, query)
        with self._lock:
            rewrites = list(self._rewrites)

        if reply is not None and reply.status != 200:
            self._record(Served(path, query, reply.status, received_at, token))
            body = msgspec.json.encode({"error": {"code": "scripted", "message": f"scripted HTTP {reply.status}"}})
            headers = [(b"content-type", b"application/json"), *((k.lower().encode(), v.encode()) for k, v in reply.headers.items())]
            await _send(send, reply.status, headers, body)
            return

        recorder = ResponseRecorder()
        await self.app(scope, receive, recorder)
        body = recorder.body
        if recorder.status == 200:
            for rewrite in rewrites:
                body = rewrite(path, query, body)
            if reply is not None and reply.rewrite is not None:
                body = reply.rewrite(body)
        self._record(Served(path, query, recorder.status, received_at, token))

        if reply is not None and reply.cut_off:
            headers = _with_length(recorder.headers, len(body))
            await send({"type": "http.response.start", "status": recorder.status, "headers": headers})
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            return
        if reply is not None and reply.truncate:
            body = body[: len(body) // 2]
        await _send(send, recorder.status, recorder.headers, body)

    def _record(self, served: Served) -> None:
        with self._lock:
            self.served.append(served)


def _with_length(headers: list[tuple[bytes, bytes]], length: int) -> list[tuple[bytes, bytes]]:
    others = [(name, value) for name, value in headers if name.lower() != b"content-length"]
    return [*others, (b"content-length", str(length).encode())]


async def _send(send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": _with_length(headers, len(body))})
    await send({"type": "http.response.body", "body": body, "more_body": False})


@contextmanager
def serve_small_org(
    org: SmallOrg, *, faults: str | None = None, latency_ms: float = 0, scripted: bool = False
) -> Iterator[tuple[SandboxServer, ScriptedReplies | None]]:
    """Serve the small organisation on 127.0.0.1, optionally behind ScriptedReplies."""
    engine = Engine(org.organisation)
    app = create_app(org.settings, org.organisation, engine, latency_ms=latency_ms, faults=faults)
    wrapper = ScriptedReplies(app) if scripted else None
    server = SandboxServer(org.settings, org.organisation, engine=engine, app=wrapper or app)
    server.inner_app = app  # type: ignore[attr-defined]
    with server:
        yield server, wrapper


def issued_tokens(app: Any) -> list[str]:
    """Return every access token the sandbox app has issued."""
    store = app.state.api.tokens
    with store._lock:
        return list(store._expiry)


# Content digests


RAW_TABLES = ("datapoints", "revenue_buckets", "virtual_assets", "entity_members", "watermarks")
"""Tables the pipeline loads; every other table is built from them by the SQL models."""


def warehouse_digest(path: Path, *, exclude_categories: tuple[str, ...] = ()) -> dict[str, tuple[int, str]]:
    """Return (row count, md5 of the sorted rows) per table, without lineage columns and ``runs``.

    Rows whose ``category`` is in ``exclude_categories`` are left out of every table. Loaded
    tables are compared exactly. Tables the SQL models build sum doubles in whatever order the
    rows are stored, which differs in the last bits after upserts, so their doubles are
    rounded to 1e-6. The check tables keep one period per day, the one with the largest
    difference, and among tied periods DuckDB may return any, so their ``expected`` and
    ``actual`` are left out.
    """
    connection = duckdb.connect(str(path), read_only=True)
    try:
        connection.execute("set TimeZone = 'UTC'")
        tables = [
            row[0]
            for row in connection.execute(
                "select table_name from duckdb_tables() where table_name <> 'runs' order by table_name"
            ).fetchall()
        ]
        digests = {}
        for table in tables:
            columns = connection.execute(f"describe {table}").fetchall()
            selected = [
                _column_expression(table, name, column_type)
                for name, column_type, *_ in columns
                if _compared(table, name)
            ]
            where = _category_filter([column[0] for column in columns], exclude_categories)
            digests[table] = _digest(connection, f"select {', '.join(selected)} from {table} {where}")
        return digests
    finally:
        connection.close()


def parquet_digest(data_dir: Path, *, exclude_categories: tuple[str, ...] = ()) -> dict[str, tuple[int, str]]:
    """Return (row count, md5) per Parquet dataset, read through DuckDB with each file's relative path."""
    connection = duckdb.connect()
    try:
        connection.execute("set TimeZone = 'UTC'")
        digests = {}
        for dataset in ("datapoints", "revenue_buckets"):
            root = data_dir.resolve() / "parquet" / dataset
            files = sorted(str(path) for path in root.rglob("*.parquet"))
            if not files:
                digests[dataset] = (0, "")
                continue
            source = f"read_parquet({files!r}, hive_partitioning = true, filename = true)"
            columns = [row[0] for row in connection.execute(f"describe select * from {source}").fetchall()]
            selected = [
                f"replace(filename, '{root}/', '') as filename" if name == "filename" else f'"{name}"'
                for name in columns
                if name not in LINEAGE_COLUMNS
            ]
            where = _category_filter(columns, exclude_categories)
            digests[dataset] = _digest(connection, f"select {', '.join(selected)} from {source} {where}")
        return digests
    finally:
        connection.close()


def _compared(table: str, column: str) -> bool:
    if column in LINEAGE_COLUMNS:
        return False
    return not (table.startswith("check_") and column in ("expected", "actual"))


def _column_expression(table: str, column: str, column_type: str) -> str:
    if table not in RAW_TABLES and column_type == "DOUBLE":
        # Adding 0.0 turns a rounded -0.0 into 0.0.
        return f'round("{column}", 6) + 0.0 as "{column}"'
    return f'"{column}"'


def _category_filter(columns: list[str], exclude_categories: tuple[str, ...]) -> str:
    if "category" not in columns or not exclude_categories:
        return ""
    names = ", ".join(f"'{name}'" for name in exclude_categories)
    return f"where category is null or category not in ({names})"


def _digest(connection: duckdb.DuckDBPyConnection, query: str) -> tuple[int, str]:
    row = connection.execute(
        f"select count(*), coalesce(md5(string_agg(t::varchar, chr(10) order by t::varchar)), '') from ({query}) t"
    ).fetchone()
    return int(row[0]), str(row[1])


def wait_for(predicate: Callable[[], bool], timeout_seconds: float, description: str) -> None:
    """Poll ``predicate`` every 20 ms until it is true; fail the test after the timeout."""
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_seconds} s waiting for {description}")
        time.sleep(0.02)




def harness_api_url() -> str:
    """Return the API URL of the Prefect server that ``prefect_harness`` started, for subprocesses."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def cli_env(org: SmallOrg, base_url: str, **extra: str) -> dict[str, str]:
    """Environment for a ``terralayr-etl`` subprocess against a sandbox on loopback."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("TERRALAYR_")}
    env.update(pipeline_env(org, base_url))
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout_seconds: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``terralayr-etl`` from the project's venv and return its exit code and output."""
    executable = Path(sys.executable).with_name("terralayr-etl")
    return subprocess.run(
        [str(executable), *args], env=env, capture_output=True, text=True, timeout=timeout_seconds, check=False
    )


def datapoints_path(entity_type: str, entity_id: str) -> str:
    folder = {
        "virtual_asset": "virtual-assets",
        "portfolio": "portfolios",
        "fleet": "fleets",
        "physical_asset": "physical-assets",
    }[entity_type]
    return f"/revenue-reporting/{folder}/{entity_id}/datapoints"
