"""Parse the point lists of a data-point response into Arrow columns without a Python object per point.

The API writes each category's points as compact JSON, ``[{"timestamp":"...","value":...},...]``.
In that form only two things vary between points: the timestamp's text and the value's
text. So the parser finds every point's closing brace with one vectorised search, derives
each point's start from the brace before it, and checks the fixed bytes in between with
numpy comparisons. The value texts then become an Arrow string view over the body itself and
are cast to float64 in C++, without copying or a per-point Python call. Timestamps are parsed
once per distinct series of texts, as the series of one response usually share them.

Any other form (spaces, another key order, a numeric string, an empty list, timestamps of
different lengths in one list) makes ``parse_point_lists`` return None, and the caller takes
the general msgspec path, which accepts every valid form and names the offending value when
a body is malformed.

The caller must have checked that each list is valid JSON, as msgspec does while it decodes
the lists as ``msgspec.Raw``. On valid JSON, a list that passes every check below consists
of compact point objects only: each brace found is followed by ``,{"timestamp":"`` or ends
the list, and a value text that is a JSON string, object, array or boolean fails the cast.
The caller must also make sure that no list was dropped: msgspec keeps only the last list of
a repeated key, which ``normalise`` rules out by checking that the lists fill the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_HEAD = b'{"timestamp":"'
_MIDDLE = b'","value":'
_NULL = np.frombuffer(b"null", "<u4")[0]
_MINUS_ZERO = np.frombuffer(b"-0", "<u2")[0]
_PADDING = bytes(16)
"""Appended to the joined lists, so that 8-byte reads near the end stay inside the buffer."""
_MIN_LIST_SIZE = len(b"[") + len(_HEAD) + 8 + len(_MIDDLE) + len(b"0}]")
"""Size of the shortest compact list with a point: an 8-byte timestamp and a one-digit value.

An empty list, "[]", is shorter and goes to the general path.
"""
_MAX_BYTES = 2**31 - 1
"""Arrow's string views address their bytes with 32-bit offsets."""

