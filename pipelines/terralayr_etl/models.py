"""Build the SQL models of ``sql/`` in DuckDB and collect the results of the checks.

``run_models`` writes the seed table ``category_rules`` from ``terralayr_etl.categories`` and
the one-row table ``check_scope`` with the local days the checks compare, executes the macro
files in ``sql/macros`` as written, and then turns every ``.sql`` file
under ``sql/staging``, ``sql/marts`` and ``sql/checks`` into
``create or replace view|table <file stem> as <file contents>``. A model is built after
every model whose name appears in its SQL. The first line ``-- materialized: table`` or
``-- materialized: view`` picks the form; without it the model is a view.

Each check model returns comparison rows with the columns ``check_name, entity_type,
entity_id, category, period, expected, actual, difference, tolerance``. ``run_checks``
unites them into the table ``check_results`` and adds ``status``.
"""

from __future__ import annotations

import heapq
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import duckdb

from terralayr_etl.categories import CATEGORIES, DAYS_PER_YEAR
from terralayr_etl.config import PROJECT_ROOT
from terralayr_etl.errors import TerralayrError, one_line
from terralayr_etl.timeutil import day_range, local_day_of, local_midnight

log = logging.getLogger(__name__)

DEFAULT_SQL_DIR = PROJECT_ROOT / "sql"

MODEL_PREFIXES = {"staging": "stg_", "marts": "mart_", "checks": "check_"}
"""Model folders in build priority, with the prefix every model name in them must carry.
The prefixes keep a model from replacing a warehouse table of the same name."""

MACRO_FOLDER = "macros"
SEED_TABLE = "category_rules"
CHECK_SCOPE_TABLE = "check_scope"
"""One row: the local days ``[first_day, end_day)`` whose data points and buckets the checks
compare, with the UTC instants of their bounds."""
CHECK_RESULTS_TABLE = "check_results"
MAX_FAILING_ROWS = 20

CHECK_CHUNK_ROWS = 500_000
"""Stored data-point rows the checks compare at a time, rounded to whole local days (at least
one). The checks use about 0.7 KB per compared row: on W1's warehouse (13.5M rows, 90 days)
one pass over every day peaked at 9.5 GB, one to seven days at 331 to 953 MB. Each chunk
after the first rebuilds only the check tables, appending its rows."""

CHECK_COLUMNS = (
    "check_name",
    "entity_type",
    "entity_id",
    "category",
    "period",
    "expected",
    "actual",
    "difference",
    "tolerance",
)

_MODEL_NAME = re.compile(r"[a-z][a-z0-9_]*")
_MATERIALIZED = re.compile(r"--\s*materialized\s*:\s*(\S+)\s*")
_COMMENTS_AND_STRINGS = re.compile(r"--[^\n]*|/\*.*?\*/|'(?:[^']|'')*'", re.DOTALL)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ModelError(TerralayrError):
    """A SQL model file is invalid, its references form a cycle, or it failed to build."""


@dataclass(frozen=True)
class Model:
    """One SQL file under ``sql/`` and how to build it."""

    name: str
    path: Path
    folder: str
    materialized: str
    sql: str
    depends_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckSummary:
    """Counts of ``check_results`` rows and the first failing rows."""

    total: int
    passed: int
    failed: int
    by_check: dict[str, dict[str, int]]
    """Row counts per check name and status, such as ``{"rollup_daily": {"pass": 40, "fail": 1}}``."""
    failing_rows: list[dict[str, object]] = field(default_factory=list)
    """At most ``MAX_FAILING_ROWS`` failing rows, ``period`` as an ISO date string."""


def discover_models(sql_dir: Path | None = None) -> dict[str, Model]:
    """Read the model files under ``sql_dir`` and the models each one references.

    Raises ModelError for a missing directory, a badly named file, an unknown
    materialization or two files with the same name.
    """
    sql_dir = Path(sql_dir or DEFAULT_SQL_DIR)
    if not sql_dir.is_dir():
        raise ModelError(
            f"SQL model directory {sql_dir} not found; pass the folder that holds staging/, marts/ and checks/"
        )

    models: dict[str, Model] = {}
    for folder, prefix in MODEL_PREFIXES.items():
        for path in sorted((sql_dir / folder).rglob("*.sql")):
            model = _read_model(path, folder, prefix)
            if model.name in models:
                raise ModelError(
                    f"two SQL models are named {model.name}: {models[model.name].path} and {path}; rename one"
                )
            models[model.name] = model

    names = set(models)
    return {
        name: Model(
            name=model.name,
            path=model.path,
            folder=model.folder,
            materialized=model.materialized,
            sql=model.sql,
            depends_on=tuple(sorted(_referenced_names(model.sql, names - {name}))),
        )
        for name, model in models.items()
    }


