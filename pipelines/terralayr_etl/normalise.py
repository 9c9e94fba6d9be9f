"""Turn data-point and revenue-bucket response bodies into Arrow tables of a fixed schema.

A data-point body takes one of two paths. When msgspec finds the body valid and every point
list is in the API's compact form, ``columnar.parse_point_lists`` turns the lists into Arrow
columns with numpy and Arrow operations over whole lists, without a Python object per point.
Any other body is decoded into typed Structs, which checks its shape point by point. Both paths give the
same table for the same data. In both, timestamps go to UTC in an Arrow cast, which accepts
``Z`` and explicit offsets and rejects a timestamp without one. When something is wrong, the
general path names the offending value in the error.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from terralayr_etl.categories import CATEGORIES, unit_of
from terralayr_etl.columnar import PointColumns, parse_point_lists
from terralayr_etl.resources import CPU_SLOTS
from terralayr_etl.errors import MalformedResponseError
from terralayr_etl.response_problems import decode_or_explain, describe_buckets_problem, describe_datapoints_problem

logger = logging.getLogger(__name__)

UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")

LONG_SCHEMA = pa.schema(
    [
        pa.field("entity_type", pa.string()),
        pa.field("entity_id", pa.string()),
        pa.field("resolution", pa.string()),
        pa.field("category", pa.string()),
        pa.field("period_start", UTC_TIMESTAMP),
        pa.field("value", pa.float64()),
        pa.field("unit", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("fetched_at", UTC_TIMESTAMP),
        pa.field("endpoint", pa.string()),
    ]
)
"""One row per entity, resolution, category and delivery period (period_start in UTC)."""

LABEL = pa.dictionary(pa.int32(), pa.string())
ENCODED_LONG_SCHEMA = pa.schema(
    [pa.field(field.name, LABEL) if pa.types.is_string(field.type) else field for field in LONG_SCHEMA]
)
"""LONG_SCHEMA with dictionary-encoded string columns, the form ``normalise_datapoints`` returns.

