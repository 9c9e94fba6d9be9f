"""Hive-partitioned Parquet dataset of data points and revenue buckets, written atomically.

Layout under ``<data_dir>/parquet/``::

    datapoints/resolution=<r>/entity_type=<t>/month=<YYYY-MM>/<entity_id>_<block start>.parquet
    revenue_buckets/product=<p>/month=<YYYY-MM>/<virtual_asset_id>_<block start>.parquet

``month`` is the month of the Europe/Berlin delivery day that contains ``period_start`` (or
``bucket_start``). A file holds one entity's block (``timeutil.file_block_start``): a week cut
at month ends for 15-minute data, a month otherwise. Request windows cover whole blocks, so a
backfill writes each file once and only overlapping re-runs merge. Partition columns are not stored inside the files, so hive-aware readers
(DuckDB ``read_parquet(..., hive_partitioning=true)``, ``polars.scan_parquet(...,
hive_partitioning=True)``, ``pyarrow.dataset.dataset(..., partitioning="hive")``) add them.

A write merges its rows into the existing month file, replacing rows with the same key, then
writes a hidden temp file in the same folder, fsyncs it and renames it over the old file. A
reader sees the old file or the new one, never a partial file, and a re-run adds no
duplicates. ``sync_folders`` makes the renames durable, once per folder, before the load.
Temp names start with ``.`` and do not end in ``.parquet``, so the readers above skip them.

Inside ``ParquetStore.background_commits`` the fsync and the rename of each file happen on one
background thread, so a fetch thread goes on with its next window while the disk catches up.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from terralayr_etl.config import ENTITY_TYPES, RESOLUTIONS
from terralayr_etl.resources import CPU_SLOTS
from terralayr_etl.errors import DiskFullError, InvalidEntityIdError, TerralayrError, one_line
from terralayr_etl.ids import validate_entity_id
from terralayr_etl.normalise import (
    BUCKET_SCHEMA,
    LONG_SCHEMA,
    comparable,
    decode_labels,
    strictly_increasing_per_series,
)
from terralayr_etl.timeutil import (
    LOCAL_TZ,
    day_range,
    epoch_microseconds,
    file_block_start,
    local_day_of,
    local_midnight,
)

if TYPE_CHECKING:
    # Imported where used: polars maps about 30 MB of library code, and a backfill that
    # writes only new files of one entity each never needs it.
    import polars as pl

logger = logging.getLogger(__name__)

PARQUET_COMPRESSION = "zstd"
TEMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class _Dataset:
    """Folder layout, file schema and row key of one stored table."""

    name: str
    schema: pa.Schema
    partition_columns: tuple[str, ...]
    """Hive folder levels above ``month``, outermost first. They are not stored in the files."""
    instant_column: str
    """The UTC instant whose Europe/Berlin delivery day picks the month folder and block."""
    fixed_resolution: str | None
    """Block rule for datasets without a resolution column."""
    key: tuple[str, ...]
    """Columns inside a file that identify a row. A new row replaces a stored row with the same key."""
    sort_key: tuple[str, ...]
    """Row order inside a merged file; entity_id is left out because each file contains one
    entity. A new file keeps the order of its response, whose series are already contiguous."""

    @property
    def file_schema(self) -> pa.Schema:
        names = [name for name in self.schema.names if name not in self.partition_columns]
        return pa.schema([self.schema.field(name) for name in names])


_DATAPOINTS = _Dataset(
    name="datapoints",
    schema=LONG_SCHEMA,
    partition_columns=("resolution", "entity_type"),
    instant_column="period_start",
    fixed_resolution=None,
    key=("entity_id", "category", "period_start"),
    sort_key=("category", "period_start"),
)
_REVENUE_BUCKETS = _Dataset(
    name="revenue_buckets",
    schema=BUCKET_SCHEMA,
    partition_columns=("product",),
    instant_column="bucket_start",
    fixed_resolution="daily",
    key=("entity_id", "bucket_start"),
    sort_key=("bucket_start",),
)

# Locks shared by every ParquetStore in this process, so that threads writing to the same
# file merge one after another. A file maps to one of a fixed set of locks, because a lock per
# file would grow with every file a long backfill writes. Two files may share a lock, which
# only makes their writes wait for each other.
_FILE_LOCKS = tuple(threading.Lock() for _ in range(256))


def _lock_for(path: Path) -> threading.Lock:
    return _FILE_LOCKS[hash(str(path)) % len(_FILE_LOCKS)]


class ParquetStore:
    """The Parquet dataset under ``<data_dir>/parquet``.

    Example::

        store = ParquetStore(Path("data"))
        store.clean_temp_files()
        files = store.write_datapoints(page.table)
    """

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir).resolve()
        self.root = self.data_dir / "parquet"
        self._unsynced_folders: set[Path] = set()
        self._folders_lock = threading.Lock()
        self._committer: _Committer | None = None

    def write_datapoints(self, table: pa.Table | pl.DataFrame) -> list[Path]:
        """Merge LONG_SCHEMA rows into their month files and return the files written.

        A row replaces a stored row with the same entity type, entity id, resolution,
        category and period_start. Other stored rows are kept.
        """
        return self._write(_DATAPOINTS, table)

    def write_revenue_buckets(self, table: pa.Table | pl.DataFrame) -> list[Path]:
        """Merge BUCKET_SCHEMA rows into their month files and return the files written.

        A row replaces a stored row with the same virtual asset, product and bucket_start.
        """
        return self._write(_REVENUE_BUCKETS, table)

    @contextmanager
    def background_commits(self) -> Iterator[None]:
        """Fsync and rename the files written inside the block on a background thread.

        A write then returns once its temp file is written, and the file appears at its path
        a moment later. Merging into a file waits for that file's pending rename, and the
        block's end waits for all of them. If a rename failed, every later write in the block
        raises its error again, and so does the end (unless the block raised an error of its
        own, which then wins). The paths of the failed files hold their previous content. Use it around the writes of many threads: in W2's replay,
        fetch threads waited 0.7 s in fsync, which the background thread now does instead.
        Writes outside the block fsync and rename before they return.
        """
        if self._committer is not None:
            raise RuntimeError("background_commits is already active for this store; end that block first")
        committer = _Committer(self._renamed_in)
        self._committer = committer
        try:
            yield
        except BaseException:
            try:
                committer.close()
            finally:
                self._committer = None
            raise
        try:
            committer.close(raise_first=True)
        finally:
            self._committer = None

    def sync_folders(self) -> int:
        """Persist the renames of the files written since the last call, and return the folder count.

        Each file's data is on the disk before its rename. The rename itself lives in its
        folder, which this syncs once per folder instead of once per file. W2's replay writes
        807 files in 48 folders, and was faster this way in 10 of 11 alternating pairs (median
        4%). Call it before anything depends on the files, such as a load into DuckDB.
        """
        with self._folders_lock:
            folders = sorted(self._unsynced_folders)
            self._unsynced_folders.clear()
        for folder in folders:
            _fsync_directory(folder)
        return len(folders)

    def clean_temp_files(self) -> int:
        """Delete temp files left by a killed run and return how many were deleted.

        Call this at startup, before any write. A temp file of a write still running in
        this or another process would be deleted too.
        """
        if not self.root.exists():
            return 0
        removed = 0
        for path in self.root.rglob(f".*{TEMP_MARKER}*"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.info("Deleted %d temp files left by an earlier run under %s", removed, self.root)
        return removed

    def _renamed_in(self, folder: Path) -> None:
        with self._folders_lock:
            self._unsynced_folders.add(folder)

    def _write(self, dataset: _Dataset, table: pa.Table | pl.DataFrame) -> list[Path]:
        with CPU_SLOTS:
            return self._write_files(dataset, table)

    def _write_files(self, dataset: _Dataset, table: pa.Table | pl.DataFrame) -> list[Path]:
        arrow = _conform(table, dataset.schema)
        if arrow.num_rows == 0:
            return []
        if arrow[dataset.instant_column].null_count:
            raise ValueError(f"{dataset.instant_column} has nulls; every stored row needs its UTC instant")

        # A window's rows belong to one entity and resolution and usually make one file. They
        # are split by block in Arrow, without the polars partitioning below, whose first use
        # starts polars' thread pools: 70 to 80 MB more RSS for the rest of the process.
        parts = _parts_by_block(dataset, arrow)
        if parts is not None:
            written = []
            for values, rows in parts:
                path = self._file_path(dataset, values)
                with _lock_for(path):
                    self._merge_into(dataset, path, rows.drop_columns(list(dataset.partition_columns)))
                written.append(path)
            return written

        import polars as pl

        frame = pl.from_arrow(decode_labels(arrow))
        frame = frame.join(_blocks_of(dataset, frame), on=_block_inputs(dataset), how="left", maintain_order="left")

        group_columns = [*dataset.partition_columns, _BLOCK, "entity_id"]
        written = []
        for group_key, rows in frame.partition_by(group_columns, as_dict=True, maintain_order=True).items():
            values = dict(zip(group_columns, group_key, strict=True))
            block = values.pop(_BLOCK)
            path = self._file_path(dataset, _file_values(values, block))
            with _lock_for(path):
                self._merge_into(dataset, path, rows.drop([*dataset.partition_columns, _BLOCK]))
            written.append(path)
        return written

    def _file_path(self, dataset: _Dataset, values: dict[str, str]) -> Path:
        """Build the file path for one group of rows, validating every id and the final location."""
        folder = self.root / dataset.name
        for column in dataset.partition_columns:
            folder = folder / f"{column}={_validate_partition_value(column, values[column])}"
        entity_id = validate_entity_id(values["entity_id"])
        path = folder / f"month={values['month']}" / f"{entity_id}_{values['block']}.parquet"

        resolved = path.resolve()
        if not resolved.is_relative_to(self.data_dir):
            raise InvalidEntityIdError(
                f"the Parquet path {resolved} for entity id {entity_id!r} is outside the data dir {self.data_dir}; "
                "check the data dir for symbolic links"
            )
        return resolved

    def _merge_into(self, dataset: _Dataset, path: Path, new_rows: pa.Table | pl.DataFrame) -> None:
        committer = self._committer
        if committer is not None:
            # The caller holds the file's lock, so no other write of this path can start.
            committer.wait_for(path)
        if isinstance(new_rows, pa.Table):
            if not path.exists() and _keys_unique(new_rows, dataset):
                # The common case of a backfill: a new file whose rows need no merge and no
                # de-duplication, written in the order the API sent them.
                self._write_atomically(_conform(new_rows, dataset.file_schema), path, dataset.key)
                logger.debug("Wrote %d rows to %s (new file)", new_rows.num_rows, path)
                return
        import polars as pl

        if isinstance(new_rows, pa.Table):
            new_rows = pl.from_arrow(decode_labels(new_rows))
        key = list(dataset.key)
        new_rows = _sorted_last_per_key(new_rows, list(dataset.sort_key))
        merged = new_rows
        replaced = 0
        if path.exists():
            stored = pl.from_arrow(pq.read_table(path).cast(dataset.file_schema))
            kept = stored.join(new_rows.select(key), on=key, how="anti")
            replaced = stored.height - kept.height
            merged = pl.concat([kept, new_rows.select(kept.columns)]).sort(list(dataset.sort_key))

        self._write_atomically(_conform(merged, dataset.file_schema), path, dataset.key)
        logger.debug("Wrote %d rows to %s (%d new, %d replaced)", merged.height, path, new_rows.height - replaced, replaced)

    def _write_atomically(self, table: pa.Table, path: Path, key: Sequence[str]) -> None:
        """Write ``table`` to a temp file beside ``path``, then fsync it and rename it over ``path``.

        On any failure the temp file is deleted and the old file, if any, stays as it was.
        Inside ``background_commits`` the fsync and rename happen on the background thread.
        """
        handle, temp_path = _write_temp_file(table, path, key)
        committer = self._committer
        if committer is not None:
            committer.submit(handle, temp_path, path)
        else:
            _commit(handle, temp_path, path)
            self._renamed_in(path.parent)


MAX_PENDING_COMMITS = 64
"""Written files that wait for the background thread's fsync and rename at a time."""


