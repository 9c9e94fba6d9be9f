"""SQL text of the warehouse: the table definitions and the statements that load Parquet files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from terralayr_etl.config import ENTITY_TYPES, RESOLUTIONS


def enum_type(values: Sequence[str]) -> str:
    """Return the SQL of an ENUM type with ``values``, in the order given."""
    if not values:
        raise ValueError("an ENUM type needs at least one value")
    return "enum(" + ", ".join("'" + value.replace("'", "''") + "'" for value in values) + ")"


# datapoints has no PRIMARY KEY: DuckDB keeps a key's ART index in memory, which for tens of
# millions of rows costs gigabytes and slows every insert. load_datapoints keeps the key
# unique itself by deleting the incoming keys before inserting.
# Each string column costs the insert about as much CPU time as the numeric columns together
# (measured on 13.5M rows). So entity_type and resolution, whose values the pipeline
# validates, are ENUMs, and the request path stays in the Parquet files, as it follows from
# the entity and api.paths. entity_id, category and unit (LABEL_COLUMNS) start as VARCHAR and
# become ENUMs at the first load, whose values grow with the data (Warehouse._widen_labels).
# The ENUM columns are stored with RLE. The files hold one entity each, sorted by category and
# instant, so the labels come in long runs. DuckDB's automatic choice was RLE or Constant for
# every segment of W1's rows anyway, and naming RLE skips its analysis of the other methods.
# The month-batched insert of those 13.5M rows took about 12% less CPU time (DuckDB 2.0.1).
ENUM_COMPRESSION = "using compression rle"


def datapoints_columns_sql(label_types: Mapping[str, str] | None = None) -> str:
    """Return the column list of the datapoints table.

    ``label_types`` maps some of LABEL_COLUMNS to their ENUM types; the others are VARCHAR.
    """
    label_types = label_types or {}

    def label(column: str) -> str:
        return f"{label_types[column]} {ENUM_COMPRESSION}" if column in label_types else "varchar"

    return f"""(
    entity_type {enum_type(ENTITY_TYPES)} {ENUM_COMPRESSION} not null,
    entity_id {label("entity_id")} not null,
    resolution {enum_type(RESOLUTIONS)} {ENUM_COMPRESSION} not null,
    category {label("category")} not null,
    period_start timestamptz not null,
    value double,
    unit {label("unit")},
    run_id varchar,
    fetched_at timestamptz
)"""


DATAPOINTS_COLUMNS_SQL = datapoints_columns_sql()

DATAPOINTS_COLUMNS = (
    "entity_type", "entity_id", "resolution", "category", "period_start", "value", "unit", "run_id", "fetched_at",
)  # fmt: skip

LABEL_COLUMNS = ("entity_id", "category", "unit")
"""datapoints columns stored as ENUMs that list every value loaded so far, in sorted order."""

SCHEMA_SQL = f"""
create table if not exists datapoints {DATAPOINTS_COLUMNS_SQL};

create table if not exists revenue_buckets (
    entity_id varchar not null,
    product varchar not null,
    bucket_start timestamptz not null,
    bucket_end timestamptz,
    revenue_eur double,
    currency varchar,
    run_id varchar,
    fetched_at timestamptz,
    endpoint varchar,
    primary key (entity_id, product, bucket_start)
);

create table if not exists virtual_assets (
    virtual_asset_id varchar primary key,
    portfolio_id varchar,
    start_at timestamptz,
    end_at timestamptz,
    rated_charge_power_mw double,
    rated_discharge_power_mw double,
    energy_capacity_mwh double,
    charge_efficiency double,
    discharge_efficiency double,
    delivery_zone varchar,
    raw_json varchar
);

create table if not exists entity_members (
    entity_type varchar not null,
    entity_id varchar not null,
    virtual_asset_id varchar not null,
    primary key (entity_type, entity_id, virtual_asset_id)
);

create table if not exists runs (
    run_id varchar primary key,
    started_at timestamptz,
    finished_at timestamptz,
    status varchar,
    code_version varchar,
    parameters json,
    windows integer,
    requests integer,
    retries integer,
    rows bigint,
    check_summary json
);

-- Added after the first release; warehouses created before keep working.
alter table runs add column if not exists failed_windows json;
alter table runs add column if not exists report json;

