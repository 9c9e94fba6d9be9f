"""Tests for terralayr_etl.warehouse against real DuckDB files and real Parquet files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from terralayr_etl import warehouse as warehouse_module
from terralayr_etl.errors import InvalidEntityIdError, MalformedResponseError, TerralayrError, WarehouseLockedError
from terralayr_etl.normalise import BUCKET_SCHEMA, LONG_SCHEMA
from terralayr_etl.storage import ParquetStore
from terralayr_etl.warehouse import Warehouse

VA_ID = "38421b10-96fe-569f-8d56-bff0ee2dc95b"
PORTFOLIO_ID = "e98432cc-fa6c-53c4-ad5b-0ac76728ab06"
DAY = datetime(2025, 1, 1, tzinfo=UTC)
FETCHED_AT = datetime(2025, 1, 2, 3, 0, tzinfo=UTC)


def _datapoints(count: int, value_offset: float = 0.0, entity_id: str = VA_ID) -> pa.Table:
    rows = [
        {
            "entity_type": "virtual_asset",
            "entity_id": entity_id,
            "resolution": "15min",
            "category": category,
            "period_start": DAY + timedelta(minutes=15 * index),
            "value": float(index) + value_offset,
            "unit": "EUR",
            "run_id": f"run-{value_offset:g}",
            "fetched_at": FETCHED_AT,
            "endpoint": "/datapoints",
        }
        for category in ("revenue_wholesale", "revenue_fcr")
        for index in range(count)
    ]
    return pa.Table.from_pylist(rows, schema=LONG_SCHEMA)


def _buckets(revenue_eur: float) -> pa.Table:
    rows = [
        {
            "entity_id": VA_ID,
            "product": "tolling",
            "bucket_start": DAY + timedelta(days=index) - timedelta(hours=1),
            "bucket_end": DAY + timedelta(days=index + 1) - timedelta(hours=1),
            "revenue_eur": revenue_eur + index,
            "currency": "EUR",
            "run_id": "run-1",
            "fetched_at": FETCHED_AT,
            "endpoint": "/tolling",
        }
        for index in range(3)
    ]
    return pa.Table.from_pylist(rows, schema=BUCKET_SCHEMA)


@pytest.fixture
def warehouse(tmp_path: Path):
    with Warehouse(tmp_path / "warehouse.duckdb") as opened:
        yield opened


def test_warehouse_creates_contract_tables(warehouse: Warehouse):
    columns = warehouse.connection.execute(
        "select table_name, column_name, data_type from information_schema.columns order by table_name, ordinal_position"
    ).fetchall()

    by_table: dict[str, list[tuple[str, str]]] = {}
    for table_name, column_name, data_type in columns:
        by_table.setdefault(table_name, []).append((column_name, data_type))
    assert by_table["datapoints"] == [
        ("entity_type", "ENUM('virtual_asset', 'portfolio', 'fleet', 'physical_asset')"),
        ("entity_id", "VARCHAR"),
        ("resolution", "ENUM('raw', '15min', 'hourly', 'daily')"),
        ("category", "VARCHAR"),
        ("period_start", "TIMESTAMP WITH TIME ZONE"),
        ("value", "DOUBLE"),
        ("unit", "VARCHAR"),
        ("run_id", "VARCHAR"),
        ("fetched_at", "TIMESTAMP WITH TIME ZONE"),
    ]
    assert [name for name, _ in by_table["revenue_buckets"]] == [
        "entity_id", "product", "bucket_start", "bucket_end", "revenue_eur",
        "currency", "run_id", "fetched_at", "endpoint",
    ]  # fmt: skip
    assert dict(by_table["runs"])["parameters"] == "JSON"
    assert dict(by_table["runs"])["rows"] == "BIGINT"
    assert set(by_table) == {"datapoints", "revenue_buckets", "virtual_assets", "entity_members", "runs", "watermarks"}


def test_warehouse_upsert_twice_corrects_values(tmp_path: Path, warehouse: Warehouse):
    store = ParquetStore(tmp_path)
    files = store.write_datapoints(_datapoints(8))

    first = warehouse.load_datapoints(files)
    files = store.write_datapoints(_datapoints(8, value_offset=100.0))
    second = warehouse.load_datapoints(files)

    assert first == 16
    assert second == 16
    assert warehouse.connection.execute("select count(*) from datapoints").fetchone() == (16,)
    value, run_id = warehouse.connection.execute(
        "select value, run_id from datapoints where category = 'revenue_fcr' and period_start = ?", [DAY]
    ).fetchone()
    assert value == 100.0
    assert run_id == "run-100"


def test_warehouse_load_replaces_only_incoming_keys(tmp_path: Path, warehouse: Warehouse):
    store = ParquetStore(tmp_path)
    warehouse.load_datapoints(store.write_datapoints(_datapoints(8)))
    other_store = ParquetStore(tmp_path / "other")
    warehouse.load_datapoints(other_store.write_datapoints(_datapoints(3, value_offset=50.0)))

    rows = warehouse.connection.execute(
        "select period_start, value from datapoints where category = 'revenue_fcr' order by period_start"
    ).fetchall()

    assert len(rows) == 8
    assert [value for _, value in rows[:3]] == [50.0, 51.0, 52.0]
    assert [value for _, value in rows[3:]] == [3.0, 4.0, 5.0, 6.0, 7.0]


def _many_datapoints(entities: int, categories: int, periods: int, value: float) -> pa.Table:
    """One 15-minute series per entity and category, built column-wise because it is large."""
    count = entities * categories * periods
    starts = pa.array([DAY + timedelta(minutes=15 * index) for index in range(periods)], pa.timestamp("us", "UTC"))
    columns = {
        "entity_type": pa.array(["virtual_asset"] * count),
        "entity_id": pa.array(
            [f"{index:08d}-96fe-569f-8d56-bff0ee2dc95b" for index in range(entities) for _ in range(categories * periods)]
        ),
        "resolution": pa.array(["15min"] * count),
        "category": pa.array(
            [
                f"revenue_afrr_energy_per_mw_per_year_{index:02d}"
                for _ in range(entities)
                for index in range(categories)
                for _ in range(periods)
            ]
        ),
        "period_start": pa.concat_arrays([starts] * (entities * categories)),
        "value": pa.array([value] * count, pa.float64()),
        "unit": pa.array(["EUR"] * count),
        "run_id": pa.array([f"run-{value:g}"] * count),
        "fetched_at": pa.array([FETCHED_AT] * count, pa.timestamp("us", "UTC")),
        "endpoint": pa.array(["/datapoints"] * count),
    }
    return pa.table(columns).cast(LONG_SCHEMA)


@pytest.mark.parametrize("rows_per_batch", [warehouse_module.ROWS_PER_BATCH, 10_000])
def test_warehouse_reload_fits_small_memory_limit(tmp_path: Path, warehouse: Warehouse, monkeypatch, rows_per_batch):
    # Joining the stored keys to the files' keys as text cast every stored ENUM label to
    # VARCHAR, and re-loading these 238,080 rows failed at 32 MB with an out-of-memory error.
    # With 10,000 rows per batch, the re-load runs in 21 batches.
    monkeypatch.setattr(warehouse_module, "LOAD_MEMORY", warehouse_module.MemoryLimit(floor_mb=32, per_thread_mb=0))
    monkeypatch.setattr(warehouse_module, "ROWS_PER_BATCH", rows_per_batch)
    store = ParquetStore(tmp_path)
    warehouse.load_datapoints(store.write_datapoints(_many_datapoints(4, 20, 2976, value=1.0)))

    reloaded = warehouse.load_datapoints(store.write_datapoints(_many_datapoints(4, 20, 2976, value=2.0)))

    assert reloaded == 238_080
    assert warehouse.connection.execute("select count(*), min(value), max(value) from datapoints").fetchone() == (238_080, 2.0, 2.0)


def test_warehouse_load_with_many_duckdb_threads(tmp_path: Path, warehouse: Warehouse):
    # Each DuckDB thread pins its own buffers. With fixed limits (32 MB for the insert) this
    # load failed with an out-of-memory error. DuckDB runs 32 threads whatever the core count.
    warehouse.connection.execute("set threads = 32")
    store = ParquetStore(tmp_path)
    warehouse.load_datapoints(store.write_datapoints(_many_datapoints(32, 10, 1000, value=1.0)))

    reloaded = warehouse.load_datapoints(store.write_datapoints(_many_datapoints(32, 10, 1000, value=2.0)))

    warehouse.load_revenue_buckets(store.write_revenue_buckets(_buckets(10.0)))

    assert reloaded == 320_000
    assert warehouse.update_watermarks(["15min"]) == 32
    # The bucket load runs on one thread and gives the connection its 32 threads back.
    assert warehouse.connection.execute("select current_setting('threads')").fetchone() == (32,)
    assert warehouse.connection.execute("select count(*), min(value) from datapoints").fetchone() == (320_000, 2.0)


def test_warehouse_load_beside_index_in_memory(tmp_path: Path, warehouse: Warehouse):
    # A key index stays in DuckDB's memory and counts against the limit, as the revenue
    # buckets' key does after an upsert. With fixed limits the watermark scan of the W4
    # benchmark failed, and beside this 8 MB index DuckDB could not even set the limit.
    warehouse.connection.execute("create temp table held_index (x bigint primary key)")
    warehouse.connection.execute("insert into held_index select range from range(1000000)")

    warehouse.load_datapoints(ParquetStore(tmp_path).write_datapoints(_many_datapoints(4, 10, 96, value=1.0)))

    assert warehouse.update_watermarks(["15min"]) == 4
    assert warehouse.connection.execute("select count(*) from datapoints").fetchone() == (3_840,)


def test_warehouse_reload_of_files_without_statistics(tmp_path: Path, warehouse: Warehouse):
    # Without Parquet statistics a batch cannot show that its keys are new, so it takes the
    # join that finds replaced rows instead of inserting a second copy.
    files = ParquetStore(tmp_path).write_datapoints(_datapoints(8))
    for file in files:
        pq.write_table(pq.read_table(file), file, write_statistics=False)

    warehouse.load_datapoints(files)
    warehouse.load_datapoints(files)

    assert warehouse.connection.execute("select count(*) from datapoints").fetchone() == (16,)


def test_warehouse_datapoints_have_no_index(warehouse: Warehouse):
    indexed = warehouse.connection.execute(
        "select count(*) from duckdb_constraints() where table_name = 'datapoints' "
        "and constraint_type in ('PRIMARY KEY', 'UNIQUE')"
    ).fetchone()

    assert indexed == (0,)


_OLDER_DATAPOINTS_TABLE = (
    "create table datapoints (entity_type varchar not null, entity_id varchar not null, "
    "resolution varchar not null, category varchar not null, period_start timestamptz not null, "
    "value double, unit varchar, run_id varchar, fetched_at timestamptz, endpoint varchar, "
    "primary key (entity_type, entity_id, resolution, category, period_start))"
)


def _older_warehouse(path: Path, files: list[Path]) -> None:
    """Create a warehouse in the form of earlier versions: a key, VARCHAR columns and the request path."""
    older = duckdb.connect(str(path))
    older.execute(_OLDER_DATAPOINTS_TABLE)
    older.execute(
        "insert into datapoints select entity_type, entity_id, resolution, category, period_start, value, unit, "
        "run_id, fetched_at, endpoint from read_parquet($files, hive_partitioning = true)",
        {"files": [str(file) for file in files]},
    )
    older.close()


def test_warehouse_upgrades_older_datapoints_table(tmp_path: Path):
    path = tmp_path / "warehouse.duckdb"
    files = ParquetStore(tmp_path).write_datapoints(_datapoints(4))
    _older_warehouse(path, files)

    with Warehouse(path) as warehouse:
        keys = warehouse.connection.execute(
            "select count(*) from duckdb_constraints() where table_name = 'datapoints' and constraint_type = 'PRIMARY KEY'"
        ).fetchone()
        columns = warehouse.connection.execute(
            "select column_name, data_type from duckdb_columns() where table_name = 'datapoints'"
        ).fetchall()
        before = warehouse.connection.execute("select count(*), sum(value) from datapoints").fetchone()
        loaded = warehouse.load_datapoints(files)
        after = warehouse.connection.execute("select count(*), sum(value) from datapoints").fetchone()

        labels = _label_types(warehouse)

    assert keys == (0,)
    assert "endpoint" not in dict(columns)
    assert dict(columns)["resolution"].startswith("ENUM(")
    assert before == (8, 12.0)
    assert loaded == 8
    assert after == (8, 12.0)
    assert labels == {"entity_id": f"ENUM('{VA_ID}')", "category": "ENUM('revenue_fcr', 'revenue_wholesale')", "unit": "ENUM('EUR')"}


def test_warehouse_upgrade_names_invalid_rows(tmp_path: Path):
    path = tmp_path / "warehouse.duckdb"
    _older_warehouse(path, ParquetStore(tmp_path).write_datapoints(_datapoints(4)))
    older = duckdb.connect(str(path))
    older.execute("update datapoints set resolution = '5min' where category = 'revenue_fcr'")
    older.close()

    with pytest.raises(TerralayrError) as raised:
        Warehouse(path)

    assert "5min" in str(raised.value)
    assert "delete the other rows" in str(raised.value)
    unchanged = duckdb.connect(str(path), read_only=True)
    assert unchanged.execute("select count(*) from datapoints").fetchone() == (8,)
    assert "endpoint" in [row[0] for row in unchanged.execute("describe datapoints").fetchall()]
    unchanged.close()


def _label_types(warehouse: Warehouse) -> dict[str, str]:
    rows = warehouse.connection.execute(
        "select column_name, data_type from duckdb_columns() where table_name = 'datapoints' "
        "and column_name in ('entity_id', 'category', 'unit')"
    ).fetchall()
    return dict(rows)


EARLIER_ID = "0" + VA_ID[1:]
"""An entity id that sorts before VA_ID."""


def test_label_enums_grow_sorted(tmp_path: Path, warehouse: Warehouse):
    store = ParquetStore(tmp_path)
    warehouse.load_datapoints(store.write_datapoints(_datapoints(4, entity_id=VA_ID)))
    first_types = _label_types(warehouse)
    quoted = _datapoints(2, entity_id=EARLIER_ID)
    quoted = quoted.set_column(
        quoted.schema.get_field_index("category"), "category", pa.array(["o'clock_category"] * quoted.num_rows)
    )
    warehouse.load_datapoints(store.write_datapoints(quoted))

    entities = warehouse.connection.execute("select distinct entity_id from datapoints order by entity_id").fetchall()
    categories = warehouse.connection.execute("select enum_range(max(category)) from datapoints where false").fetchone()

    assert first_types == {
        "entity_id": f"ENUM('{VA_ID}')",
        "category": "ENUM('revenue_fcr', 'revenue_wholesale')",
        "unit": "ENUM('EUR')",
    }
    assert categories == (["o'clock_category", "revenue_fcr", "revenue_wholesale"],)
    assert entities == [(EARLIER_ID,), (VA_ID,)]
    assert _label_types(warehouse)["entity_id"] == f"ENUM('{EARLIER_ID}', '{VA_ID}')"
    assert warehouse.connection.execute("select count(*) from datapoints where category = 'revenue_fcr'").fetchone() == (4,)
    assert warehouse.connection.execute("select count(*) from datapoints where category = 'no_such'").fetchone() == (0,)


_RLE_COLUMN = re.compile(r"(\w+) ENUM\((?:'(?:[^']|'')*'(?:, )?)*\) USING COMPRESSION RLE")


def _rle_columns(warehouse: Warehouse) -> set[str]:
    """Return the datapoints columns that the table's definition stores with RLE."""
    row = warehouse.connection.execute("select sql from duckdb_tables() where table_name = 'datapoints'").fetchone()
    assert row is not None
    return set(_RLE_COLUMN.findall(row[0]))


