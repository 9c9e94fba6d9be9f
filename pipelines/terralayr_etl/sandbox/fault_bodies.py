"""Response-body changes for the sandbox's fault modes: missing, unknown, strings and truncate.

Each function takes a JSON body as the sandbox sends it and returns the changed body, or None
when the body is not one the mode applies to (for example a revenue-bucket array for
``missing``). The sandbox's encoders write JSON without spaces, which the byte patterns below
rely on.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import numpy as np
import polars as pl

UNKNOWN_CATEGORY = "revenue_capacity_market"
"""The undocumented category that the ``unknown`` mode adds, in EUR."""

UNKNOWN_MAX_VALUE_EUR = 500.0
"""Upper bound of the ``unknown`` category's values, which run from 0.0 to this bound."""

# A number as the value of a data point or the revenue of a bucket. JSON null does not match.
_NUMBER_FIELD = re.compile(rb'"(value|revenue)":(-?[0-9][0-9.eE+-]*)')
_TIMESTAMP = re.compile(r'"timestamp":"([^"]*)"')


def _datapoint_parts(body: bytes) -> tuple[dict[str, msgspec.Raw], dict[str, msgspec.Raw], list[dict[str, Any]]] | None:
    """Split a data-point response into its top-level fields, its ``data`` object and ``metaData``."""
    try:
        top = msgspec.json.decode(body, type=dict[str, msgspec.Raw])
        data = msgspec.json.decode(top["data"], type=dict[str, msgspec.Raw])
        meta = msgspec.json.decode(top["metaData"], type=list[dict[str, Any]])
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError):
        return None
    return top, data, meta


def _join(top: dict[str, msgspec.Raw], data: dict[str, msgspec.Raw], meta: list[dict[str, Any]]) -> bytes:
    fields = dict(top)
    fields["data"] = msgspec.Raw(msgspec.json.encode(data))
    fields["metaData"] = msgspec.Raw(msgspec.json.encode(meta))
    return msgspec.json.encode(fields)


def drop_category(body: bytes, choice: float) -> tuple[bytes, str] | None:
    """Remove one category from ``data`` and from ``metaData`` of a data-point response.

    ``choice`` in ``[0, 1)`` picks the category by its position in ``data``. Returns the new
    body and the removed category's name.
    """
    parts = _datapoint_parts(body)
    if parts is None or not parts[1]:
        return None
    top, data, meta = parts

    names = list(data)
    removed = names[min(int(choice * len(names)), len(names) - 1)]
    del data[removed]
    meta = [entry for entry in meta if entry.get("dataPointName") != removed]
    return _join(top, data, meta), removed


def add_unknown_category(body: bytes, value_seed: int) -> bytes | None:
    """Add ``UNKNOWN_CATEGORY`` to a data-point response, with the first category's timestamps.

    The values are drawn from 0.0 to ``UNKNOWN_MAX_VALUE_EUR`` EUR, rounded to cents, by a
    generator seeded with ``value_seed``.
    """
    parts = _datapoint_parts(body)
    if parts is None or not parts[1] or UNKNOWN_CATEGORY in parts[1]:
        return None
    top, data, meta = parts

    first = next(iter(data.values()))
    timestamps = _TIMESTAMP.findall(bytes(first).decode())
    values = np.round(np.random.default_rng(value_seed).uniform(0.0, UNKNOWN_MAX_VALUE_EUR, len(timestamps)), 2)
    points = pl.select(
        pl.concat_str(
            [
                pl.lit('{"timestamp":"'),
                pl.Series(timestamps, dtype=pl.Utf8),
                pl.lit('","value":'),
                pl.Series(values, dtype=pl.Float64).cast(pl.Utf8),
                pl.lit("}"),
            ]
        ).str.join(",")
    ).item()
    data[UNKNOWN_CATEGORY] = msgspec.Raw(f"[{points or ''}]".encode())

    template = meta[0] if meta else {}
    meta.append({**template, "dataPointName": UNKNOWN_CATEGORY, "unit": "EUR"})
    return _join(top, data, meta)


def numbers_as_strings(body: bytes) -> bytes | None:
    """Quote every numeric data-point ``value`` and bucket ``revenue``. Nulls stay null.

    The quoted text is the number's JSON text unchanged, so it parses back to the same float.
    """
    changed, count = _NUMBER_FIELD.subn(rb'"\1":"\2"', body)
    return changed if count else None


def truncate(body: bytes, fraction: float) -> bytes | None:
    """Cut the body to ``fraction`` of its length, keeping at least one byte and losing at least one.

    A strict prefix of a JSON object or array is never valid JSON, so the cut body fails to parse.
    """
    if len(body) < 2:
        return None
    cut = min(len(body) - 1, max(1, int(len(body) * fraction)))
    return body[:cut]