create table if not exists watermarks (
    entity_type varchar not null,
    entity_id varchar not null,
    resolution varchar not null,
    watermark timestamptz not null,
    primary key (entity_type, entity_id, resolution)
);
"""

# Partition values are strings. Without explicit types DuckDB guesses a type from the
# folder names, and DuckDB rejects a type for a partition the files do not have.
_DATAPOINT_HIVE_TYPES = "{'resolution': 'VARCHAR', 'entity_type': 'VARCHAR', 'month': 'VARCHAR'}"
_BUCKET_HIVE_TYPES = "{'product': 'VARCHAR', 'month': 'VARCHAR'}"

_READ_DATAPOINT_FILES = f"read_parquet($files, hive_partitioning = true, hive_types = {_DATAPOINT_HIVE_TYPES})"
_READ_BUCKET_FILES = f"read_parquet($files, hive_partitioning = true, hive_types = {_BUCKET_HIVE_TYPES})"

KEY_COLUMNS = ("entity_type", "entity_id", "resolution", "category")
"""The datapoints key columns besides period_start, which find_replaced_datapoints casts."""


def find_replaced_datapoints(key_types: Mapping[str, str]) -> str:
    """Return the statement that lists the row ids of stored rows whose keys the files repeat.

    A DELETE whose join does not fit in DuckDB's memory limit fails instead of spilling, so
    the stored rows that a batch replaces are found with a SELECT join (which spills), kept
    as row ids, and deleted in row-id chunks. The join builds on the smaller side, so a first
    load into an empty table or a nightly load of a few days costs little.

    ``key_types`` maps each of KEY_COLUMNS to its SQL type in datapoints. The files' strings
    are cast to these types, so the join compares ENUM codes. A join on text cast every
    stored label to VARCHAR. Re-loading W1's 13.5M rows into a warehouse that contained them
    then failed at the 128 MB limit (DuckDB 2.0.1), and with the casts it took 2.2 s.
    """
    casts = ",\n        ".join(f"cast({column} as {key_types[column]}) as {column}" for column in KEY_COLUMNS)
    conditions = "".join(f"\n    and datapoints.{column} = incoming.{column}" for column in KEY_COLUMNS)
    return f"""
create or replace temp table _replaced_datapoints as
select datapoints.rowid as row_id
from datapoints
semi join (
    select
        {casts},
        period_start
    from {_READ_DATAPOINT_FILES}
) as incoming
    on datapoints.period_start = incoming.period_start{conditions}
"""


# One row per file from its Parquet footer: rows, the range of period_start and entity_id,
# and whether statistics for both columns are present and readable. A file without row
# groups has no row here.
FILE_STATISTICS = """
select
    file_name,
    sum(row_group_num_rows) filter (where path_in_schema = 'period_start') as num_rows,
    min(try_cast(stats_min_value as timestamptz)) filter (where path_in_schema = 'period_start') as first_period,
    max(try_cast(stats_max_value as timestamptz)) filter (where path_in_schema = 'period_start') as last_period,
    min(stats_min_value) filter (where path_in_schema = 'entity_id') as first_entity,
    max(stats_max_value) filter (where path_in_schema = 'entity_id') as last_entity,
    bool_and(
        stats_min_value is not null
        and stats_max_value is not null
        and (path_in_schema <> 'period_start' or try_cast(stats_min_value as timestamptz) is not null)
        and (path_in_schema <> 'period_start' or try_cast(stats_max_value as timestamptz) is not null)
    ) and count(distinct path_in_schema) = 2 as complete_statistics
from parquet_metadata($files)
where path_in_schema in ('period_start', 'entity_id')
group by file_name
"""

STORED_IN_RANGE = """
select exists (
    select 1
    from datapoints
    where period_start between $first_period and $last_period
        and entity_id::varchar between $first_entity and $last_entity
)
"""

# Cached blocks of stored tables (BASE_TABLE) and of read files can be evicted; DuckDB's
# other memory, such as key indexes and temporary tables, stays until it is dropped.
HELD_MEMORY = """
select
    current_setting('threads')::integer,
    coalesce(sum(memory_usage_bytes) filter (where tag not in ('BASE_TABLE', 'EXTERNAL_FILE_CACHE')), 0)
from duckdb_memory()
"""

INCOMING_LABELS = f"""
select {", ".join(f"list(distinct {column}) filter (where {column} is not null)" for column in LABEL_COLUMNS)}
from {_READ_DATAPOINT_FILES}
"""

DELETE_REPLACED_CHUNK = """
delete from datapoints
where rowid >= $first and rowid < $stop
    and rowid in (select row_id from _replaced_datapoints where row_id >= $first and row_id < $stop)
"""

INSERT_DATAPOINTS = f"""
insert into datapoints
select {", ".join(DATAPOINTS_COLUMNS)}
from {_READ_DATAPOINT_FILES}
"""

UPSERT_REVENUE_BUCKETS = f"""
insert into revenue_buckets
select entity_id, product, bucket_start, bucket_end, revenue_eur, currency, run_id, fetched_at, endpoint
from {_READ_BUCKET_FILES}
on conflict (entity_id, product, bucket_start) do update set
    bucket_end = excluded.bucket_end,
    revenue_eur = excluded.revenue_eur,
    currency = excluded.currency,
    run_id = excluded.run_id,
    fetched_at = excluded.fetched_at,
    endpoint = excluded.endpoint
"""