def build_order(models: dict[str, Model]) -> list[str]:
    """Order the models so that each comes after the models it references.

    Among models that are ready, staging comes before marts before checks, then by name.
    Raises ModelError naming the files of a reference cycle.
    """
    folder_rank = {folder: rank for rank, folder in enumerate(MODEL_PREFIXES)}
    waiting_on = {name: set(model.depends_on) for name, model in models.items()}
    dependents: dict[str, list[str]] = {name: [] for name in models}
    for name, model in models.items():
        for dependency in model.depends_on:
            dependents[dependency].append(name)

    ready = [(folder_rank[models[name].folder], name) for name, deps in waiting_on.items() if not deps]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, name = heapq.heappop(ready)
        order.append(name)
        for dependent in dependents[name]:
            waiting_on[dependent].discard(name)
            if not waiting_on[dependent]:
                heapq.heappush(ready, (folder_rank[models[dependent].folder], dependent))

    if len(order) < len(models):
        cycle = _find_cycle(models, {name for name in models if name not in order})
        chain = " -> ".join(f"{name} ({models[name].path})" for name in cycle)
        raise ModelError(f"SQL models reference each other in a cycle: {chain}; remove one of these references")
    return order


def run_models(
    connection: duckdb.DuckDBPyConnection,
    sql_dir: Path | None = None,
    *,
    check_days: tuple[date, date] | None = None,
    chunk_rows: int = CHECK_CHUNK_ROWS,
) -> list[str]:
    """Build the seed tables, the macros and every model, in one transaction.

    ``check_days`` is a range of local days ``(first, end)``, end exclusive. The check models
    then compare only the data points and buckets of those days, and an empty range checks
    nothing. None checks every day. The staging views and marts always cover every day.

    The check tables are built in chunks of whole days with about ``chunk_rows`` stored data
    points each, so their memory follows the chunk instead of the range. The result is the
    same as in one pass: afterwards ``check_scope`` contains the whole range and each check table
    the rows of every chunk.

    Returns the model names in the order built. On an error nothing is changed and
    ModelError names the file that failed.

    Example::

        with Warehouse(path) as warehouse:
            built = run_models(warehouse.connection)
            summary = run_checks(warehouse.connection)
    """
    sql_dir = Path(sql_dir or DEFAULT_SQL_DIR)
    models = discover_models(sql_dir)
    order = build_order(models)
    scoped_tables = _scoped_tables(models, order)
    started = time.perf_counter()

    # The roll-up check cuts UTC hours with date_trunc, which follows the session time zone.
    # The warehouse already pins it to UTC; pinning it here keeps other callers correct too.
    connection.execute("set TimeZone = 'UTC'")

    chunks = _check_chunks(connection, check_days, chunk_rows) if scoped_tables else [check_days]
    connection.begin()
    try:
        _write_category_rules(connection)
        _write_check_scope(connection, chunks[0])
        for path in sorted((sql_dir / MACRO_FOLDER).glob("*.sql")):
            _execute_file(connection, path)
        for name in order:
            _build_model(connection, models[name])
        for chunk in chunks[1:]:
            _write_check_scope(connection, chunk)
            for name in scoped_tables or ():
                _append_to_model(connection, models[name])
        if len(chunks) > 1:
            _write_check_scope(connection, check_days)
        connection.commit()
    except BaseException:
        connection.rollback()
        raise

    chunked = f" (check tables in {len(chunks)} chunks of days)" if len(chunks) > 1 else ""
    log.info("Built %d SQL models from %s in %.1f s%s", len(order), sql_dir, time.perf_counter() - started, chunked)
    return order