A response repeats a handful of labels on every row. As dictionaries they are built from one
index per row, and the Parquet writer takes the indices as they are instead of hashing every
string again.
"""

BUCKET_SCHEMA = pa.schema(
    [
        pa.field("entity_id", pa.string()),
        pa.field("product", pa.string()),
        pa.field("bucket_start", UTC_TIMESTAMP),
        pa.field("bucket_end", UTC_TIMESTAMP),
        pa.field("revenue_eur", pa.float64()),
        pa.field("currency", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("fetched_at", UTC_TIMESTAMP),
        pa.field("endpoint", pa.string()),
    ]
)
"""One row per virtual asset, revenue product and bucket (a Europe/Berlin delivery day)."""

_MAX_DUPLICATE_WARNINGS = 5
# A numeric string must match the JSON number grammar, because float() alone would also
# accept "nan", "infinity", "1_000" and surrounding whitespace.
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


# gc=False: a response decodes into tens of thousands of points, and untracked Structs spare
# the garbage collector from scanning them. A point holds only a str and a number, so it
# cannot be part of a reference cycle.
class _Point(msgspec.Struct, gc=False):
    timestamp: str
    value: float | str | None


class _MetaData(msgspec.Struct):
    data_point_name: str = msgspec.field(name="dataPointName")
    unit: str | None = None


class _DatapointsBody(msgspec.Struct):
    data: dict[str, list[_Point]]
    meta_data: list[_MetaData] | None = msgspec.field(default=None, name="metaData")
    next_cursor: str | None = msgspec.field(default=None, name="nextCursor")


class _Bucket(msgspec.Struct, gc=False):
    start: str
    end: str
    revenue: float | str | None
    currency: str


class _RawDatapointsBody(msgspec.Struct):
    """A data-point body whose members stay undecoded JSON, for ``columnar.parse_point_lists``.

    An empty Raw stands for a member the body does not have.
    """

    data: dict[str, msgspec.Raw]
    meta_data: msgspec.Raw = msgspec.field(default=msgspec.Raw(), name="metaData")
    next_cursor: msgspec.Raw = msgspec.field(default=msgspec.Raw(), name="nextCursor")


_DATAPOINTS_DECODER = msgspec.json.Decoder(_DatapointsBody)
_RAW_DATAPOINTS_DECODER = msgspec.json.Decoder(_RawDatapointsBody)
_META_DATA_DECODER = msgspec.json.Decoder(list[_MetaData] | None)
_CURSOR_DECODER = msgspec.json.Decoder(str | None)
_BUCKETS_DECODER = msgspec.json.Decoder(list[_Bucket])


@dataclass(frozen=True)
class NormalisedPage:
    """One data-point response as a table in ENCODED_LONG_SCHEMA, plus what the caller must report."""

    table: pa.Table
    categories: tuple[str, ...]
    """Categories present under ``data``, in response order, known or not."""
    unknown_categories: tuple[str, ...]
    """Categories not in ``terralayr_etl.categories.CATEGORIES``. Their rows are kept."""
    duplicate_instants: int
    """Points dropped because a later point of the same category had the same UTC instant."""
    next_cursor: str | None


def normalise_datapoints(
    body: bytes,
    *,
    entity_type: str,
    entity_id: str,
    resolution: str,
    run_id: str,
    fetched_at: datetime,
    endpoint: str,
) -> NormalisedPage:
    """Parse a data-point response into an ENCODED_LONG_SCHEMA table.

    A category absent from ``data`` yields no rows, and a null value stays null. Raises
    MalformedResponseError for invalid JSON, a wrong shape, a timestamp without a UTC
    offset, or a value that is not a finite number, a numeric string or null.

    Example::

        page = normalise_datapoints(raw.body, entity_type="virtual_asset", entity_id=va_id,
                                    resolution="15min", run_id=run_id,
                                    fetched_at=raw.fetched_at, endpoint=raw.endpoint)
    """
    _require_aware(fetched_at)
    with CPU_SLOTS:
        return _normalise_datapoints(body, entity_type, entity_id, resolution, run_id, fetched_at, endpoint)


def _normalise_datapoints(
    body: bytes,
    entity_type: str,
    entity_id: str,
    resolution: str,
    run_id: str,
    fetched_at: datetime,
    endpoint: str,
) -> NormalisedPage:
    decoded = _decode_columnar(body) or _decode_points(body, endpoint)
    categories, lengths = decoded.categories, decoded.columns.lengths
    period_start, value = decoded.columns.period_start, decoded.columns.value
    units = _units_by_category(decoded.meta_data, categories)
    row_count = len(value)
    first = pa.array(np.zeros(row_count, np.int32))
    table = pa.Table.from_arrays(
        [
            _same_label(entity_type, first),
            _same_label(entity_id, first),
            _same_label(resolution, first),
            _repeat_each(categories, lengths),
            period_start,
            value,
            _repeat_each([units[name] for name in categories], lengths),
            _same_label(run_id, first),
            pa.repeat(pa.scalar(fetched_at, UTC_TIMESTAMP), row_count),
            _same_label(endpoint, first),
        ],
        schema=ENCODED_LONG_SCHEMA,
    )

    table, duplicates = _drop_earlier_duplicates(table, ["category", "period_start"], "period_start", endpoint)
    unknown = tuple(name for name in categories if name not in CATEGORIES)
    if unknown:
        logger.debug("Response from %s has categories not in the documented list: %s", endpoint, ", ".join(unknown))
    return NormalisedPage(
        table=table,
        categories=categories,
        unknown_categories=unknown,
        duplicate_instants=duplicates,
        next_cursor=decoded.next_cursor,
    )


@dataclass(frozen=True)
class _DecodedPage:
    categories: tuple[str, ...]
    columns: PointColumns
    meta_data: list[_MetaData] | None
    next_cursor: str | None


def _decode_columnar(body: bytes) -> _DecodedPage | None:
    """Decode a body whose point lists are in the API's compact form without a Python object
    per point, or return None for any other body."""
    try:
        decoded = _RAW_DATAPOINTS_DECODER.decode(body)
        meta_data = _META_DATA_DECODER.decode(decoded.meta_data) if decoded.meta_data else None
        next_cursor = _CURSOR_DECODER.decode(decoded.next_cursor) if decoded.next_cursor else None
    except msgspec.DecodeError:
        return None
    if not _members_fill_body(body, decoded):
        return None
    columns = parse_point_lists(list(decoded.data.values()), UTC_TIMESTAMP, body=body)
    if columns is None:
        return None
    return _DecodedPage(tuple(decoded.data), columns, meta_data, next_cursor)


def _members_fill_body(body: bytes, decoded: _RawDatapointsBody) -> bool:
    """Return True when the body is exactly its decoded members in compact JSON.

    msgspec keeps only the last of two equal keys, so the Raw lists alone would hide a list
    that a repeated key overwrote, which the general path checks and may reject. Any repeated
    or unknown member, and any whitespace, makes the body longer than its members.
    """
    data_size = _object_size((key, len(points)) for key, points in decoded.data.items())
    members = [("data", data_size), ("metaData", len(decoded.meta_data)), ("nextCursor", len(decoded.next_cursor))]
    return len(body) == _object_size((key, size) for key, size in members if size)


def _object_size(members: Iterable[tuple[str, int]]) -> int:
    """Return the size of a compact JSON object whose values have the given sizes in bytes."""
    sizes = [len(msgspec.json.encode(key)) + 1 + size for key, size in members]
    return 2 + sum(sizes) + max(len(sizes) - 1, 0)


def _decode_points(body: bytes, endpoint: str) -> _DecodedPage:
    """Decode any valid body point by point, naming the offending value of a malformed one."""
    decoded = decode_or_explain(_DATAPOINTS_DECODER, body, endpoint, describe_datapoints_problem)
    categories = tuple(decoded.data)
    lengths = [len(points) for points in decoded.data.values()]

    timestamps: list[str] = []
    values: list[float | str | None] = []
    for points in decoded.data.values():
        timestamps.extend([point.timestamp for point in points])
        values.extend([point.value for point in points])
    labels = _Labels("category", categories, lengths, timestamps, endpoint)

    period_start = _parse_series_timestamps(timestamps, lengths, labels)
    value = _parse_values(values, labels)
    return _DecodedPage(categories, PointColumns(lengths, period_start, value), decoded.meta_data, decoded.next_cursor)


def normalise_revenue_buckets(
    body: bytes,
    *,
    virtual_asset_id: str,
    product: str,
    run_id: str,
    fetched_at: datetime,
    endpoint: str,
) -> pa.Table:
    """Parse a revenue-bucket response (a bare array of daily buckets) into a BUCKET_SCHEMA table.

    Raises MalformedResponseError for invalid JSON, a wrong shape, a timestamp without a UTC
    offset, a bucket whose end is not after its start, or a currency other than EUR, because
    ``revenue_eur`` stores amounts in EUR only. Of two buckets with the same start, the later one is kept.
    """
    _require_aware(fetched_at)
    buckets = decode_or_explain(_BUCKETS_DECODER, body, endpoint, describe_buckets_problem)
    starts = [bucket.start for bucket in buckets]
    ends = [bucket.end for bucket in buckets]
    revenues = [bucket.revenue for bucket in buckets]
    currencies = pa.array([bucket.currency for bucket in buckets], pa.string())
    labels = _Labels("product", (product,), [len(buckets)], starts, endpoint)

    bucket_start = _parse_timestamps(starts, labels)
    bucket_end = _parse_timestamps(ends, _Labels("product", (product,), [len(buckets)], ends, endpoint))
    _check_currencies(currencies, starts, endpoint)
    _check_bucket_order(bucket_start, bucket_end, starts, endpoint)
    revenue_eur = _parse_values(revenues, labels)

    row_count = len(buckets)
    table = pa.Table.from_arrays(
        [
            pa.repeat(pa.scalar(virtual_asset_id, pa.string()), row_count),
            pa.repeat(pa.scalar(product, pa.string()), row_count),
            bucket_start,
            bucket_end,
            revenue_eur,
            currencies,
            pa.repeat(pa.scalar(run_id, pa.string()), row_count),
            pa.repeat(pa.scalar(fetched_at, UTC_TIMESTAMP), row_count),
            pa.repeat(pa.scalar(endpoint, pa.string()), row_count),
        ],
        schema=BUCKET_SCHEMA,
    )
    table, _ = _drop_earlier_duplicates(table, ["bucket_start"], "bucket_start", endpoint)
    return table


@dataclass(frozen=True)
class _Labels:
    """Maps a flat row index back to its series and timestamp, for error messages.

    ``names[i]`` labels the next ``lengths[i]`` rows. ``noun`` is the kind of name
    ("category" for data points, "product" for revenue buckets).
    """

    noun: str
    names: tuple[str, ...]
    lengths: list[int]
    timestamps: list[str]
    endpoint: str

    def series_of(self, index: int) -> str:
        offsets = list(itertools.accumulate(self.lengths))
        return f"{self.noun} {self.names[bisect.bisect_right(offsets, index)]}"


def _require_aware(fetched_at: datetime) -> None:
    if fetched_at.tzinfo is None:
        raise ValueError(f"fetched_at {fetched_at.isoformat()} has no time zone; pass a UTC datetime")


def _parse_series_timestamps(timestamps: list[str], lengths: list[int], labels: _Labels) -> pa.Array:
    """Parse the timestamps of consecutive series, parsing each distinct run of strings once.

    The categories of one response usually share their timestamps, so a series whose strings
    equal the previous series' strings reuses that series' parsed array. Comparing two lists
    of strings costs far less than converting and parsing them again.
    """
    parts: list[pa.Array] = []
    previous: list[str] | None = None
    parsed: pa.Array | None = None
    offset = 0
    for length in lengths:
        strings = timestamps[offset : offset + length]
        if parsed is None or strings != previous:
            parsed = _parse_timestamps(strings, labels, offset)
            previous = strings
        parts.append(parsed)
        offset += length
    if not parts:
        return pa.array([], UTC_TIMESTAMP)
    return pa.concat_arrays(parts) if len(parts) > 1 else parts[0]


def _parse_timestamps(timestamps: list[str], labels: _Labels, offset: int = 0) -> pa.Array:
    """Convert RFC 3339 strings with ``Z`` or an offset to UTC microsecond timestamps."""
    strings = pa.array(timestamps, pa.string())
    try:
        return pc.cast(strings, UTC_TIMESTAMP)
    except pa.ArrowInvalid:
        index, text = _first_unparsable_timestamp(strings)
        series = labels.series_of(offset + index)
        try:
            pc.cast(pa.array([text], pa.string()), pa.timestamp("us"))
        except pa.ArrowInvalid:
            problem = "is not a valid RFC 3339 timestamp"
        else:
            problem = "has no UTC offset, so its instant is ambiguous"
        raise MalformedResponseError(
            f"the timestamp {text!r} of {series} in the response from {labels.endpoint} {problem}; "
            "the API must send RFC 3339 timestamps with 'Z' or an offset such as '+02:00'"
        ) from None


def _first_unparsable_timestamp(strings: pa.Array) -> tuple[int, str]:
    for index, text in enumerate(strings.to_pylist()):
        try:
            pc.cast(pa.array([text], pa.string()), UTC_TIMESTAMP)
        except pa.ArrowInvalid:
            return index, text
    raise AssertionError("Arrow rejected the timestamps as a whole but accepted each one")


def _parse_values(values: list[float | str | None], labels: _Labels) -> pa.Array:
    """Convert numbers, numeric strings and nulls to float64, and reject non-finite values."""
    try:
        array = pa.array(values, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        # Only a numeric string gets here; msgspec already rejected every other type.
        array = pa.array([_parse_numeric_string(value, index, labels) for index, value in enumerate(values)], pa.float64())

    non_finite = pc.fill_null(pc.invert(pc.is_finite(array)), False)
    if pc.any(non_finite).as_py():
        index = pc.indices_nonzero(non_finite)[0].as_py()
        raise _value_error(values[index], index, labels, "is not a finite number")
    return array


def _parse_numeric_string(value: float | str | None, index: int, labels: _Labels) -> float | None:
    if not isinstance(value, str):
        return value
    if not _JSON_NUMBER.fullmatch(value):
        raise _value_error(value, index, labels, "is not a number")
    return float(value)


def _value_error(value: object, index: int, labels: _Labels, problem: str) -> MalformedResponseError:
    return MalformedResponseError(
        f"the value {value!r} of {labels.series_of(index)} at {labels.timestamps[index]} "
        f"in the response from {labels.endpoint} {problem}; values must be finite numbers, numeric strings or null"
    )


def _units_by_category(meta_data: list[_MetaData] | None, categories: tuple[str, ...]) -> dict[str, str | None]:
    """Take each category's unit from metaData, else from the documented categories, else None."""
    units: dict[str, str | None] = {name: unit_of(name) for name in categories}
    for entry in meta_data or ():
        if entry.unit is not None and entry.data_point_name in units:
            units[entry.data_point_name] = entry.unit
    return units