class _Committer:
    """A background thread that fsyncs written temp files and renames them, in the order written.

    Each waiting file stays open, so that its fsync reports any failed write of its pages.
    At most MAX_PENDING_COMMITS files wait at a time, and a writer that would add one more
    waits for a free place. After a failure every later write raises it again, so that the
    fetch stops at its next window instead of writing files that cannot be loaded.
    """

    def __init__(self, renamed_in: Callable[[Path], None]):
        self._renamed_in = renamed_in
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-commit")
        self._free_places = threading.BoundedSemaphore(MAX_PENDING_COMMITS)
        self._lock = threading.Lock()
        self._pending: dict[Path, Future[None]] = {}
        self._failures: list[BaseException] = []
        self._closed = False

    def submit(self, handle: IO[bytes], temp_path: Path, path: Path) -> None:
        """Queue the fsync of ``handle`` and the rename of ``temp_path`` to ``path``.

        Once ``close`` has begun, a late writer (a fetch thread still running when the block
        ended on an error) commits its file itself.
        """
        self._free_places.acquire()
        future: Future[None] = Future()
        with self._lock:
            failure = self._failures[0] if self._failures else None
            queued = failure is None and not self._closed
            if queued:
                self._pending[path] = future
                self._pool.submit(self._commit, handle, temp_path, path, future)
        if queued:
            return
        self._free_places.release()
        if failure is not None:
            _discard(handle, temp_path)
            raise copy.copy(failure) from failure
        _commit(handle, temp_path, path)
        self._renamed_in(path.parent)

    def wait_for(self, path: Path) -> None:
        """Wait until the queued write of ``path``, if any, is renamed; raise its error if it failed."""
        with self._lock:
            future = self._pending.get(path)
        if future is not None:
            future.result()

    def close(self, *, raise_first: bool = False) -> None:
        """Wait for every queued file; with ``raise_first``, raise the first failure."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)
        with self._lock:
            failures = list(self._failures)
        if not failures:
            return
        logger.error("%d Parquet files could not be written, the first: %s", len(failures), one_line(failures[0]))
        if raise_first:
            raise failures[0]

    def _commit(self, handle: IO[bytes], temp_path: Path, path: Path, future: Future[None]) -> None:
        try:
            _commit(handle, temp_path, path)
            self._renamed_in(path.parent)
        except BaseException as exc:
            with self._lock:
                # Kept in _pending, so that a later write of the same path raises it too.
                self._failures.append(exc)
            future.set_exception(exc)
        else:
            with self._lock:
                if self._pending.get(path) is future:
                    del self._pending[path]
            future.set_result(None)
        finally:
            self._free_places.release()


_BLOCK = "_block"
"""Helper column: the first local day of the row's storage block."""