def _compressions(warehouse: Warehouse, column: str) -> set[str]:
    rows = warehouse.connection.execute(
        "select distinct compression from pragma_storage_info('datapoints') "
        "where column_name = ? and segment_type <> 'VALIDITY'",
        [column],
    ).fetchall()
    return {compression for (compression,) in rows}


def test_enum_columns_stored_with_rle(tmp_path: Path, warehouse: Warehouse):
    store = ParquetStore(tmp_path)
    enum_columns = {"entity_type", "entity_id", "resolution", "category", "unit"}

    assert _rle_columns(warehouse) == {"entity_type", "resolution"}

    warehouse.load_datapoints(store.write_datapoints(_datapoints(4, entity_id=VA_ID)))
    assert _rle_columns(warehouse) == enum_columns
    warehouse.connection.execute("checkpoint")
    for column in enum_columns:
        assert _compressions(warehouse, column) <= {"RLE", "Constant"}, column

    # A new entity widens entity_id with ALTER, which keeps the column's compression.
    warehouse.load_datapoints(store.write_datapoints(_datapoints(2, entity_id=EARLIER_ID)))
    assert _label_types(warehouse)["entity_id"] == f"ENUM('{EARLIER_ID}', '{VA_ID}')"
    assert _rle_columns(warehouse) == enum_columns
    assert warehouse.connection.execute("select count(*) from datapoints").fetchone() == (12,)