def run_checks(
    connection: duckdb.DuckDBPyConnection,
    sql_dir: Path | None = None,
    *,
    max_failing_rows: int = MAX_FAILING_ROWS,
) -> CheckSummary:
    """Unite the check models into ``check_results`` and count passes and failures.

    A row passes when ``abs(difference) <= tolerance`` or when expected and actual are both
    null. Call ``run_models`` first; ModelError names any check model that is not built.
    """
    models = discover_models(sql_dir)
    check_names = [name for name, model in models.items() if model.folder == "checks"]
    missing = [name for name in check_names if _object_type(connection, name) is None]
    if missing:
        raise ModelError(f"check models {', '.join(missing)} are not built; call run_models before run_checks")

    try:
        connection.execute(
            f"create or replace table {CHECK_RESULTS_TABLE} as\n"
            "select\n"
            "    comparisons.*,\n"
            "    case when comparison_severity(expected, actual, tolerance) <= 0 then 'pass' else 'fail' end\n"
            "        as status\n"
            f"from (\n{_union_of_checks(check_names)}\n) as comparisons"
        )
    except duckdb.Error as exc:
        raise ModelError(f"building {CHECK_RESULTS_TABLE} failed: {exc}; rebuild the models with run_models") from exc

    by_check: dict[str, dict[str, int]] = {}
    counts = connection.execute(
        f"select check_name, status, count(*) from {CHECK_RESULTS_TABLE} group by all order by all"
    ).fetchall()
    for check_name, status, count in counts:
        by_check.setdefault(check_name, {"pass": 0, "fail": 0})[status] = count

    passed = sum(statuses["pass"] for statuses in by_check.values())
    failed = sum(statuses["fail"] for statuses in by_check.values())
    summary = CheckSummary(
        total=passed + failed,
        passed=passed,
        failed=failed,
        by_check=by_check,
        failing_rows=_failing_rows(connection, max_failing_rows),
    )

    log.info("Checks: %s comparisons, %s passed, %s failed", f"{summary.total:,}", f"{passed:,}", f"{failed:,}")
    for check_name, statuses in by_check.items():
        if statuses["fail"]:
            log.warning("Check %s failed on %s of %s rows", check_name, f"{statuses['fail']:,}", f"{sum(statuses.values()):,}")
    return summary


def _read_model(path: Path, folder: str, prefix: str) -> Model:
    name = path.stem
    if not _MODEL_NAME.fullmatch(name) or not name.startswith(prefix):
        raise ModelError(
            f"invalid SQL model file name {path}: models in sql/{folder} are named {prefix}<name>.sql "
            "with lowercase letters, digits and '_'"
        )

    sql = path.read_text(encoding="utf-8").rstrip().rstrip(";").rstrip()
    if not sql:
        raise ModelError(f"SQL model file {path} is empty; write a select statement or delete the file")

    materialized = "view"
    first_line = sql.lstrip().splitlines()[0]
    match = _MATERIALIZED.fullmatch(first_line.strip())
    if match:
        materialized = match.group(1).lower()
        if materialized not in ("view", "table"):
            raise ModelError(
                f"invalid materialization {match.group(1)!r} in the first non-blank line of {path}; "
                "use '-- materialized: table' or '-- materialized: view'"
            )
    return Model(name=name, path=path, folder=folder, materialized=materialized, sql=sql)


def _referenced_names(sql: str, names: set[str]) -> set[str]:
    """Return the names in ``names`` that occur as identifiers outside comments and strings."""
    code = _COMMENTS_AND_STRINGS.sub(" ", sql)
    return {token.lower() for token in _IDENTIFIER.findall(code)} & names


def _find_cycle(models: dict[str, Model], blocked: set[str]) -> list[str]:
    """Return one reference cycle among ``blocked`` (each model references the next), closed."""
    # Every blocked model waits on another blocked model, so following those references
    # from any blocked model must revisit a model.
    path: list[str] = []
    position: dict[str, int] = {}
    name = min(blocked)
    while name not in position:
        position[name] = len(path)
        path.append(name)
        name = min(dependency for dependency in models[name].depends_on if dependency in blocked)
    return path[position[name]:] + [name]