def _parts_by_block(dataset: _Dataset, table: pa.Table) -> list[tuple[dict[str, str], pa.Table]] | None:
    """Split ``table`` into the rows of each file, or return None if it cannot be split here.

    The split needs one value in each partition column and in entity_id, and a known
    resolution. The rows of each block keep their order, and a table within one block is
    returned as it is. A block is a contiguous time span, so each row's block follows from
    the local midnights where blocks start, compared with its instant.
    """
    values: dict[str, str] = {}
    for column in [*dataset.partition_columns, "entity_id"]:
        value = _only_value(table[column])
        if value is None:
            return None
        values[column] = value
    resolution = dataset.fixed_resolution or values["resolution"]
    if resolution not in RESOLUTIONS:
        return None

    bounds = pc.min_max(table[dataset.instant_column])
    first_day = local_day_of(bounds["min"].as_py(), LOCAL_TZ)
    last_day = local_day_of(bounds["max"].as_py(), LOCAL_TZ)
    blocks = sorted({file_block_start(day, resolution) for day in day_range(first_day, last_day + timedelta(days=1))})
    if len(blocks) == 1:
        return [(_file_values(values, blocks[0]), table)]

    edges = np.array([epoch_microseconds(local_midnight(block, LOCAL_TZ)) for block in blocks[1:]], np.int64)
    instants = table[dataset.instant_column].combine_chunks().cast(pa.int64()).to_numpy()
    block_of_row = np.searchsorted(edges, instants, side="right")
    ordered = table.take(pa.array(np.argsort(block_of_row, kind="stable")))
    parts = []
    offset = 0
    for block, count in zip(blocks, np.bincount(block_of_row, minlength=len(blocks)).tolist(), strict=True):
        if count:
            parts.append((_file_values(values, block), ordered.slice(offset, count)))
        offset += count
    return parts


