"""Explain why a response body could not be decoded, naming the first offending value.

msgspec rejects a malformed body quickly, but its message often does not locate the problem.
These functions decode the body again without a schema, walk it and name the first value that
breaks the expected shape, so that the error message points at a category, a point or a
bucket. They run only after a decode has failed, never on the hot path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from terralayr_etl.errors import MalformedResponseError

_EXCERPT_BYTES = 200


def decode_or_explain(
    decoder: msgspec.json.Decoder, body: bytes, endpoint: str, describe: Callable[[object], str | None]
) -> Any:
    """Decode ``body`` with ``decoder``, or raise MalformedResponseError naming the problem.

    ``describe`` receives the body decoded without a schema and returns the first shape problem
    it finds, or None, in which case msgspec's own message is used.
    """
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        # msgspec.ValidationError subclasses DecodeError, so the shape case goes first.
        if isinstance(exc, msgspec.ValidationError):
            problem = _describe_shape_problem(body, describe) or str(exc)
        else:
            problem = _describe_non_finite_literal(body) or f"the body is not valid JSON ({exc})"
        raise MalformedResponseError(
            f"malformed response from {endpoint}: {problem}; the body starts with {_excerpt(body)!r}"
        ) from None


_NON_FINITE_LITERAL = re.compile(rb'"value"\s*:\s*(-?Infinity|NaN)')
_LAST_CATEGORY = re.compile(rb'"([^"]+)"\s*:\s*\[')
_LAST_TIMESTAMP = re.compile(rb'"timestamp"\s*:\s*"([^"]*)"')


def _describe_non_finite_literal(body: bytes) -> str | None:
    """Name the category and period of a bare NaN or Infinity, which JSON does not allow."""
    match = _NON_FINITE_LITERAL.search(body)
    if match is None:
        return None
    before = body[: match.start()]
    categories = _LAST_CATEGORY.findall(before)
    point_start = before.rfind(b"{")
    timestamps = _LAST_TIMESTAMP.findall(body[point_start : match.end() + 200])
    category = categories[-1].decode(errors="replace") if categories else "unknown"
    timestamp = timestamps[0].decode(errors="replace") if timestamps else "unknown"
    return (
        f"category {category} at {timestamp} has value {match.group(1).decode()}, "
        "which is not a finite number; ask the API provider to send null for a missing value"
    )


def _describe_shape_problem(body: bytes, describe: Callable[[object], str | None]) -> str | None:
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        # A number beyond the float64 range fails even the untyped decode.
        return str(exc)
    return describe(document)


def _excerpt(body: bytes) -> str:
    text = body[:_EXCERPT_BYTES].decode("utf-8", errors="replace")
    return text + ("..." if len(body) > _EXCERPT_BYTES else "")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    return "number"


def _json_text(value: object) -> str:
    return msgspec.json.encode(value).decode()


def describe_datapoints_problem(document: object) -> str | None:
    """Name the first shape problem in a generically decoded data-point body."""
    if not isinstance(document, dict):
        return f"the body is a JSON {_json_type(document)}, expected an object with a 'data' key"
    if "data" not in document:
        return "the key 'data' is missing"
    data = document["data"]
    if not isinstance(data, dict):
        return f"'data' is a JSON {_json_type(data)}, expected an object that maps categories to point lists"

    for category, points in data.items():
        if not isinstance(points, list):
            return f"the points of category {category} are a JSON {_json_type(points)}, expected an array"
        for index, point in enumerate(points):
            problem = _describe_point_problem(point, f"point {index} of category {category}")
            if problem:
                return problem

    meta_data = document.get("metaData")
    if meta_data is not None:
        if not isinstance(meta_data, list):
            return f"'metaData' is a JSON {_json_type(meta_data)}, expected an array"
        for index, entry in enumerate(meta_data):
            if not isinstance(entry, dict) or not isinstance(entry.get("dataPointName"), str):
                return f"metaData entry {index} ({_json_text(entry)}) has no string 'dataPointName'"
            if entry.get("unit") is not None and not isinstance(entry["unit"], str):
                return f"the unit {_json_text(entry['unit'])} of metaData entry {index} is not a string"
    cursor = document.get("nextCursor")
    if cursor is not None and not isinstance(cursor, str):
        return f"'nextCursor' is a JSON {_json_type(cursor)}, expected a string or null"
    return None


def _describe_point_problem(point: object, where: str) -> str | None:
    if not isinstance(point, dict):
        return f"{where} is a JSON {_json_type(point)}, expected an object"
    for key in ("timestamp", "value"):
        if key not in point:
            return f"{where} has no '{key}' key"
    timestamp = point["timestamp"]
    if not isinstance(timestamp, str):
        return f"the timestamp {_json_text(timestamp)} of {where} is a JSON {_json_type(timestamp)}, expected a string"
    value = point["value"]
    if _json_type(value) not in ("number", "string", "null"):
        return f"the value {_json_text(value)} of {where} at {timestamp} is a JSON {_json_type(value)}, expected a number or null"
    return None


def describe_buckets_problem(document: object) -> str | None:
    """Name the first shape problem in a generically decoded revenue-bucket body."""
    if not isinstance(document, list):
        return f"the body is a JSON {_json_type(document)}, expected an array of buckets"
    for index, bucket in enumerate(document):
        where = f"bucket {index}"
        if not isinstance(bucket, dict):
            return f"{where} is a JSON {_json_type(bucket)}, expected an object"
        for key in ("start", "end", "revenue", "currency"):
            if key not in bucket:
                return f"{where} has no '{key}' key"
        for key in ("start", "end", "currency"):
            if not isinstance(bucket[key], str):
                return f"the {key} {_json_text(bucket[key])} of {where} is a JSON {_json_type(bucket[key])}, expected a string"
        if _json_type(bucket["revenue"]) not in ("number", "string", "null"):
            return f"the revenue {_json_text(bucket['revenue'])} of {where} is not a number or null"
    return None