def decode_labels(table: pa.Table) -> pa.Table:
    """Return ``table`` with its dictionary-encoded columns turned into plain values, as polars joins need."""
    fields = [
        field.with_type(field.type.value_type) if pa.types.is_dictionary(field.type) else field for field in table.schema
    ]
    return table.cast(pa.schema(fields))


def _same_label(label: str, first: pa.Array) -> pa.DictionaryArray:
    """Return ``label`` on every row, as a dictionary whose indices (``first``) are all 0."""
    return pa.DictionaryArray.from_arrays(first, pa.array([label], pa.string()))


def _repeat_each(labels: list[str | None] | tuple[str, ...], lengths: list[int]) -> pa.DictionaryArray:
    """Repeat each label by the matching length, as a dictionary of the distinct labels."""
    distinct = list(dict.fromkeys(label for label in labels if label is not None))
    position = {label: index for index, label in enumerate(distinct)}
    per_label = np.array([-1 if label is None else position[label] for label in labels], np.int32)
    indices = np.repeat(per_label, np.asarray(lengths, dtype=np.int64))
    return pa.DictionaryArray.from_arrays(pa.array(indices, mask=indices < 0), pa.array(distinct, pa.string()))


def _drop_earlier_duplicates(
    table: pa.Table, key: list[str], instant_column: str, endpoint: str
) -> tuple[pa.Table, int]:
    """Keep the last row of each key in list order, log the dropped ones and count them."""
    if strictly_increasing_per_series(table, key, instant_column):
        return table, 0
    # Imported here: a body without duplicate points, the usual case, never needs polars.
    import polars as pl

    frame = pl.from_arrow(table)
    if frame.select(pl.struct(key).is_unique().all()).item():
        return table, 0

    frame = frame.with_row_index("_row")
    is_last = pl.col("_row") == pl.col("_row").max().over(key)
    dropped = frame.filter(~is_last)
    for row in dropped.head(_MAX_DUPLICATE_WARNINGS).iter_rows(named=True):
        where = f"category {row['category']}" if "category" in row else f"virtual asset {row['entity_id']}"
        logger.warning(
            "Response from %s has two points of %s at %s; keeping the later one in the list",
            endpoint,
            where,
            row[instant_column].isoformat(),
        )
    if dropped.height > _MAX_DUPLICATE_WARNINGS:
        logger.warning("Response from %s has %s duplicate instants in total", endpoint, f"{dropped.height:,}")

    kept = frame.filter(is_last).drop("_row").to_arrow().cast(table.schema)
    return kept, dropped.height