def test_failed_first_load_keeps_empty_table(tmp_path: Path, warehouse: Warehouse):
    files = ParquetStore(tmp_path).write_datapoints(_datapoints(4))

    with pytest.raises(duckdb.IOException):
        warehouse.load_datapoints([*files, tmp_path / "zz-missing.parquet"])

    assert set(_label_types(warehouse).values()) == {"VARCHAR"}
    assert _rle_columns(warehouse) == {"entity_type", "resolution"}
    assert warehouse.connection.execute("select count(*) from datapoints").fetchone() == (0,)
    assert warehouse.load_datapoints(files) == 8
    assert _label_types(warehouse)["unit"] == "ENUM('EUR')"


def test_failed_load_keeps_label_types(tmp_path: Path, warehouse: Warehouse):
    store = ParquetStore(tmp_path)
    warehouse.load_datapoints(store.write_datapoints(_datapoints(4)))
    before = _label_types(warehouse)
    new_files = ParquetStore(tmp_path / "other").write_datapoints(_datapoints(4, entity_id=PORTFOLIO_ID))

    with pytest.raises(duckdb.IOException):
        warehouse.load_datapoints([*new_files, tmp_path / "zz-missing.parquet"])

    assert _label_types(warehouse) == before
    assert warehouse.connection.execute("select count(*) from datapoints").fetchone() == (8,)