def _file_values(values: dict[str, str], block: date) -> dict[str, str]:
    """Add the month folder and the block of a file to its partition values and entity id."""
    # A block never crosses a month end, so its first day names the month folder.
    return {**values, "month": block.strftime("%Y-%m"), "block": block.isoformat()}


def _only_value(column: pa.ChunkedArray) -> str | None:
    """Return the value of a string column whose rows all share one value, else None.

    A dictionary-encoded column is read through the indices its rows use, so that no string
    is compared per row.
    """
    if column.null_count or len(column) == 0:
        return None
    if not pa.types.is_dictionary(column.type):
        bounds = pc.min_max(column)
        return bounds["min"].as_py() if bounds["min"] == bounds["max"] else None
    values: set[str] = set()
    for chunk in column.chunks:
        if len(chunk.dictionary) == 1:
            # normalise builds a label that is equal on every row with a one-entry dictionary.
            values.add(chunk.dictionary[0].as_py())
            continue
        bounds = pc.min_max(chunk.indices)
        if bounds["min"] == bounds["max"]:
            values.add(chunk.dictionary[bounds["min"].as_py()].as_py())
        elif pc.count_distinct(chunk.dictionary).as_py() == len(chunk.dictionary):
            # Rows point at two entries of a dictionary whose entries all differ, such as the
            # categories of a response: two labels, found without listing them.
            return None
        else:
            values.update(chunk.dictionary.take(pc.unique(chunk.indices)).to_pylist())
        if len(values) > 1:
            return None
    return values.pop() if len(values) == 1 else None