def _object_type(connection: duckdb.DuckDBPyConnection, name: str) -> str | None:
    row = connection.execute(
        "select table_type from information_schema.tables "
        "where table_catalog = current_database() and table_schema = current_schema() and table_name = ?",
        [name],
    ).fetchone()
    return row[0] if row else None


def _scoped_tables(models: dict[str, Model], order: list[str]) -> list[str] | None:
    """Return the table models that read ``check_scope``, directly or through views, in build order.

    Returns None when one of them reads another such table, because appending chunk by chunk
    would then read the other table's earlier chunks again. The checks then run in one pass.
    """
    scoped: set[str] = set()
    for name in order:
        model = models[name]
        if _referenced_names(model.sql, {CHECK_SCOPE_TABLE}) or scoped.intersection(model.depends_on):
            scoped.add(name)
    tables = [name for name in order if name in scoped and models[name].materialized == "table"]
    for name in tables:
        upstream = _scoped_closure(models, [dependency for dependency in models[name].depends_on if dependency in scoped], scoped)
        if any(models[dependency].materialized == "table" for dependency in upstream):
            return None
    return tables


def _scoped_closure(models: dict[str, Model], names: list[str], scoped: set[str]) -> set[str]:
    """Return ``names`` and every scoped model they read, directly or indirectly."""
    seen: set[str] = set()
    pending = list(names)
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        pending.extend(dependency for dependency in models[name].depends_on if dependency in scoped)
    return seen