def test_warehouse_load_takes_partition_columns(tmp_path: Path, warehouse: Warehouse):
    files = ParquetStore(tmp_path).write_datapoints(_datapoints(2))

    warehouse.load_datapoints(files)

    rows = warehouse.connection.execute("select distinct entity_type, entity_id, resolution from datapoints").fetchall()
    assert rows == [("virtual_asset", VA_ID, "15min")]


def test_warehouse_failed_batch_keeps_earlier_batches(tmp_path: Path, warehouse: Warehouse):
    january = ParquetStore(tmp_path / "good").write_datapoints(_datapoints(4))
    # A February file without value columns: its batch comes second and fails at the insert.
    bad = tmp_path / "bad" / "resolution=15min" / "entity_type=virtual_asset" / "month=2025-02" / "broken.parquet"
    bad.parent.mkdir(parents=True)
    pq.write_table(
        pa.table({"entity_id": [VA_ID], "category": ["revenue_fcr"], "period_start": [DAY + timedelta(days=40)], "unit": ["EUR"]}),
        bad,
    )

    with pytest.raises(duckdb.Error):
        warehouse.load_datapoints([*january, bad])
    rows_after_failure = warehouse.connection.execute("select count(*) from datapoints").fetchone()
    committed_after_failure = warehouse.committed_rows
    warehouse.load_datapoints(january)

    assert rows_after_failure == (8,)
    # A failed run records these rows, which stay loaded.
    assert committed_after_failure == 8
    assert warehouse.connection.execute("select count(*) from datapoints").fetchone() == (8,)