def _keys_unique(table: pa.Table, dataset: _Dataset) -> bool:
    """Return True when no two rows of one file's ``table`` share a key, checked without hashing.

    That holds when each series (the sort key without its instant) forms one contiguous run
    of rows whose instants rise strictly, as in a single response. A False result only means
    that the caller sorts and de-duplicates.
    """
    if table.num_rows < 2:
        return True
    if not strictly_increasing_per_series(table, list(dataset.sort_key), dataset.instant_column):
        return False
    for name in dataset.sort_key:
        if name == dataset.instant_column:
            continue
        column = comparable(table[name].combine_chunks())
        if column.null_count:
            return False
        changes = pc.sum(pc.not_equal(column.slice(1), column.slice(0, len(column) - 1))).as_py()
        if changes + 1 != pc.count_distinct(column).as_py():
            return False
    return True


def _block_inputs(dataset: _Dataset) -> list[str]:
    """Return the columns that decide a row's block: its instant and, if stored, its resolution."""
    if dataset.fixed_resolution is not None:
        return [dataset.instant_column]
    return [dataset.instant_column, "resolution"]


def _blocks_of(dataset: _Dataset, frame: pl.DataFrame) -> pl.DataFrame:
    """Return each distinct (instant, resolution) of ``frame`` with its block's first day.

    The time zone conversion runs once per distinct instant, not once per row: a page repeats
    each instant once per category.
    """
    import polars as pl

    inputs = frame.select(_block_inputs(dataset)).unique()
    local_day = pl.col(dataset.instant_column).dt.convert_time_zone(LOCAL_TZ.key).dt.date()
    return inputs.with_columns(_block_start(dataset, local_day).alias(_BLOCK))


def _block_start(dataset: _Dataset, local_day: pl.Expr) -> pl.Expr:
    """Polars form of ``timeutil.file_block_start``."""
    import polars as pl

    month_start = local_day.dt.month_start()
    week_start = pl.max_horizontal(local_day.dt.truncate("1w"), month_start)
    if dataset.fixed_resolution is not None:
        return month_start
    return pl.when(pl.col("resolution").is_in(["raw", "15min"])).then(week_start).otherwise(month_start)


def _sorted_last_per_key(rows: pl.DataFrame, sort_key: list[str]) -> pl.DataFrame:
    """Sort one file's rows by ``sort_key`` and keep the last row of each key in input order.

    The rows belong to one entity, so ``sort_key`` identifies a row. The sort is stable, so
    rows with the same key stay in input order next to each other, and a row is kept when the
    next row has another key. Comparing neighbours costs less than hashing every key.
    """
    import polars as pl

    ordered = rows.sort(sort_key, maintain_order=True)
    if ordered.height < 2:
        return ordered
    same_as_next = pl.all_horizontal([pl.col(name) == pl.col(name).shift(-1) for name in sort_key]).fill_null(False)
    if not ordered.select(same_as_next.any()).item():
        return ordered
    return ordered.filter(~same_as_next)