def _check_chunks(
    connection: duckdb.DuckDBPyConnection, check_days: tuple[date, date] | None, chunk_rows: int
) -> list[tuple[date, date] | None]:
    """Split ``check_days`` (None: the days of the stored rows) into ranges of about ``chunk_rows`` rows."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows {chunk_rows} is below 1; pass a positive number of rows")
    if _object_type(connection, "datapoints") is None:
        return [check_days]
    if check_days is None:
        first, last, rows = connection.execute(
            "select min(period_start), max(period_start), count(*) from datapoints"
        ).fetchone() or (None, None, 0)
        buckets = None
        if _object_type(connection, "revenue_buckets") is not None:
            buckets = connection.execute("select min(bucket_start), max(bucket_start) from revenue_buckets").fetchone()
        instants = [instant for instant in (first, last, *(buckets or ())) if instant is not None]
        if not rows or not instants:
            return [None]
        days = (local_day_of(min(instants)), local_day_of(max(instants)) + timedelta(days=1))
    else:
        days = check_days
        row = connection.execute(
            "select count(*) from datapoints where period_start >= ? and period_start < ?",
            [local_midnight(days[0]), local_midnight(days[1])],
        ).fetchone()
        rows = row[0] if row else 0
    day_count = (days[1] - days[0]).days
    if day_count <= 1 or rows <= chunk_rows:
        return [check_days]
    step = max(1, chunk_rows * day_count // rows)
    return [(first_day, min(first_day + timedelta(days=step), days[1])) for first_day in day_range(days[0], days[1])[::step]]


def _write_check_scope(connection: duckdb.DuckDBPyConnection, check_days: tuple[date, date] | None) -> None:
    """Write CHECK_SCOPE_TABLE for ``check_days``, or for every day when it is None."""
    if check_days is None:
        connection.execute(
            f"create or replace table {CHECK_SCOPE_TABLE} as select date '0001-01-01' as first_day, "
            "date '9999-12-31' as end_day, '-infinity'::timestamptz as first_instant, 'infinity'::timestamptz as end_instant"
        )
        return
    first_day, end_day = check_days
    if end_day < first_day:
        raise ValueError(f"check_days end {end_day} is before its first day {first_day}; pass (first, end) with end exclusive")
    connection.execute(
        f"create or replace table {CHECK_SCOPE_TABLE} as select ?::date as first_day, ?::date as end_day, "
        "?::timestamptz as first_instant, ?::timestamptz as end_instant",
        [first_day, end_day, local_midnight(first_day), local_midnight(end_day)],
    )


def _write_category_rules(connection: duckdb.DuckDBPyConnection) -> None:
    """Write the seed table of category rules that the SQL models join against."""
    rows = []
    for category in CATEGORIES.values():
        product = None
        annualisation_factor = None
        if category.revenue is not None:
            product = category.revenue.removeprefix("revenue_")
            if category.revenue == "revenue_total_revenue":
                product = "total"
            annualisation_factor = float(DAYS_PER_YEAR) if category.per_year else 1.0
        rows.append(
            (
                category.name,
                category.unit,
                category.over_time,
                category.over_entities,
                category.weight,
                category.revenue,
                product,
                category.per_year,
                annualisation_factor,
            )
        )

    connection.execute(
        f"create or replace table {SEED_TABLE} (category varchar primary key, unit varchar, "
        "over_time varchar, over_entities varchar, weight_category varchar, revenue_category varchar, "
        "product varchar, per_year boolean, annualisation_factor double)"
    )
    connection.executemany(f"insert into {SEED_TABLE} values (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def _execute_file(connection: duckdb.DuckDBPyConnection, path: Path) -> None:
    try:
        connection.execute(path.read_text(encoding="utf-8"))
    except duckdb.Error as exc:
        raise ModelError(f"SQL file {path} failed: {exc}") from exc


def _build_model(connection: duckdb.DuckDBPyConnection, model: Model) -> None:
    started = time.perf_counter()

    # CREATE OR REPLACE cannot turn a view into a table or back, so drop the other form first.
    existing = _object_type(connection, model.name)
    if existing == "VIEW" and model.materialized == "table":
        connection.execute(f'drop view "{model.name}"')
    elif existing == "BASE TABLE" and model.materialized == "view":
        connection.execute(f'drop table "{model.name}"')

    try:
        # The SQL starts on the first line, so that DuckDB's "LINE n" is line n of the file.
        connection.execute(f'create or replace {model.materialized} "{model.name}" as {model.sql}\n')
    except duckdb.Error as exc:
        raise ModelError(
            f"SQL model {model.name} ({model.path}) failed to build: {one_line(exc)}. If the SQL "
            "is as shipped, a warehouse table it reads is missing or was changed by hand: load a new "
            "warehouse with 'terralayr-etl run' first, or restore the table as docs/data-model.md "
            "describes it (or start over, docs/operations.md). Otherwise fix the SQL."
        ) from exc
    log.debug("Built %s %s in %.2f s", model.materialized, model.name, time.perf_counter() - started)


def _append_to_model(connection: duckdb.DuckDBPyConnection, model: Model) -> None:
    """Insert the rows of a table model's query into the table that ``_build_model`` created."""
    try:
        # As in _build_model, the SQL starts on the first line to keep DuckDB's line numbers.
        connection.execute(f'insert into "{model.name}" select * from ({model.sql}\n)\n')
    except duckdb.Error as exc:
        raise ModelError(
            f"SQL model {model.name} ({model.path}) failed for a chunk of check days: {one_line(exc)}. "
            "Fix the SQL, or pass a larger chunk_rows to check every day in one pass."
        ) from exc


def _union_of_checks(check_names: list[str]) -> str:
    """Return one select over all check models with uniform column types."""
    if not check_names:
        return (
            "select null::varchar as check_name, null::varchar as entity_type, null::varchar as entity_id, "
            "null::varchar as category, null::date as period, null::double as expected, "
            "null::double as actual, null::double as difference, null::double as tolerance where false"
        )
    selects = [
        "select check_name::varchar as check_name, entity_type::varchar as entity_type, "
        "entity_id::varchar as entity_id, category::varchar as category, period::date as period, "
        "expected::double as expected, actual::double as actual, difference::double as difference, "
        f'tolerance::double as tolerance from "{name}"'
        for name in check_names
    ]
    return "\nunion all\n".join(selects)


def _failing_rows(connection: duckdb.DuckDBPyConnection, limit: int) -> list[dict[str, object]]:
    cursor = connection.execute(
        f"select {', '.join(CHECK_COLUMNS)} from {CHECK_RESULTS_TABLE} where status = 'fail' "
        "order by check_name, entity_type, entity_id, category, period limit ?",
        [limit],
    )
    rows = []
    for values in cursor.fetchall():
        row = dict(zip(CHECK_COLUMNS, values, strict=True))
        row["period"] = row["period"].isoformat() if row["period"] is not None else None
        rows.append(row)
    return rows