def strictly_increasing_per_series(table: pa.Table, key: list[str], instant_column: str) -> bool:
    """Return True when instants rise strictly within each series, which rules out duplicates.

    Each series must be contiguous, which is true within one response because the keys of
    ``data`` are unique. Rising instants are the common case and cost a few vectorised
    comparisons. When this returns False, the caller runs the full duplicate check.
    """
    if table.num_rows < 2:
        return True
    instants = table[instant_column].combine_chunks()
    rising = pc.greater(instants.slice(1), instants.slice(0, len(instants) - 1))
    series_columns = [name for name in key if name != instant_column]
    for name in series_columns:
        column = comparable(table[name].combine_chunks())
        # A new series starts where the series column changes, and any order is fine there.
        rising = pc.or_(rising, pc.not_equal(column.slice(1), column.slice(0, len(column) - 1)))
    return bool(pc.all(pc.fill_null(rising, False)).as_py())


def comparable(column: pa.Array) -> pa.Array:
    """Return an array whose rows compare equal exactly where the column's values do.

    That is the indices of a dictionary-encoded column whose dictionary has no repeated
    value, which compare faster than the strings, and otherwise the plain values.
    """
    if not pa.types.is_dictionary(column.type):
        return column
    if pc.count_distinct(column.dictionary).as_py() == len(column.dictionary):
        # A dictionary array keeps its nulls in its indices.
        return column.indices
    return column.dictionary_decode()


def _check_currencies(currencies: pa.Array, starts: list[str], endpoint: str) -> None:
    other = pc.fill_null(pc.not_equal(currencies, "EUR"), True)
    if pc.any(other).as_py():
        index = pc.indices_nonzero(other)[0].as_py()
        raise MalformedResponseError(
            f"the bucket starting {starts[index]} in the response from {endpoint} has currency "
            f"{currencies[index].as_py()!r}; only EUR is supported, because revenue is stored as revenue_eur"
        )


def _check_bucket_order(bucket_start: pa.Array, bucket_end: pa.Array, starts: list[str], endpoint: str) -> None:
    reversed_bucket = pc.less_equal(bucket_end, bucket_start)
    if pc.any(reversed_bucket).as_py():
        index = pc.indices_nonzero(reversed_bucket)[0].as_py()
        raise MalformedResponseError(
            f"the bucket starting {starts[index]} in the response from {endpoint} ends at "
            f"{bucket_end[index].as_py().isoformat()}, not after its start"
        )
