"""Tests for terralayr_etl.storage against real Parquet files in a temp folder."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from terralayr_etl import storage
from terralayr_etl.errors import DiskFullError, InvalidEntityIdError, TerralayrError
from terralayr_etl.normalise import BUCKET_SCHEMA, ENCODED_LONG_SCHEMA, LONG_SCHEMA
from terralayr_etl.storage import ParquetStore

FETCHED_AT = datetime(2025, 11, 1, 3, 0, tzinfo=UTC)
VA_ID = "38421b10-96fe-569f-8d56-bff0ee2dc95b"
OTHER_VA_ID = "9e16f4da-6d4c-5454-a2d4-0e45c049d6f7"
DAY = datetime(2025, 11, 3, 0, 0, tzinfo=UTC)


def _datapoints(
    start: datetime,
    count: int,
    *,
    entity_id: str = VA_ID,
    categories: tuple[str, ...] = ("revenue_wholesale",),
    value_offset: float = 0.0,
    run_id: str = "run-1",
) -> pa.Table:
    rows = []
    for category in categories:
        for index in range(count):
            rows.append(
                {
                    "entity_type": "virtual_asset",
                    "entity_id": entity_id,
                    "resolution": "15min",
                    "category": category,
                    "period_start": start + timedelta(minutes=15 * index),
                    "value": float(index) + value_offset,
                    "unit": "EUR",
                    "run_id": run_id,
                    "fetched_at": FETCHED_AT,
                    "endpoint": "/datapoints",
                }
            )
    return pa.Table.from_pylist(rows, schema=LONG_SCHEMA)


def _files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def test_store_layout_uses_berlin_month(tmp_path: Path):
    store = ParquetStore(tmp_path)
    # 22:45Z on 31 Oct is 23:45 in Berlin (October); 23:00Z is midnight of 1 November.
    table = _datapoints(datetime(2025, 10, 31, 22, 45, tzinfo=UTC), 2)

    written = store.write_datapoints(table)

    expected = [
        # Friday 31 October belongs to the week block from Monday 27 October; 1 November
        # starts a new block because blocks are cut at month boundaries.
        f"parquet/datapoints/resolution=15min/entity_type=virtual_asset/month=2025-10/{VA_ID}_2025-10-27.parquet",
        f"parquet/datapoints/resolution=15min/entity_type=virtual_asset/month=2025-11/{VA_ID}_2025-11-01.parquet",
    ]
    assert _files_under(tmp_path) == expected
    assert sorted(str(path.relative_to(tmp_path)) for path in written) == expected


def test_store_syncs_each_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    synced_folders: list[str] = []
    real_fsync = storage.os.fsync

    def recording_fsync(descriptor: int) -> None:
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):
            synced_folders.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        real_fsync(descriptor)

    monkeypatch.setattr(storage.os, "fsync", recording_fsync)
    store = ParquetStore(tmp_path)
    # Two days in October and two in November: two files in each of two month folders.
    for day in (27, 30):
        store.write_datapoints(_datapoints(datetime(2025, 10, day, tzinfo=UTC), 4))
    for day in (3, 10):
        store.write_datapoints(_datapoints(datetime(2025, 11, day, tzinfo=UTC), 4))
    folders_before_sync = list(synced_folders)

    synced = store.sync_folders()

    assert folders_before_sync == []
    assert synced == 2
    assert sorted(Path(folder).name for folder in synced_folders) == ["month=2025-10", "month=2025-11"]
    assert store.sync_folders() == 0


def test_store_splits_window_at_month_end(tmp_path: Path):
    store = ParquetStore(tmp_path)
    # Eight quarter-hours from 22:00Z on 31 October: the first four are 23:00 to 23:45 in
    # Berlin on 31 October, the last four (from 23:00Z) fall on 1 November.
    categories = ("revenue_wholesale", "revenue_fcr")
    table = _datapoints(datetime(2025, 10, 31, 22, 0, tzinfo=UTC), 8, categories=categories)

    october, november = sorted(store.write_datapoints(table))
    october_rows = pq.read_table(october).to_pylist()
    november_rows = pq.read_table(november).to_pylist()

    assert [row["category"] for row in october_rows] == ["revenue_wholesale"] * 4 + ["revenue_fcr"] * 4
    assert [row["value"] for row in october_rows] == [0.0, 1.0, 2.0, 3.0] * 2
    assert [row["value"] for row in november_rows] == [4.0, 5.0, 6.0, 7.0] * 2
    assert all(row["period_start"] >= datetime(2025, 10, 31, 23, 0, tzinfo=UTC) for row in november_rows)


def test_store_files_omit_partition_columns(tmp_path: Path):
    store = ParquetStore(tmp_path)

    (path,) = store.write_datapoints(_datapoints(datetime(2025, 1, 1, tzinfo=UTC), 3))

    schema = pq.read_schema(path)
    assert "resolution" not in schema.names
    assert "entity_type" not in schema.names
    assert "month" not in schema.names
    assert schema.field("period_start").type == pa.timestamp("us", tz="UTC")
    assert schema.field("value").type == pa.float64()


def _two_categories(form: str) -> pa.Table:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    if form == "one chunk per category":
        # Two chunks whose category dictionaries have one label each, two labels in all.
        return pa.concat_tables(
            [_datapoints(start, 3, categories=(category,)).cast(ENCODED_LONG_SCHEMA) for category in ("revenue_wholesale", "revenue_fcr")]
        )
    table = _datapoints(start, 3, categories=("revenue_wholesale", "revenue_fcr"))
    return table.cast(ENCODED_LONG_SCHEMA) if form == "dictionaries" else table


def _compression_by_column(path: Path) -> dict[str, str]:
    row_group = pq.ParquetFile(path).metadata.row_group(0)
    return {row_group.column(i).path_in_schema: row_group.column(i).compression for i in range(row_group.num_columns)}


def _rows_by_key(table: pa.Table) -> list[dict]:
    return table.sort_by([("category", "ascending"), ("period_start", "ascending")]).to_pylist()


SINGLE_LABELS_UNCOMPRESSED = {
    "entity_id": "UNCOMPRESSED",
    "category": "ZSTD",
    "period_start": "ZSTD",
    "value": "ZSTD",
    "unit": "UNCOMPRESSED",
    "run_id": "UNCOMPRESSED",
    "fetched_at": "ZSTD",
    "endpoint": "UNCOMPRESSED",
}


@pytest.mark.parametrize("form", ["dictionaries", "plain strings", "one chunk per category"])
def test_store_leaves_single_label_columns_uncompressed(tmp_path: Path, form: str):
    store = ParquetStore(tmp_path)
    table = _two_categories(form)

    (path,) = store.write_datapoints(table)

    assert _compression_by_column(path) == SINGLE_LABELS_UNCOMPRESSED
    assert _rows_by_key(pq.read_table(path)) == _rows_by_key(table.drop_columns(["entity_type", "resolution"]).cast(
        pa.schema([field for field in LONG_SCHEMA if field.name not in ("entity_type", "resolution")])
    ))


def test_store_merge_keeps_single_label_columns_uncompressed(tmp_path: Path):
    store = ParquetStore(tmp_path)
    store.write_datapoints(_two_categories("dictionaries"))

    (path,) = store.write_datapoints(_datapoints(datetime(2025, 1, 1, 0, 30, tzinfo=UTC), 3, value_offset=10.0))

    assert _compression_by_column(path) == SINGLE_LABELS_UNCOMPRESSED
    assert pq.read_metadata(path).num_rows == 6 + 2


def _labels(*chunks: tuple[list[str], list[int]]) -> pa.ChunkedArray:
    """A dictionary-encoded column with one chunk per (dictionary, indices) pair."""
    return pa.chunked_array(
        [pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), pa.array(dictionary)) for dictionary, indices in chunks]
    )


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        (_labels((["a"], [0, 0])), "a"),
        (_labels((["a", "b", "c"], [1, 1, 1])), "b"),
        (_labels((["a", "b", "c"], [0, 2, 0])), None),
        # Two entries with one text: the rows hold one label.
        (_labels((["a", "b", "a"], [0, 2, 0])), "a"),
        (_labels((["a", "b", "a"], [0, 1])), None),
        (_labels((["a"], [0]), (["b", "a"], [1, 1])), "a"),
        (_labels((["a"], [0]), (["b"], [0])), None),
        (_labels((["a", "b"], [0, None])), None),
        (pa.chunked_array([pa.array(["x", "x"])]), "x"),
        (pa.chunked_array([pa.array(["x", "y"])]), None),
    ],
)
def test_only_value_of_label_columns(column: pa.ChunkedArray, expected: str | None):
    assert storage._only_value(column) == expected


def test_store_casts_polars_frame_to_long_schema(tmp_path: Path):
    store = ParquetStore(tmp_path)
    frame = pl.from_arrow(_datapoints(datetime(2025, 1, 1, tzinfo=UTC), 2)).with_columns(
        pl.col("value").cast(pl.Int64), pl.col("period_start").dt.cast_time_unit("ns")
    )

    (path,) = store.write_datapoints(frame)

    schema = pq.read_schema(path)
    assert schema.field("value").type == pa.float64()
    assert schema.field("period_start").type == pa.timestamp("us", tz="UTC")


def test_store_merge_replaces_values_without_duplicates(tmp_path: Path):
    store = ParquetStore(tmp_path)
    day = datetime(2025, 1, 1, tzinfo=UTC)
    store.write_datapoints(_datapoints(day, 8))

    # A re-run over the last 4 periods with corrected values, plus 4 new periods.
    (path,) = store.write_datapoints(_datapoints(day + timedelta(hours=1), 8, value_offset=100.0, run_id="run-2"))

    rows = pq.read_table(path).to_pylist()
    assert len(rows) == 12
    assert len({row["period_start"] for row in rows}) == 12
    by_start = {row["period_start"]: row for row in rows}
    assert by_start[day]["value"] == 0.0
    assert by_start[day]["run_id"] == "run-1"
    assert by_start[day + timedelta(hours=1)]["value"] == 100.0
    assert by_start[day + timedelta(hours=1)]["run_id"] == "run-2"


def test_store_rerun_keeps_row_count(tmp_path: Path):
    store = ParquetStore(tmp_path)
    table = _datapoints(datetime(2025, 1, 1, tzinfo=UTC), 96, categories=("revenue_wholesale", "revenue_fcr"))

    (path,) = store.write_datapoints(table)
    store.write_datapoints(table)

    assert pq.read_metadata(path).num_rows == 192


def test_store_write_leaves_no_temp_file(tmp_path: Path):
    store = ParquetStore(tmp_path)

    (path,) = store.write_datapoints(_datapoints(datetime(2025, 1, 1, tzinfo=UTC), 4))
    store.write_datapoints(_datapoints(datetime(2025, 1, 1, 1, tzinfo=UTC), 4))

    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_store_failure_before_replace_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = ParquetStore(tmp_path)
    day = datetime(2025, 1, 1, tzinfo=UTC)
    (path,) = store.write_datapoints(_datapoints(day, 4))
    before = path.read_bytes()

    def fail_replace(source: object, target: object) -> None:
        raise RuntimeError("killed between write and replace")

    monkeypatch.setattr(storage.os, "replace", fail_replace)
    with pytest.raises(RuntimeError, match="killed"):
        store.write_datapoints(_datapoints(day, 4, value_offset=50.0))

    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_store_full_disk_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = ParquetStore(tmp_path)
    day = datetime(2025, 1, 1, tzinfo=UTC)
    (path,) = store.write_datapoints(_datapoints(day, 4))
    before = path.read_bytes()

    def full_disk(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "fsync", full_disk)
    with pytest.raises(TerralayrError) as caught:
        store.write_datapoints(_datapoints(day, 4, value_offset=50.0))

    assert str(path) in str(caught.value)
    assert "free disk space" in str(caught.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def _file_fsyncs(monkeypatch: pytest.MonkeyPatch, before=None) -> list[tuple[str, str]]:
    """Record (thread name, temp file name) for every fsync of a file; call ``before`` first."""
    calls: list[tuple[str, str]] = []
    real_fsync = storage.os.fsync

    def recording_fsync(descriptor: int) -> None:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):
            if before is not None:
                before()
            calls.append((threading.current_thread().name, Path(os.readlink(f"/proc/self/fd/{descriptor}")).name))
        real_fsync(descriptor)

    monkeypatch.setattr(storage.os, "fsync", recording_fsync)
    return calls


def test_background_commits_off_writer_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fsyncs = _file_fsyncs(monkeypatch)
    renames: list[tuple[str, str]] = []
    real_replace = storage.os.replace

    def recording_replace(source, target) -> None:
        renames.append((Path(source).name, Path(target).name))
        real_replace(source, target)

    monkeypatch.setattr(storage.os, "replace", recording_replace)
    store = ParquetStore(tmp_path)
    with store.background_commits():
        written = [store.write_datapoints(_datapoints(datetime(2025, 11, day, tzinfo=UTC), 4)) for day in (3, 10, 17)]

    paths = [path for files in written for path in files]
    assert len(paths) == 3
    assert [pq.read_table(path).num_rows for path in paths] == [4, 4, 4]
    assert {thread for thread, _ in fsyncs} == {"parquet-commit_0"}
    # Each temp file is fsynced before it is renamed over its path.
    assert [name for name, _ in renames] == [name for _, name in fsyncs]
    assert [target for _, target in renames] == [path.name for path in paths]
    assert store.sync_folders() == 1
    assert _files_under(tmp_path) == sorted(str(path.relative_to(tmp_path)) for path in paths)


def test_background_commits_merge_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A slow disk: the first file is still waiting for its rename when the second write of
    # the same block starts, which must merge into it rather than replace it.
    fsync_may_finish = threading.Event()
    _file_fsyncs(monkeypatch, before=lambda: fsync_may_finish.wait(timeout=10))
    store = ParquetStore(tmp_path)
    with store.background_commits():
        (path,) = store.write_datapoints(_datapoints(DAY, 4))
        assert not path.exists()
        threading.Timer(0.2, fsync_may_finish.set).start()
        store.write_datapoints(_datapoints(DAY + timedelta(hours=1), 4, categories=("revenue_fcr",)))

    stored = pl.read_parquet(path)
    assert stored.height == 8
    assert sorted(set(stored["category"])) == ["revenue_fcr", "revenue_wholesale"]


def test_background_commits_bound_pending_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(storage, "MAX_PENDING_COMMITS", 1)
    fsync_may_finish = threading.Event()
    _file_fsyncs(monkeypatch, before=lambda: fsync_may_finish.wait(timeout=10))
    store = ParquetStore(tmp_path)
    with store.background_commits():
        store.write_datapoints(_datapoints(DAY, 4))
        second = threading.Thread(target=store.write_datapoints, args=(_datapoints(DAY + timedelta(days=7), 4),))
        second.start()
        second.join(timeout=0.3)
        blocked = second.is_alive()
        fsync_may_finish.set()
        second.join(timeout=10)

    assert blocked
    assert len(_files_under(tmp_path)) == 2


def test_background_commits_full_disk_at_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = ParquetStore(tmp_path)
    (path,) = store.write_datapoints(_datapoints(DAY, 4))
    before = path.read_bytes()

    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    _file_fsyncs(monkeypatch, before=full_disk)
    with pytest.raises(TerralayrError) as caught, store.background_commits():
        # The write itself returns; the fsync on the background thread fails.
        store.write_datapoints(_datapoints(DAY, 4, value_offset=50.0))

    assert str(path) in str(caught.value)
    assert "free disk space" in str(caught.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_background_commits_block_error_wins(tmp_path: Path):
    store = ParquetStore(tmp_path)
    with pytest.raises(KeyboardInterrupt), store.background_commits():
        (path,) = store.write_datapoints(_datapoints(DAY, 4))
        raise KeyboardInterrupt

    # The files written before the error are complete and in place.
    assert pq.read_table(path).num_rows == 4
    assert _files_under(tmp_path) == [str(path.relative_to(tmp_path))]


def test_background_commits_error_over_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    _file_fsyncs(monkeypatch, before=full_disk)
    store = ParquetStore(tmp_path)
    with caplog.at_level("ERROR", logger="terralayr_etl.storage"):
        with pytest.raises(KeyboardInterrupt), store.background_commits():
            (path,) = store.write_datapoints(_datapoints(DAY, 4))
            raise KeyboardInterrupt

    assert [record.getMessage() for record in caplog.records] == [
        f"1 Parquet files could not be written, the first: no space left on the device while writing {path}; "
        "free disk space there and rerun (the previous file is unchanged)"
    ]
    assert _files_under(tmp_path) == []


def test_background_commits_later_writes_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def full_disk() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    _file_fsyncs(monkeypatch, before=full_disk)
    store = ParquetStore(tmp_path)
    with pytest.raises(DiskFullError), store.background_commits():
        (first,) = store.write_datapoints(_datapoints(DAY, 4))
        # The same file: the write waits for the failed rename and raises its error.
        with pytest.raises(DiskFullError, match=re.escape(str(first))):
            store.write_datapoints(_datapoints(DAY, 4, value_offset=1.0))
        # Another file: the write raises the first failure again instead of writing.
        with pytest.raises(DiskFullError, match=re.escape(str(first))):
            store.write_datapoints(_datapoints(DAY + timedelta(days=7), 4))

    assert _files_under(tmp_path) == []


def test_background_commits_late_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A fetch thread that still writes while the block ends on an error: its file waits for a
    # free place until the block's end has begun, and must then be written, not dropped.
    monkeypatch.setattr(storage, "MAX_PENDING_COMMITS", 1)
    fsync_may_finish = threading.Event()
    _file_fsyncs(monkeypatch, before=lambda: fsync_may_finish.wait(timeout=10))
    store = ParquetStore(tmp_path)
    errors: list[BaseException] = []

    def late_write() -> None:
        try:
            store.write_datapoints(_datapoints(DAY + timedelta(days=7), 4))
        except BaseException as exc:
            errors.append(exc)

    late = threading.Thread(target=late_write)
    with pytest.raises(KeyboardInterrupt), store.background_commits():
        store.write_datapoints(_datapoints(DAY, 4))
        late.start()
        late.join(timeout=0.3)
        waiting = late.is_alive()
        threading.Timer(0.3, fsync_may_finish.set).start()
        raise KeyboardInterrupt
    late.join(timeout=10)

    assert waiting
    assert errors == []
    assert len(_files_under(tmp_path)) == 2


def test_store_clean_temp_files_removes_leftovers(tmp_path: Path):
    store = ParquetStore(tmp_path)
    (path,) = store.write_datapoints(_datapoints(datetime(2025, 1, 1, tzinfo=UTC), 4))
    leftover = path.with_name(f".{path.name}.tmp-0123abcd")
    leftover.write_bytes(b"half a file")

    removed = store.clean_temp_files()

    assert removed == 1
    assert not leftover.exists()
    assert path.exists()


def test_store_rejects_unsafe_entity_id(tmp_path: Path):
    data_dir = tmp_path / "data"
    store = ParquetStore(data_dir)
    table = _datapoints(datetime(2025, 1, 1, tzinfo=UTC), 2, entity_id="../x")

    with pytest.raises(InvalidEntityIdError, match=r"'\.\./x'"):
        store.write_datapoints(table)

    assert _files_under(tmp_path) == []


def test_store_rejects_path_leaving_data_dir_by_symlink(tmp_path: Path):
    data_dir = tmp_path / "data"
    outside = tmp_path / "outside"
    outside.mkdir()
    (data_dir / "parquet").mkdir(parents=True)
    (data_dir / "parquet" / "datapoints").symlink_to(outside, target_is_directory=True)
    store = ParquetStore(data_dir)

    with pytest.raises(InvalidEntityIdError, match="outside the data dir"):
        store.write_datapoints(_datapoints(datetime(2025, 1, 1, tzinfo=UTC), 2))

    assert _files_under(outside) == []


def test_store_rejects_unknown_resolution(tmp_path: Path):
    table = _datapoints(datetime(2025, 1, 1, tzinfo=UTC), 2).set_column(
        2, "resolution", pa.array(["weekly", "weekly"], pa.string())
    )

    with pytest.raises(InvalidEntityIdError, match="invalid resolution 'weekly'"):
        ParquetStore(tmp_path).write_datapoints(table)


def test_store_parallel_writers_keep_all_rows(tmp_path: Path):
    store = ParquetStore(tmp_path)
    day = datetime(2025, 1, 1, tzinfo=UTC)
    windows = [_datapoints(day + timedelta(hours=6 * i), 24) for i in range(8)]
    errors: list[BaseException] = []

    def write(table: pa.Table) -> None:
        try:
            store.write_datapoints(table)
        except BaseException as exc:  # collected so the main thread can fail the test
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(window,)) for window in windows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    (path,) = list((tmp_path / "parquet").rglob("*.parquet"))
    assert pq.read_metadata(path).num_rows == 8 * 24


def _write_two_entities_two_months(tmp_path: Path) -> Path:
    store = ParquetStore(tmp_path)
    store.write_datapoints(_datapoints(datetime(2025, 10, 31, 22, 0, tzinfo=UTC), 8))
    store.write_datapoints(_datapoints(datetime(2025, 10, 31, 22, 0, tzinfo=UTC), 8, entity_id=OTHER_VA_ID))
    store.clean_temp_files()
    # A leftover temp file must not confuse any reader.
    month_folder = next((tmp_path / "parquet").rglob("month=2025-11"))
    (month_folder / f".{VA_ID}.parquet.tmp-deadbeef").write_bytes(b"partial")
    return tmp_path / "parquet" / "datapoints"


def test_store_dataset_reads_with_duckdb(tmp_path: Path):
    root = _write_two_entities_two_months(tmp_path)

    rows = duckdb.sql(
        f"""
        select resolution, entity_type, month, count(*) as row_count, count(distinct entity_id) as entities
        from read_parquet('{root}/**/*.parquet', hive_partitioning = true)
        group by all
        order by month
        """
    ).fetchall()

    assert rows == [("15min", "virtual_asset", "2025-10", 8, 2), ("15min", "virtual_asset", "2025-11", 8, 2)]


def test_store_dataset_reads_with_polars(tmp_path: Path):
    root = _write_two_entities_two_months(tmp_path)

    frame = pl.scan_parquet(root / "**" / "*.parquet", hive_partitioning=True).collect()

    assert frame.height == 16
    assert set(frame["resolution"].to_list()) == {"15min"}
    assert set(frame["entity_type"].to_list()) == {"virtual_asset"}
    assert sorted(set(frame["month"].cast(pl.String).to_list())) == ["2025-10", "2025-11"]
    assert frame.schema["period_start"] == pl.Datetime("us", "UTC")


def test_store_dataset_reads_with_pyarrow(tmp_path: Path):
    root = _write_two_entities_two_months(tmp_path)

    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()

    assert table.num_rows == 16
    assert set(table.column("resolution").to_pylist()) == {"15min"}
    assert set(table.column("month").to_pylist()) == {"2025-10", "2025-11"}
    assert set(table.column("entity_id").to_pylist()) == {VA_ID, OTHER_VA_ID}


def _buckets(starts: list[datetime], revenue_eur: float, product: str = "tolling") -> pa.Table:
    rows = [
        {
            "entity_id": VA_ID,
            "product": product,
            "bucket_start": start,
            "bucket_end": start + timedelta(days=1),
            "revenue_eur": revenue_eur,
            "currency": "EUR",
            "run_id": "run-1",
            "fetched_at": FETCHED_AT,
            "endpoint": "/tolling",
        }
        for start in starts
    ]
    return pa.Table.from_pylist(rows, schema=BUCKET_SCHEMA)


def test_store_revenue_buckets_layout_and_merge(tmp_path: Path):
    store = ParquetStore(tmp_path)
    # Local midnight of 1 November 2025 is 23:00Z on 31 October.
    starts = [datetime(2025, 10, 30, 23, tzinfo=UTC), datetime(2025, 10, 31, 23, tzinfo=UTC)]

    store.write_revenue_buckets(_buckets(starts, 10.0))
    written = store.write_revenue_buckets(_buckets(starts[1:], 20.0))

    assert _files_under(tmp_path / "parquet") == [
        f"revenue_buckets/product=tolling/month=2025-10/{VA_ID}_2025-10-01.parquet",
        f"revenue_buckets/product=tolling/month=2025-11/{VA_ID}_2025-11-01.parquet",
    ]
    (november,) = written
    rows = pq.read_table(november).to_pylist()
    assert [row["revenue_eur"] for row in rows] == [20.0]
    assert "product" not in pq.read_schema(november).names


def test_store_revenue_buckets_reject_unsafe_product(tmp_path: Path):
    with pytest.raises(InvalidEntityIdError, match="product"):
        ParquetStore(tmp_path).write_revenue_buckets(_buckets([datetime(2025, 1, 1, tzinfo=UTC)], 1.0, "a/b"))

    assert _files_under(tmp_path) == []


def test_store_empty_table_writes_nothing(tmp_path: Path):
    written = ParquetStore(tmp_path).write_datapoints(LONG_SCHEMA.empty_table())

    assert written == []
    assert not os.path.exists(tmp_path / "parquet")


def _encoded(table: pa.Table, category_dictionary: list[str], category_indices: list[int]) -> pa.Table:
    """Return ``table`` with dictionary-encoded labels, as normalise_datapoints returns them."""
    encoded = table.cast(ENCODED_LONG_SCHEMA)
    category = pa.DictionaryArray.from_arrays(pa.array(category_indices, pa.int32()), pa.array(category_dictionary))
    return encoded.set_column(encoded.schema.get_field_index("category"), "category", category)


def test_store_writes_encoded_labels_as_strings(tmp_path: Path):
    table = _encoded(_datapoints(DAY, 2, categories=("a", "b")), ["revenue_fcr", "revenue_wholesale"], [0, 0, 1, 1])

    (path,) = ParquetStore(tmp_path).write_datapoints(table)

    stored = pq.read_table(path)
    assert stored.schema.field("category").type == pa.string()
    assert stored.schema.field("entity_id").type == pa.string()
    assert stored["category"].to_pylist() == ["revenue_fcr", "revenue_fcr", "revenue_wholesale", "revenue_wholesale"]


def test_store_repeated_dictionary_value_deduplicates(tmp_path: Path):
    # Two dictionary entries spell the same category, so its rows form two runs whose
    # instants repeat: the later run must win, as for plain strings.
    table = _encoded(
        _datapoints(DAY, 2, categories=("a", "b", "c"), value_offset=0.0),
        ["revenue_fcr", "revenue_wholesale", "revenue_fcr"],
        [0, 0, 1, 1, 2, 2],
    )
    table = table.set_column(table.schema.get_field_index("value"), "value", pa.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))

    (path,) = ParquetStore(tmp_path).write_datapoints(table)

    stored = pq.read_table(path).sort_by([("category", "ascending"), ("period_start", "ascending")])
    assert stored.num_rows == 4
    assert stored["category"].to_pylist() == ["revenue_fcr", "revenue_fcr", "revenue_wholesale", "revenue_wholesale"]
    assert stored["value"].to_pylist() == [5.0, 6.0, 3.0, 4.0]
