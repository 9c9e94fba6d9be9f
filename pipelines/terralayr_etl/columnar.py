"""Parse the point lists of a data-point response into Arrow columns without a Python object per point.

The API writes each category's points as compact JSON, ``[{"timestamp":"...","value":...},...]``.
For that form, Arrow splits the list into points and a regular expression (RE2) pulls out
each point's timestamp and value, so that the per-point work runs in Arrow's C++ code, which
releases the GIL. Any other form (spaces, another key order, a numeric string, an empty list)
makes ``parse_point_lists`` return None, and the caller takes the general msgspec path,
which accepts every valid form and names the offending value when a body is malformed.

The caller must have checked that the whole body is valid JSON, as msgspec does while it
decodes the lists as ``msgspec.Raw``. On valid JSON the anchored expression matches only a
whole point object of the compact form, so a list in any other form does not match.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
# Splitting a list at "},{" leaves "[{" on its first point and "}]" on its last.
_POINT = (
    r'^(?:\[\{)?"timestamp":"(?P<timestamp>[^"\\]*)",'
    rf'"value":(?P<value>null|{_NUMBER})(?:\}}\])?$'
)


@dataclass(frozen=True)
class PointColumns:
    """The points of several series, concatenated in series order."""

    lengths: list[int]
    """Points per series, in the order of the input lists."""
    period_start: pa.Array
    """UTC microsecond timestamps."""
    value: pa.Array
    """float64, null where the API sent null."""


def parse_point_lists(point_lists: Sequence[bytes], timestamp_type: pa.DataType) -> PointColumns | None:
    """Parse compact JSON point lists, or return None when one of them needs the general path.

    ``point_lists`` are the raw JSON arrays of the series, each already checked to be valid
    JSON. None means only that the fast path does not apply: the caller must then parse the
    body in full, which also finds the problem if there is one.
    """
    lists = pa.array(point_lists, pa.string())
    if len(lists) == 0:
        return PointColumns([], pa.array([], timestamp_type), pa.array([], pa.float64()))
    if pc.any(pc.equal(lists, "[]")).as_py():
        return None

    points = pc.split_pattern(lists, pattern="},{")
    lengths = pc.list_value_length(points).to_pylist()
    fields = pc.extract_regex(pc.list_flatten(points), _POINT)
    if fields.null_count:
        return None

    value = _values(fields.field("value"))
    if value is None:
        return None
    period_start = _timestamps(fields.field("timestamp"), lengths, timestamp_type)
    if period_start is None:
        return None
    return PointColumns(lengths, period_start, value)


def _values(texts: pa.Array) -> pa.Array | None:
    """Convert JSON number texts and ``null`` to float64, or return None for a non-finite result."""
    numbers = pc.if_else(pc.equal(texts, "null"), pa.scalar(None, pa.string()), texts)
    value = pc.cast(numbers, pa.float64())
    # A number beyond the float64 range parses as infinity; the general path names it.
    if not pc.all(pc.fill_null(pc.is_finite(value), True)).as_py():
        return None
    return value


def _timestamps(texts: pa.Array, lengths: list[int], timestamp_type: pa.DataType) -> pa.Array | None:
    """Parse each series' timestamps, once per distinct run of strings, or return None on a failure.

    The series of one response usually share their timestamps, and comparing two Arrow
    string arrays costs far less than parsing them again.
    """
    parts: list[pa.Array] = []
    previous: pa.Array | None = None
    parsed: pa.Array | None = None
    offset = 0
    for length in lengths:
        strings = texts.slice(offset, length)
        if parsed is None or previous is None or not strings.equals(previous):
            try:
                parsed = pc.cast(strings, timestamp_type)
            except pa.ArrowInvalid:
                return None
            previous = strings
        parts.append(parsed)
        offset += length
    return pa.concat_arrays(parts) if len(parts) > 1 else parts[0]