def test_failed_bucket_load_keeps_committed_count(tmp_path: Path, warehouse: Warehouse):
    store = ParquetStore(tmp_path / "good")
    loaded = warehouse.load_datapoints(store.write_datapoints(_datapoints(4)))
    # A bucket file without revenue columns fails the bucket load, which is one transaction.
    bad = tmp_path / "bad" / "product=tolling" / "month=2025-01" / "broken.parquet"
    bad.parent.mkdir(parents=True)
    pq.write_table(pa.table({"entity_id": [VA_ID], "bucket_start": [DAY]}), bad)

    with pytest.raises(duckdb.Error):
        warehouse.load_revenue_buckets([bad])

    assert loaded == 8
    assert warehouse.committed_rows == 8
    assert warehouse.connection.execute("select count(*) from revenue_buckets").fetchone() == (0,)


def test_warehouse_load_empty_list_returns_zero(warehouse: Warehouse):
    assert warehouse.load_datapoints([]) == 0
    assert warehouse.load_revenue_buckets([]) == 0


def test_warehouse_revenue_buckets_upsert(tmp_path: Path, warehouse: Warehouse, caplog: pytest.LogCaptureFixture):
    store = ParquetStore(tmp_path)
    warehouse.load_revenue_buckets(store.write_revenue_buckets(_buckets(10.0)))
    caplog.set_level("INFO", logger=warehouse_module.__name__)

    loaded = warehouse.load_revenue_buckets(store.write_revenue_buckets(_buckets(50.0)))

    assert loaded == 3
    assert "Loaded 3 revenue-bucket rows (3 replaced stored rows)" in caplog.text
    rows = warehouse.connection.execute(
        "select product, revenue_eur from revenue_buckets order by bucket_start"
    ).fetchall()
    assert rows == [("tolling", 50.0), ("tolling", 51.0), ("tolling", 52.0)]