# _KEEP[n] masks the first n bytes of a 12-byte inline string view, as three 32-bit words.
_KEEP = np.array(
    [[int.from_bytes(bytes(0xFF if 4 * word + i < n else 0 for i in range(4)), "little") for word in range(3)] for n in range(13)],
    dtype=np.uint32,
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


def parse_point_lists(
    point_lists: Sequence[bytes] | Sequence[msgspec.Raw], timestamp_type: pa.DataType, *, body: bytes | None = None
) -> PointColumns | None:
    """Parse compact JSON point lists, or return None when one of them needs the general path.

    ``point_lists`` are the raw JSON arrays of the series (bytes or ``msgspec.Raw``), each
    already checked to be valid JSON. None means only that the fast path does not apply: the
    caller must then parse the body in full, which also finds the problem if there is one.
    When the lists are ``msgspec.Raw`` views into ``body``, the parser reads the body in place
    instead of copying the lists.
    """
    if not point_lists:
        return PointColumns([], pa.array([], timestamp_type), pa.array([], pa.float64()))
    sizes = np.fromiter(map(len, point_lists), np.int64, len(point_lists))
    data, starts = _in_place(point_lists, sizes, body)
    if data is None:
        data = b"".join([*point_lists, _PADDING])
        starts = np.cumsum(sizes) - sizes
    if len(data) > _MAX_BYTES:
        return None
    layout = _Layout.find(data, starts, sizes)
    if layout is None:
        return None
    value = _values(data, layout)
    if value is None:
        return None
    period_start = _timestamps(data, layout, timestamp_type)
    if period_start is None:
        return None
    return PointColumns(layout.lengths.tolist(), period_start, value)


def _in_place(
    point_lists: Sequence[bytes] | Sequence[msgspec.Raw], sizes: np.ndarray, body: bytes | None
) -> tuple[bytes | None, np.ndarray]:
    """Return ``body`` and each list's offset in it, or None when a list is not a view into it.

    The last list must also end at least ``_PADDING`` bytes before the body does. That holds
    for the API's responses, where metaData and nextCursor follow the data object, and
    otherwise the lists are copied.
    """
    if not isinstance(body, bytes):
        return None, sizes
    base = np.frombuffer(body, np.uint8).ctypes.data
    starts = np.array([np.frombuffer(points, np.uint8).ctypes.data - base for points in point_lists], np.int64)
    if (starts < 0).any() or (starts + sizes + len(_PADDING) > len(body)).any():
        return None, sizes
    return body, starts


def _unaligned(data: bytes, dtype: str) -> np.ndarray:
    """Return a view whose element k is the integer formed by the bytes starting at offset k."""
    size = np.dtype(dtype).itemsize
    return np.ndarray(shape=(len(data) - size + 1,), dtype=dtype, buffer=data, strides=(1,))


def _all_equal(words: np.ndarray, positions: np.ndarray, pattern: bytes) -> bool:
    """Return True when ``pattern`` (8 to 16 bytes) starts at every position, compared 8 bytes at a time."""
    first = np.frombuffer(pattern[:8], "<u8")[0]
    last = np.frombuffer(pattern[-8:], "<u8")[0]
    return bool((words[positions] == first).all() and (words[positions + len(pattern) - 8] == last).all())


@dataclass(frozen=True)
class _Layout:
    """The offsets and sizes of each point's timestamp and value text in the parsed buffer."""

    lengths: np.ndarray
    """Points per list."""
    first: np.ndarray
    """Index of each list's first point."""
    timestamp_at: np.ndarray
    timestamp_size: np.ndarray
    """Timestamp text size per list, equal for every point of the list."""
    value_at: np.ndarray
    value_size: np.ndarray

    @classmethod
    def find(cls, data: bytes, starts: np.ndarray, sizes: np.ndarray) -> _Layout | None:
        """Locate the points of compact lists, or return None if a list is in another form.

        ``starts`` and ``sizes`` give each list's bytes in ``data``, in rising order, and at
        least ``_PADDING`` bytes of ``data`` follow the last list.
        """
        ends = starts + sizes
        if (sizes < _MIN_LIST_SIZE).any() or (starts[1:] < ends[:-1]).any():
            return None
        buf = np.frombuffer(data, np.uint8)[: int(ends[-1])]
        if not ((buf[starts] == ord("[")).all() and (buf[starts + 1] == ord("{")).all() and (buf[ends - 1] == ord("]")).all()):
            return None

        close = np.flatnonzero(buf[int(starts[0]) :] == ord("}")) + starts[0]
        # Braces between the lists (in the category names) belong to no point.
        owner = np.searchsorted(ends, close, side="right")
        close = close[close >= starts[owner]]
        closes_before_end = np.searchsorted(close, ends)
        lengths = np.diff(closes_before_end, prepend=0)
        first = closes_before_end - lengths
        last = closes_before_end - 1
        if (lengths == 0).any():
            return None
        # A point starts two bytes after the previous one's brace ("},{"), or after the "[".
        start = np.empty_like(close)
        start[1:] = close[:-1] + 2
        start[first] = starts + 1
        separator = np.full(len(close), ord(","), np.uint8)
        separator[last] = ord("]")
        if not ((buf[close + 1] == separator).all() and (close[last] + 2 == ends).all() and (buf[start] == ord("{")).all()):
            return None

        words = _unaligned(data, "<u8")
        if not _all_equal(words, start, _HEAD):
            return None
        timestamp_at = start + len(_HEAD)
        timestamp_size = np.array([data.find(b'"', at) - at for at in timestamp_at[first].tolist()], np.int64)
        if (timestamp_size < 8).any():
            return None
        value_at = timestamp_at + np.repeat(timestamp_size, lengths)
        # A later point with a shorter timestamp than the list's first would put the expected
        # ","value": past its own closing brace, and near the end of the buffer past the end.
        if (value_at + len(_MIDDLE) >= close).any() or not _all_equal(words, value_at, _MIDDLE):
            return None
        value_at += len(_MIDDLE)
        value_size = close - value_at
        if (value_size <= 0).any():
            return None
        return cls(lengths, first, timestamp_at, timestamp_size, value_at, value_size)


def _values(data: bytes, layout: _Layout) -> pa.Array | None:
    """Cast the value texts to float64, or return None for a text that is not a finite number."""
    at, size = layout.value_at, layout.value_size.astype(np.uint32)
    words = _unaligned(data, "<u4")
    first_bytes = words[at]
    is_null = (size == 4) & (first_bytes == _NULL)
    # msgspec reads the JSON integer -0 as the integer 0, so the general path stores 0.0.
    is_integer_minus_zero = (size == 2) & ((first_bytes & 0xFFFF) == _MINUS_ZERO)
    # Arrow's string view: per string a length and either the string itself (up to 12 bytes)
    # or its first 4 bytes, a buffer index and an offset into that buffer.
    views = np.empty((len(at), 4), np.uint32)
    views[:, 0] = size
    views[:, 1] = first_bytes
    views[:, 2] = 0
    views[:, 3] = at
    inline = np.flatnonzero(size <= 12)
    if len(inline):
        short_at = at[inline]
        texts = np.stack([views[inline, 1], words[short_at + 4], words[short_at + 8]], axis=1)
        views[inline, 1:] = texts & _KEEP[size[inline]]
    null_count = int(is_null.sum())
    validity = pa.py_buffer(np.packbits(~is_null, bitorder="little")) if null_count else None
    texts = pa.Array.from_buffers(pa.string_view(), len(at), [validity, pa.py_buffer(views), pa.py_buffer(data)], null_count)
    try:
        value = pc.cast(texts, pa.float64())
    except pa.ArrowInvalid:
        return None
    # Arrow also reads "nan", "inf" and numbers beyond float64's range; the general path names them.
    if not pc.all(pc.fill_null(pc.is_finite(value), True)).as_py():
        return None
    if is_integer_minus_zero.any():
        value = pc.if_else(pa.array(is_integer_minus_zero), pa.scalar(0.0), value)
    return value


def _timestamps(data: bytes, layout: _Layout, timestamp_type: pa.DataType) -> pa.Array | None:
    """Parse each list's timestamps, once per distinct run of texts, or return None on a failure.

    Two lists have the same texts when their lengths, text sizes and every 8-byte word of
    every text are equal, which costs far less than parsing the texts again.
    """
    words = _unaligned(data, "<u8")
    word_count = -(-int(layout.timestamp_size.max()) // 8)
    lists = len(layout.lengths)
    first_length, first_size = int(layout.lengths[0]), int(layout.timestamp_size[0])
    if lists > 1 and (layout.lengths == first_length).all() and (layout.timestamp_size == first_size).all():
        # The usual body: every category reports the same periods, so one comparison of all
        # lists with the first replaces one per list. Every text has the same size here, so
        # one gather reads all of their words.
        offsets = np.minimum(np.arange(0, 8 * word_count, 8), first_size - 8)
        by_list = words[layout.timestamp_at + offsets[:, np.newaxis]].reshape(word_count, lists, first_length)
        if (by_list == by_list[:, :1, :]).all():
            parsed = _parse_timestamps(data, layout.timestamp_at[:first_length], first_size, timestamp_type)
            return None if parsed is None else pa.concat_arrays([parsed] * lists)

    size_per_point = np.repeat(layout.timestamp_size, layout.lengths)
    keys = np.stack([words[layout.timestamp_at + np.minimum(8 * k, size_per_point - 8)] for k in range(word_count)])

    parts: list[pa.Array] = []
    previous: tuple[int, int, np.ndarray] | None = None
    parsed: pa.Array | None = None
    for first, length, size in zip(layout.first.tolist(), layout.lengths.tolist(), layout.timestamp_size.tolist(), strict=True):
        key = keys[:, first : first + length]
        if parsed is None or previous is None or previous[:2] != (length, size) or not np.array_equal(previous[2], key):
            parsed = _parse_timestamps(data, layout.timestamp_at[first : first + length], size, timestamp_type)
            if parsed is None:
                return None
            previous = (length, size, key)
        parts.append(parsed)
    return pa.concat_arrays(parts) if len(parts) > 1 else parts[0]


def _parse_timestamps(data: bytes, at: np.ndarray, size: int, timestamp_type: pa.DataType) -> pa.Array | None:
    rows = np.ndarray(shape=(len(data) - size + 1, size), dtype=np.uint8, buffer=data, strides=(1, 1))[at]
    offsets = np.arange(0, (len(at) + 1) * size, size, dtype=np.int32)
    texts = pa.StringArray.from_buffers(len(at), pa.py_buffer(offsets), pa.py_buffer(rows))
    try:
        return pc.cast(texts, timestamp_type)
    except pa.ArrowInvalid:
        return None
