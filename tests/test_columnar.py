"""The vectorised parser of compact point lists, and its agreement with the general msgspec path."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime

import msgspec
import numpy as np
import pyarrow as pa
import pytest

from terralayr_etl.columnar import parse_point_lists
from terralayr_etl.errors import MalformedResponseError
from terralayr_etl.normalise import (
    _RAW_DATAPOINTS_DECODER,
    UTC_TIMESTAMP,
    _decode_columnar,
    _decode_points,
    normalise_datapoints,
)

FETCHED_AT = datetime(2025, 11, 1, 3, 0, tzinfo=UTC)


def _compact(points: list[dict]) -> bytes:
    return json.dumps(points, separators=(",", ":")).encode()


def test_parse_point_lists_reads_compact_lists() -> None:
    first = [
        {"timestamp": "2024-10-26T22:00:00Z", "value": 1.5},
        {"timestamp": "2024-10-26T23:00:00Z", "value": None},
        {"timestamp": "2024-10-27T00:00:00Z", "value": -2.5e-3},
    ]
    second = [
        {"timestamp": "2024-10-27T00:00:00+01:00", "value": 0},
        {"timestamp": "2024-10-27T01:00:00+01:00", "value": 123456789.125},
    ]

    columns = parse_point_lists([_compact(first), _compact(second)], UTC_TIMESTAMP)

    assert columns is not None
    assert columns.lengths == [3, 2]
    assert columns.value.to_pylist() == [1.5, None, -0.0025, 0.0, 123456789.125]
    assert columns.period_start.type == UTC_TIMESTAMP
    assert [instant.isoformat() for instant in columns.period_start.to_pylist()] == [
        "2024-10-26T22:00:00+00:00",
        "2024-10-26T23:00:00+00:00",
        "2024-10-27T00:00:00+00:00",
        "2024-10-26T23:00:00+00:00",
        "2024-10-27T00:00:00+00:00",
    ]


def test_parse_point_lists_shared_timestamps() -> None:
    shared = ["2024-10-26T22:00:00Z", "2024-10-26T23:00:00Z"]
    lists = [
        _compact([{"timestamp": instant, "value": 1} for instant in shared]),
        _compact([{"timestamp": instant, "value": 2} for instant in shared]),
        _compact([{"timestamp": instant, "value": 3} for instant in ["2024-10-26T22:00:00Z", "2024-10-26T23:15:00Z"]]),
        _compact([{"timestamp": "2024-10-26T22:00:00Z", "value": 4}]),
    ]

    columns = parse_point_lists(lists, UTC_TIMESTAMP)

    assert columns is not None
    assert [instant.strftime("%H:%M") for instant in columns.period_start.to_pylist()] == [
        "22:00", "23:00", "22:00", "23:00", "22:00", "23:15", "22:00",
    ]
    assert columns.value.to_pylist() == [1, 1, 2, 2, 3, 3, 4]


@pytest.mark.parametrize("third", [["22:00", "23:00"], ["22:00", "23:15"]], ids=["all equal", "one differs"])
def test_parse_equal_length_lists(third: list[str]) -> None:
    texts = [["22:00", "23:00"], ["22:00", "23:00"], third]
    lists = [
        _compact([{"timestamp": f"2024-10-26T{time}:00Z", "value": number} for time in times])
        for number, times in enumerate(texts)
    ]

    columns = parse_point_lists(lists, UTC_TIMESTAMP)

    assert columns is not None
    assert [instant.strftime("%H:%M") for instant in columns.period_start.to_pylist()] == [
        time for times in texts for time in times
    ]
    assert columns.lengths == [2, 2, 2]


def test_parse_point_lists_accepts_no_lists() -> None:
    columns = parse_point_lists([], UTC_TIMESTAMP)

    assert columns is not None
    assert columns.lengths == []
    assert len(columns.value) == 0


@pytest.mark.parametrize(
    "point_list",
    [
        b'[{"timestamp": "2024-10-26T22:00:00Z", "value": 1.5}]',
        b'[{"value":1.5,"timestamp":"2024-10-26T22:00:00Z"}]',
        b'[{"timestamp":"2024-10-26T22:00:00Z","value":1.5,"quality":"final"}]',
        b'[{"timestamp":"2024-10-26T22:00:00Z","value":"1.5"}]',
        b'[{"timestamp":"2024-10-26T22:00:00Z","value":true}]',
        b'[{"timestamp":"2024-10-26T22:00:00Z","value":1e400}]',
        b'[{"timestamp":"2024-10-26T22:00:00","value":1.5}]',
        b"[]",
        b'[{"timestamp":"2024-10-26T22:00:00Z","value":1},{"timestamp":"2024-10-26T23:00:00+00:00","value":2}]',
        b'[{"timestamp":"2024-10-26T22:00:00Z","value":{"amount":1}}]',
        b'[{"timestamp":"2024-10-26T22:00:00Z","value":[1]}]',
        b'[{"timestamp":"2024-10-26T22:00:00\\u005a","value":1}]',
        b'[{"timestamp":"2024-10-26}22:00:00Z","value":1}]',
        b'[{"timestamq":"2024-10-26T22:00:00Z","value":1}]',
        b'[{"timestamp":"2024-10-26T22:00:00Z","valuf":1}]',
        b'[{"timestamp":"2024","value":1}]',
        b'[{"timestamp":"2024-10-26T22:00:00Z","value":1},[1,2]]',
    ],
    ids=[
        "spaces", "key order", "extra key", "numeric string", "boolean", "overflow", "no offset", "empty",
        "two timestamp forms in one list", "object value", "array value", "escaped timestamp",
        "brace in timestamp", "other timestamp key", "other value key", "short timestamp", "not a point",
    ],
)
def test_parse_point_lists_leaves_other_forms(point_list: bytes) -> None:
    assert parse_point_lists([point_list], UTC_TIMESTAMP) is None


def _body(indent: int | None) -> bytes:
    data = {
        "revenue_wholesale": [
            {"timestamp": "2024-10-26T22:00:00Z", "value": 12.25},
            {"timestamp": "2024-10-26T23:00:00Z", "value": None},
        ],
        "revenue_fcr": [
            {"timestamp": "2024-10-26T22:00:00Z", "value": 3},
            {"timestamp": "2024-10-26T23:00:00Z", "value": 4.75},
        ],
    }
    meta = [{"dataPointName": "revenue_fcr", "unit": "EUR"}]
    separators = (",", ":") if indent is None else None
    return json.dumps({"data": data, "metaData": meta, "nextCursor": None}, indent=indent, separators=separators).encode()


def test_compact_and_indented_bodies_normalise_alike() -> None:
    arguments = {
        "entity_type": "virtual_asset",
        "entity_id": "va-1",
        "resolution": "hourly",
        "run_id": "run-1",
        "fetched_at": FETCHED_AT,
        "endpoint": "/revenue-reporting/virtual-assets/va-1/datapoints",
    }

    compact = normalise_datapoints(_body(None), **arguments)
    indented = normalise_datapoints(_body(2), **arguments)

    assert compact.table.equals(indented.table)
    assert compact.table.num_rows == 4
    assert compact.table["value"].to_pylist() == [12.25, None, 3.0, 4.75]
    assert compact.table["category"].to_pylist() == ["revenue_wholesale"] * 2 + ["revenue_fcr"] * 2
    assert compact.categories == indented.categories
    assert isinstance(compact.table["period_start"].type, pa.TimestampType)


_MUTATION_BYTES = b'{}[],:"\\ 0123456789eE.+-nulZT'


def _mutated_bodies(count: int) -> list[bytes]:
    """Return compact bodies with one to three random byte edits, each still valid JSON."""
    rng = random.Random(20241027)
    base = _body(None)
    bodies = []
    while len(bodies) < count:
        body = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            position = rng.randrange(len(body))
            edit = rng.choice(("replace", "insert", "delete"))
            if edit == "replace":
                body[position] = rng.choice(_MUTATION_BYTES)
            elif edit == "insert":
                body.insert(position, rng.choice(_MUTATION_BYTES))
            else:
                del body[position]
        try:
            _RAW_DATAPOINTS_DECODER.decode(bytes(body))
        except msgspec.DecodeError:
            continue
        bodies.append(bytes(body))
    return bodies


def _same_values(first: pa.Array, second: pa.Array) -> bool:
    """Return True when two float arrays are equal, down to the sign of each zero."""
    signs = [np.signbit(array.fill_null(1.0).to_numpy()) for array in (first, second)]
    return first.equals(second) and bool((signs[0] == signs[1]).all())


@pytest.mark.parametrize("body", _mutated_bodies(300))
def test_parse_point_lists_mutated_bodies(body: bytes) -> None:
    try:
        expected = _decode_points(body, "/datapoints").columns
    except MalformedResponseError:
        expected = None

    fast = _decode_columnar(body)

    if expected is None:
        assert fast is None
    elif fast is not None:
        lists = list(_RAW_DATAPOINTS_DECODER.decode(body).data.values())
        copied = parse_point_lists([bytes(points) for points in lists], UTC_TIMESTAMP)
        assert fast.columns.lengths == expected.lengths
        assert fast.columns.period_start.equals(expected.period_start)
        assert _same_values(fast.columns.value, expected.value)
        assert copied is not None
        assert _same_values(copied.value, fast.columns.value)
        assert copied.period_start.equals(fast.columns.period_start)


def test_parse_point_lists_reads_body_in_place() -> None:
    points = [{"timestamp": "2024-10-26T22:00:00Z", "value": 1.5}, {"timestamp": "2024-10-26T23:00:00Z", "value": 2}]
    # A brace in a category name lies between two lists and must not count as a point's end.
    body = json.dumps({"data": {"a}": points, "b{}": points}, "metaData": None}, separators=(",", ":")).encode()
    lists = list(_RAW_DATAPOINTS_DECODER.decode(body).data.values())

    in_place = parse_point_lists(lists, UTC_TIMESTAMP, body=body)
    copied = parse_point_lists([bytes(points) for points in lists], UTC_TIMESTAMP)

    assert in_place is not None
    assert copied is not None
    assert in_place.lengths == [2, 2]
    assert in_place.value.to_pylist() == [1.5, 2.0, 1.5, 2.0]
    assert in_place.value.equals(copied.value)
    assert in_place.period_start.equals(copied.period_start)


def test_parse_point_lists_copies_lists_of_other_buffers() -> None:
    body = _body(None)
    lists = list(_RAW_DATAPOINTS_DECODER.decode(body).data.values())

    other = bytes(bytearray(body))

    columns = parse_point_lists(lists, UTC_TIMESTAMP, body=other)

    assert other is not body
    assert columns is not None
    assert columns.value.to_pylist() == [12.25, None, 3.0, 4.75]


_POINT = '{"timestamp":"2024-10-26T22:00:00Z","value":1}'


@pytest.mark.parametrize(
    "body",
    [
        b'{"data":{"a":[{"timestamp":"2024-10-26T22:00:00Z","value":true}],"a":[' + _POINT.encode() + b"]}}",
        b'{"data":{"a":[1]},"data":{"a":[' + _POINT.encode() + b"]}}",
        b'{"data":{"a":[' + _POINT.encode() + b']},"metaData":[{"dataPointName":"a","unit":1}]}',
    ],
    ids=["overwritten list", "overwritten data", "invalid metaData"],
)
def test_decode_columnar_rejects_hidden_members(body: bytes) -> None:
    assert _decode_columnar(body) is None
    with pytest.raises(MalformedResponseError):
        _decode_points(body, "/datapoints")


@pytest.mark.parametrize(
    "body",
    [
        b'{"data":{"a":[{"timestamp":"2024-10-26T22:00:00+01:00","value":1},{"timestamp":"","value":2}]}}',
        b'{"data":{"a":[{"timestamp":"2024-10-26T22:00:00.123456+01:00","value":1},'
        b'{"timestamp":"2024-10-26","value":2}]}}',
    ],
    ids=["empty timestamp", "date only"],
)
def test_parse_point_lists_shorter_later_timestamp(body: bytes) -> None:
    lists = list(_RAW_DATAPOINTS_DECODER.decode(body).data.values())

    assert parse_point_lists(lists, UTC_TIMESTAMP, body=body) is None
    assert parse_point_lists([bytes(points) for points in lists], UTC_TIMESTAMP) is None


@pytest.mark.parametrize(("text", "sign"), [("-0", 1.0), ("-0.0", -1.0), ("-0e0", -1.0), ("0", 1.0)])
def test_decode_columnar_zero_sign_matches_msgspec(text: str, sign: float) -> None:
    body = ('{"data":{"a":[{"timestamp":"2024-10-26T22:00:00Z","value":' + text + "}]}}").encode()

    fast = _decode_columnar(body)
    general = _decode_points(body, "/datapoints")

    assert fast is not None
    assert math.copysign(1.0, fast.columns.value[0].as_py()) == sign
    assert math.copysign(1.0, general.columns.value[0].as_py()) == sign


def test_parse_point_lists_memoryview_body() -> None:
    body = _body(None)
    lists = list(_RAW_DATAPOINTS_DECODER.decode(body).data.values())

    columns = parse_point_lists(lists, UTC_TIMESTAMP, body=memoryview(body))

    assert columns is not None
    assert columns.value.to_pylist() == [12.25, None, 3.0, 4.75]