def _conform(table: pa.Table | pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """Return the table's columns in schema order, cast to the schema's types.

    A dictionary-encoded string column stays encoded, so that the Parquet writer can use its
    indices. The file contains plain strings either way.
    """
    # Anything but an Arrow table is a polars DataFrame, which loads polars only when used.
    arrow = table if isinstance(table, pa.Table) else table.to_arrow()
    present = set(arrow.column_names)
    missing = [name for name in schema.names if name not in present]
    if missing:
        raise ValueError(f"table lacks the columns {missing}; build it with terralayr_etl.normalise")
    fields = []
    for field in schema:
        stored = arrow.schema.field(field.name).type
        if pa.types.is_string(field.type) and pa.types.is_dictionary(stored) and stored.value_type == field.type:
            field = field.with_type(stored)
        fields.append(field)
    target = pa.schema(fields)
    if arrow.schema.equals(target):
        # The usual case for a table from normalise, which select and cast would only rebuild.
        return arrow
    return arrow.select(schema.names).cast(target)


def _validate_partition_value(column: str, value: object) -> str:
    allowed: Sequence[str] | None = {"resolution": RESOLUTIONS, "entity_type": ENTITY_TYPES}.get(column)
    if allowed is None:
        return validate_entity_id(value, what=column)
    if value not in allowed:
        raise InvalidEntityIdError(f"invalid {column} {value!r}; use one of {list(allowed)}")
    return str(value)


def _write_temp_file(table: pa.Table, path: Path, key: Sequence[str]) -> tuple[IO[bytes], Path]:
    """Write ``table`` to a new temp file beside ``path`` and return it, still open, with its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f".{path.name}{TEMP_MARKER}{uuid.uuid4().hex}")
    try:
        handle = temp_path.open("wb")
    except OSError as exc:
        raise _full_disk_error(exc, path) or exc
    try:
        # Without the stored Arrow schema, every reader sees plain strings, whether or not
        # the written table had dictionary-encoded columns.
        pq.write_table(table, handle, store_schema=False, **_encodings(table, key))
        handle.flush()
    except BaseException as exc:
        _discard(handle, temp_path)
        raise _full_disk_error(exc, path) or exc
    return handle, temp_path


def _commit(handle: IO[bytes], temp_path: Path, path: Path) -> None:
    """Fsync the open temp file, close it and rename it over ``path``.

    The rename reaches the disk with the folder's fsync in ParquetStore.sync_folders.
    """
    try:
        os.fsync(handle.fileno())
        handle.close()
        os.replace(temp_path, path)
    except BaseException as exc:
        _discard(handle, temp_path)
        raise _full_disk_error(exc, path) or exc


def _discard(handle: IO[bytes], temp_path: Path) -> None:
    """Close and delete a temp file that will not be renamed."""
    with suppress(OSError):
        handle.close()
    temp_path.unlink(missing_ok=True)


def _full_disk_error(exc: BaseException, path: Path) -> DiskFullError | None:
    """Return the error to raise instead of ``exc`` when it reports a full disk."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        error = DiskFullError(
            f"no space left on the device while writing {path}; free disk space there and rerun "
            "(the previous file is unchanged)"
        )
        error.__cause__ = exc
        return error
    return None


def _encodings(table: pa.Table, key: Sequence[str]) -> dict[str, object]:
    """Choose the Parquet encodings, compression and statistics of a file's columns.

    Strings and the fetch time repeat within a file, so they get dictionaries. Instants in
    steady steps shrink to a few bits each with delta encoding. Statistics go to the key
    columns only, which readers filter on: on every column they took about a fifth of the
    write's CPU time for W1's files.

    A column that holds a single label (the entity, run, endpoint) is left uncompressed:
    its pages take a few bytes, which zstd makes larger, and Arrow creates a zstd context for
    every page it compresses. That took 15% of the write's CPU time for W1's files.
    """
    schema = table.schema
    dictionary = [
        field.name
        for field in schema
        if pa.types.is_string(field.type) or pa.types.is_dictionary(field.type) or field.name == "fetched_at"
    ]
    delta = {
        field.name: "DELTA_BINARY_PACKED"
        for field in schema
        if pa.types.is_timestamp(field.type) and field.name not in dictionary
    }
    compression = {
        name: "NONE" if _single_label(table.column(name)) else PARQUET_COMPRESSION for name in schema.names
    }
    return {
        "compression": compression,
        "use_dictionary": dictionary,
        "column_encoding": delta,
        "write_statistics": [name for name in key if name in schema.names],
    }


def _single_label(column: pa.ChunkedArray) -> bool:
    """Tell whether ``column`` is a string column whose rows all hold one label."""
    is_label = pa.types.is_string(column.type) or pa.types.is_dictionary(column.type)
    return is_label and _only_value(column) is not None


def _fsync_directory(folder: Path) -> None:
    """Persist the rename itself, which lives in the folder's entry list."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