_HOLD_LOCK_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from terralayr_etl.warehouse import Warehouse

    with Warehouse(Path(sys.argv[1])):
        print("ready", flush=True)
        sys.stdin.readline()
    """
)


def test_warehouse_lock_held_by_other_process(tmp_path: Path):
    path = tmp_path / "warehouse.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK_SCRIPT, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"

        with pytest.raises(WarehouseLockedError) as caught:
            Warehouse(path)

        message = str(caught.value)
        assert str(path) in message
        assert f"pid {holder.pid}" in message
        assert "--data-dir" in message
    finally:
        holder.communicate("done\n", timeout=30)

    with Warehouse(path) as reopened:
        assert reopened.connection.execute("select 1").fetchone() == (1,)


def test_warehouse_duckdb_lock_is_locked_error(tmp_path: Path):
    path = tmp_path / "warehouse.duckdb"
    script = "import duckdb, sys\nconnection = duckdb.connect(sys.argv[1])\nprint('ready', flush=True)\nsys.stdin.readline()\n"
    holder = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"

        with pytest.raises(WarehouseLockedError, match="Conflicting lock"):
            Warehouse(path)
    finally:
        holder.communicate("done\n", timeout=30)


def test_warehouse_not_duckdb_file_error(tmp_path: Path):
    path = tmp_path / "warehouse.duckdb"
    path.write_bytes(b"not a database")

    with pytest.raises(TerralayrError) as caught:
        Warehouse(path)

    assert not isinstance(caught.value, WarehouseLockedError)
    assert str(path) in str(caught.value)
    assert "not a valid DuckDB database file" in str(caught.value)
    assert "Move the file aside" in str(caught.value)
    assert path.read_bytes() == b"not a database"


def test_warehouse_lock_timeout_waits_for_release(tmp_path: Path):
    path = tmp_path / "warehouse.duckdb"
    script = _HOLD_LOCK_SCRIPT.replace("sys.stdin.readline()", "import time; time.sleep(0.5)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"

        with Warehouse(path, lock_timeout_seconds=30) as waited:
            assert waited.connection.execute("select 1").fetchone() == (1,)
    finally:
        holder.wait(timeout=30)


_TIME_ZONE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import duckdb
    from terralayr_etl.warehouse import Warehouse

    query = (
        "select current_setting('TimeZone'), "
        "cast(timestamptz '2025-03-30 01:30:00+00' as varchar), "
        "cast(date_trunc('day', timestamptz '2025-03-30 01:30:00+00') as varchar)"
    )
    plain = duckdb.connect()
    with Warehouse(Path(sys.argv[1])) as warehouse:
        print(json.dumps({"plain": plain.execute(query).fetchone(), "warehouse": warehouse.connection.execute(query).fetchone()}))
    """
)


def test_warehouse_session_time_zone_is_utc(tmp_path: Path):
    environment = {**os.environ, "TZ": "America/New_York"}

    completed = subprocess.run(
        [sys.executable, "-c", _TIME_ZONE_SCRIPT, str(tmp_path / "warehouse.duckdb")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    result = json.loads(completed.stdout)
    # The plain connection shows that the host zone really is New York in this process.
    assert result["plain"][0] == "America/New_York"
    assert result["warehouse"] == ["UTC", "2025-03-30 01:30:00+00", "2025-03-30 00:00:00+00"]


def test_warehouse_watermarks_round_trip(warehouse: Warehouse):
    berlin_summer = timezone(timedelta(hours=2))
    warehouse.set_watermarks(
        [
            ("virtual_asset", VA_ID, "15min", datetime(2025, 6, 1, 2, 0, tzinfo=berlin_summer)),
            ("portfolio", PORTFOLIO_ID, "daily", datetime(2025, 5, 31, 22, 0, tzinfo=UTC)),
        ]
    )
    warehouse.set_watermarks([("virtual_asset", VA_ID, "15min", datetime(2025, 6, 2, tzinfo=UTC))])

    fifteen_minute = warehouse.get_watermark("virtual_asset", VA_ID, "15min")
    daily = warehouse.get_watermark("portfolio", PORTFOLIO_ID, "daily")

    assert fifteen_minute == datetime(2025, 6, 2, tzinfo=UTC)
    assert fifteen_minute.tzinfo is UTC
    assert daily == datetime(2025, 5, 31, 22, 0, tzinfo=UTC)
    assert warehouse.get_watermark("virtual_asset", VA_ID, "hourly") is None
    assert warehouse.connection.execute("select count(*) from watermarks").fetchone() == (2,)


def test_warehouse_watermark_rejects_naive_and_bad_ids(warehouse: Warehouse):
    with pytest.raises(ValueError, match="no time zone"):
        warehouse.set_watermarks([("virtual_asset", VA_ID, "15min", datetime(2025, 6, 1))])
    with pytest.raises(InvalidEntityIdError):
        warehouse.set_watermarks([("virtual_asset", "../x", "15min", datetime(2025, 6, 1, tzinfo=UTC))])
    with pytest.raises(InvalidEntityIdError, match="resolution"):
        warehouse.set_watermarks([("virtual_asset", VA_ID, "weekly", datetime(2025, 6, 1, tzinfo=UTC))])


def test_warehouse_update_watermarks_from_datapoints(tmp_path: Path, warehouse: Warehouse):
    warehouse.load_datapoints(ParquetStore(tmp_path).write_datapoints(_datapoints(8)))

    written = warehouse.update_watermarks(["15min", "hourly"])

    assert written == 1
    assert warehouse.get_watermark("virtual_asset", VA_ID, "15min") == DAY + timedelta(minutes=15 * 7)
    assert warehouse.earliest_watermark(["15min"]) == DAY + timedelta(minutes=15 * 7)
    assert warehouse.earliest_watermark(["daily"]) is None


def _virtual_asset(asset_id: str = VA_ID, power_kw: float = 2500) -> dict:
    return {
        "id": asset_id,
        "portfolioID": PORTFOLIO_ID,
        "start": "2023-12-31T23:00:00Z",
        "end": None,
        "ratedChargePower": power_kw,
        "ratedDischargePower": 2000,
        "unitsPower": "kW",
        "energyCapacity": 5000,
        "unitsEnergy": "kWh",
        "chargeEfficiency": 0.943,
        "dischargeEfficiency": 0.95,
        "deliveryZone": "50Hertz",
    }


def test_warehouse_virtual_assets_converted_to_mw(warehouse: Warehouse):
    warehouse.replace_virtual_assets([_virtual_asset()])

    row = warehouse.connection.execute(
        "select virtual_asset_id, portfolio_id, start_at, end_at, rated_charge_power_mw, rated_discharge_power_mw, "
        "energy_capacity_mwh, charge_efficiency, discharge_efficiency, delivery_zone, raw_json from virtual_assets"
    ).fetchone()

    assert row[0] == VA_ID
    assert row[1] == PORTFOLIO_ID
    assert row[2] == datetime(2023, 12, 31, 23, tzinfo=UTC)
    assert row[3] is None
    assert row[4] == 2.5
    assert row[5] == 2.0
    assert row[6] == 5.0
    assert row[7] == 0.943
    assert row[8] == 0.95
    assert row[9] == "50Hertz"
    assert json.loads(row[10]) == _virtual_asset()


def test_warehouse_failed_insert_keeps_cause(warehouse: Warehouse):
    warehouse.replace_virtual_assets([_virtual_asset()])
    warehouse.connection.execute("alter table virtual_assets drop column delivery_zone")

    # The cause, not DuckDB's refusal to unregister the incoming rows in an aborted transaction.
    with pytest.raises(duckdb.BinderException, match="delivery_zone"):
        warehouse.replace_virtual_assets([_virtual_asset()])

    assert warehouse.connection.execute("select count(*) from virtual_assets").fetchone() == (1,)


def test_warehouse_replace_virtual_assets_keeps_undiscovered(warehouse: Warehouse):
    other_id = "9e16f4da-6d4c-5454-a2d4-0e45c049d6f7"
    warehouse.replace_virtual_assets([_virtual_asset(), _virtual_asset(other_id)])

    # A later run that no longer discovers other_id (its lifetime ended) updates VA_ID only.
    warehouse.replace_virtual_assets([_virtual_asset(power_kw=1000), _virtual_asset(power_kw=3000)])

    rows = warehouse.connection.execute(
        "select virtual_asset_id, rated_charge_power_mw from virtual_assets order by virtual_asset_id"
    ).fetchall()
    assert rows == [(VA_ID, 3.0), (other_id, 2.5)]


def test_warehouse_virtual_asset_rejects_other_unit(warehouse: Warehouse):
    asset = {**_virtual_asset(), "unitsPower": "MW"}

    with pytest.raises(MalformedResponseError, match="unitsPower 'MW'"):
        warehouse.replace_virtual_assets([asset])


def test_warehouse_replace_entity_members(warehouse: Warehouse):
    other_id = "9e16f4da-6d4c-5454-a2d4-0e45c049d6f7"
    warehouse.replace_entity_members([("fleet", "fleet-1", VA_ID), ("fleet", "fleet-1", other_id)])

    warehouse.replace_entity_members(
        [("virtual_asset", VA_ID, VA_ID), ("portfolio", PORTFOLIO_ID, VA_ID), ("portfolio", PORTFOLIO_ID, VA_ID)]
    )

    # VA_ID's memberships are replaced; other_id was not in the second call and keeps its row.
    rows = warehouse.connection.execute("select * from entity_members order by entity_type").fetchall()
    assert rows == [("fleet", "fleet-1", other_id), ("portfolio", PORTFOLIO_ID, VA_ID), ("virtual_asset", VA_ID, VA_ID)]


def test_warehouse_entity_members_reject_unknown_type(warehouse: Warehouse):
    with pytest.raises(InvalidEntityIdError, match="entity type 'site'"):
        warehouse.replace_entity_members([("site", "s-1", VA_ID)])


def test_warehouse_run_record_round_trip(warehouse: Warehouse):
    warehouse.start_run("run-1", "0.1.0", {"start": "2025-01-01", "resolutions": ["15min"]})
    warehouse.finish_run(
        "run-1", status="success", windows=3, requests=5, retries=1, rows=900, check_summary={"passed": 4, "failed": 0}
    )

    row = warehouse.connection.execute(
        "select status, code_version, parameters->>'start', windows, requests, retries, rows, "
        "check_summary->>'passed', started_at <= finished_at from runs"
    ).fetchone()
    assert row == ("success", "0.1.0", "2025-01-01", 3, 5, 1, 900, "4", True)


def test_unfinished_runs_record_stored_rows(tmp_path: Path, warehouse: Warehouse):
    store = ParquetStore(tmp_path)
    warehouse.start_run("run-0", "0.1.0", {})
    warehouse.start_run("run-1", "0.1.0", {})
    warehouse.load_datapoints(store.write_datapoints(_datapoints(4)))
    warehouse.load_revenue_buckets(store.write_revenue_buckets(_buckets(10.0)))

    killed = warehouse.mark_unfinished_runs()

    rows = dict(warehouse.connection.execute("select run_id, rows from runs").fetchall())
    assert killed == ["run-0", "run-1"]
    assert rows == {"run-0": 8, "run-1": 3}


def test_warehouse_run_errors_name_run_id(warehouse: Warehouse):
    warehouse.start_run("run-1", "0.1.0", {})

    with pytest.raises(TerralayrError, match="'run-1' is already recorded"):
        warehouse.start_run("run-1", "0.1.0", {})
    with pytest.raises(TerralayrError, match="'run-2' is not recorded"):
        warehouse.finish_run("run-2", status="failed", windows=0, requests=0, retries=0, rows=0, check_summary={})


def test_warehouse_close_releases_lock(tmp_path: Path):
    path = tmp_path / "warehouse.duckdb"
    first = Warehouse(path)
    first.close()
    first.close()

    with Warehouse(path) as second:
        assert second.connection.execute("select 1").fetchone() == (1,)
