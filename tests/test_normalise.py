"""Tests for terralayr_etl.normalise on hand-written response bodies."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from terralayr_etl.errors import MalformedResponseError
from terralayr_etl.normalise import (
    BUCKET_SCHEMA,
    ENCODED_LONG_SCHEMA,
    LONG_SCHEMA,
    normalise_datapoints,
    normalise_revenue_buckets,
)

FETCHED_AT = datetime(2025, 11, 1, 3, 0, tzinfo=UTC)
ENDPOINT = "/revenue-reporting/virtual-assets/va-1/datapoints"


def _body(data: object, meta_data: object = None, next_cursor: str | None = None) -> bytes:
    document: dict[str, object] = {"data": data, "nextCursor": next_cursor}
    if meta_data is not None:
        document["metaData"] = meta_data
    return json.dumps(document).encode()


def _normalise(body: bytes):
    return normalise_datapoints(
        body,
        entity_type="virtual_asset",
        entity_id="va-1",
        resolution="15min",
        run_id="run-1",
        fetched_at=FETCHED_AT,
        endpoint=ENDPOINT,
    )


def _quarter_hours(start: datetime, count: int) -> list[str]:
    return [(start + timedelta(minutes=15 * i)).strftime("%Y-%m-%dT%H:%M:%SZ") for i in range(count)]


def _rows_of(table: pa.Table, category: str) -> list[dict]:
    return [row for row in table.to_pylist() if row["category"] == category]


def test_normalise_schema_and_constant_columns():
    body = _body({"revenue_wholesale": [{"timestamp": "2025-01-01T00:00:00Z", "value": 412.37}]})

    page = _normalise(body)

    assert page.table.schema == ENCODED_LONG_SCHEMA
    row = page.table.to_pylist()[0]
    assert row["entity_type"] == "virtual_asset"
    assert row["entity_id"] == "va-1"
    assert row["resolution"] == "15min"
    assert row["category"] == "revenue_wholesale"
    assert row["period_start"] == datetime(2025, 1, 1, tzinfo=UTC)
    assert row["value"] == 412.37
    assert row["run_id"] == "run-1"
    assert row["fetched_at"] == FETCHED_AT
    assert row["endpoint"] == ENDPOINT


def test_normalise_null_values_stay_null():
    timestamps = _quarter_hours(datetime(2025, 1, 1, tzinfo=UTC), 4)
    values = [1.5, None, None, 2.5]
    body = _body({"buy_vwap_wholesale": [{"timestamp": t, "value": v} for t, v in zip(timestamps, values)]})

    page = _normalise(body)

    assert page.table.column("value").to_pylist() == values
    assert page.table.column("value").null_count == 2


def test_normalise_absent_category_gives_no_rows():
    timestamps = _quarter_hours(datetime(2025, 1, 1, tzinfo=UTC), 2)
    first = _body(
        {
            "revenue_wholesale": [{"timestamp": t, "value": 1.0} for t in timestamps],
            "revenue_fcr": [{"timestamp": t, "value": 2.0} for t in timestamps],
        }
    )
    second = _body({"revenue_wholesale": [{"timestamp": t, "value": 3.0} for t in timestamps]})

    first_page = _normalise(first)
    second_page = _normalise(second)

    assert first_page.categories == ("revenue_wholesale", "revenue_fcr")
    assert second_page.categories == ("revenue_wholesale",)
    assert _rows_of(second_page.table, "revenue_fcr") == []
    assert second_page.table.num_rows == 2


def test_normalise_empty_data_gives_empty_table():
    page = _normalise(_body({}))

    assert page.table.num_rows == 0
    assert page.table.schema == ENCODED_LONG_SCHEMA
    assert page.categories == ()


def test_normalise_numeric_strings_are_parsed():
    body = _body(
        {
            "revenue_wholesale": [
                {"timestamp": "2025-01-01T00:00:00Z", "value": "12.5"},
                {"timestamp": "2025-01-01T00:15:00Z", "value": "-3e2"},
                {"timestamp": "2025-01-01T00:30:00Z", "value": 7},
                {"timestamp": "2025-01-01T00:45:00Z", "value": None},
            ]
        }
    )

    page = _normalise(body)

    assert page.table.column("value").to_pylist() == [12.5, -300.0, 7.0, None]


@pytest.mark.parametrize("bad_value", ["NaN", "Infinity", "-inf", "twelve", " 12", "1e999"])
def test_normalise_rejects_non_finite_or_text_value(bad_value: str):
    body = _body(
        {
            "revenue_fcr": [
                {"timestamp": "2025-01-01T00:00:00Z", "value": 1.0},
                {"timestamp": "2025-01-01T00:15:00Z", "value": bad_value},
            ]
        }
    )

    with pytest.raises(MalformedResponseError) as caught:
        _normalise(body)

    message = str(caught.value)
    assert "revenue_fcr" in message
    assert "2025-01-01T00:15:00Z" in message
    assert repr(bad_value) in message


def test_normalise_rejects_boolean_value():
    body = _body({"revenue_fcr": [{"timestamp": "2025-01-01T00:00:00Z", "value": True}]})

    with pytest.raises(MalformedResponseError, match=r"value true of point 0 of category revenue_fcr"):
        _normalise(body)


def test_normalise_rejects_number_out_of_float_range():
    body = b'{"data": {"revenue_fcr": [{"timestamp": "2025-01-01T00:00:00Z", "value": 1e999}]}}'

    with pytest.raises(MalformedResponseError, match="out of range"):
        _normalise(body)


def test_normalise_rejects_naive_timestamp():
    body = _body(
        {
            "revenue_wholesale": [
                {"timestamp": "2025-03-30T03:45:00Z", "value": 1.0},
                {"timestamp": "2025-03-30T04:00:00", "value": 2.0},
            ]
        }
    )

    with pytest.raises(MalformedResponseError) as caught:
        _normalise(body)

    message = str(caught.value)
    assert "'2025-03-30T04:00:00'" in message
    assert "revenue_wholesale" in message
    assert "no UTC offset" in message


def test_normalise_rejects_invalid_timestamp():
    body = _body({"revenue_wholesale": [{"timestamp": "yesterday", "value": 1.0}]})

    with pytest.raises(MalformedResponseError, match=r"'yesterday' of category revenue_wholesale .* not a valid"):
        _normalise(body)


def test_normalise_dst_end_day_has_100_distinct_instants():
    # 2025-10-26 in Europe/Berlin: 02:00-02:59 happens twice, first at +02:00 then at +01:00.
    day_start_utc = datetime(2025, 10, 25, 22, 0, tzinfo=UTC)
    instants = [day_start_utc + timedelta(minutes=15 * i) for i in range(100)]
    with_offsets = []
    for index, instant in enumerate(instants):
        offset = timedelta(hours=2) if instant < datetime(2025, 10, 26, 1, 0, tzinfo=UTC) else timedelta(hours=1)
        local = (instant + offset).replace(tzinfo=None)
        sign = "+02:00" if offset == timedelta(hours=2) else "+01:00"
        with_offsets.append({"timestamp": local.isoformat() + sign, "value": float(index)})
    with_z = [{"timestamp": instant.strftime("%Y-%m-%dT%H:%M:%SZ"), "value": float(i)} for i, instant in enumerate(instants)]
    body = _body({"revenue_wholesale": with_offsets, "revenue_fcr": with_z})

    page = _normalise(body)

    offset_rows = _rows_of(page.table, "revenue_wholesale")
    z_rows = _rows_of(page.table, "revenue_fcr")
    assert page.duplicate_instants == 0
    assert len({row["period_start"] for row in offset_rows}) == 100
    assert [row["period_start"] for row in offset_rows] == instants
    assert [row["period_start"] for row in z_rows] == instants
    by_instant = {row["period_start"]: row["value"] for row in offset_rows}
    first_two_oclock = by_instant[datetime(2025, 10, 26, 0, 0, tzinfo=UTC)]
    second_two_oclock = by_instant[datetime(2025, 10, 26, 1, 0, tzinfo=UTC)]
    assert first_two_oclock == 8.0
    assert second_two_oclock == 12.0


def test_normalise_duplicate_instant_keeps_later_point(caplog):
    body = _body(
        {
            "revenue_wholesale": [
                {"timestamp": "2025-01-01T00:00:00Z", "value": 1.0},
                {"timestamp": "2025-01-01T00:15:00Z", "value": 2.0},
                {"timestamp": "2025-01-01T01:00:00+01:00", "value": 3.0},
            ],
            "revenue_fcr": [{"timestamp": "2025-01-01T00:00:00Z", "value": 9.0}],
        }
    )

    with caplog.at_level(logging.WARNING, logger="terralayr_etl.normalise"):
        page = _normalise(body)

    assert page.duplicate_instants == 1
    wholesale = _rows_of(page.table, "revenue_wholesale")
    assert [(row["period_start"].minute, row["value"]) for row in wholesale] == [(15, 2.0), (0, 3.0)]
    assert _rows_of(page.table, "revenue_fcr")[0]["value"] == 9.0
    assert "revenue_wholesale" in caplog.text
    assert "2025-01-01T00:00:00+00:00" in caplog.text


def test_normalise_int_then_float_values_are_float64():
    timestamps = _quarter_hours(datetime(2025, 1, 1, tzinfo=UTC), 600)
    values = [i if i < 300 else i + 0.5 for i in range(600)]
    body = _body({"revenue_wholesale": [{"timestamp": t, "value": v} for t, v in zip(timestamps, values)]})

    page = _normalise(body)

    column = page.table.column("value")
    assert column.type == pa.float64()
    assert column.null_count == 0
    assert column.to_pylist() == [float(v) for v in values]


def test_normalise_leading_nulls_keep_float64_and_values():
    timestamps = _quarter_hours(datetime(2025, 1, 1, tzinfo=UTC), 672)
    values = [None] * 500 + [float(i) for i in range(172)]
    body = _body({"sell_vwap_wholesale": [{"timestamp": t, "value": v} for t, v in zip(timestamps, values)]})

    page = _normalise(body)

    column = page.table.column("value")
    assert column.type == pa.float64()
    assert column.null_count == 500
    assert column.to_pylist()[500:] == values[500:]


def test_normalise_invalid_json_names_problem_and_excerpt():
    body = b'{"data": {"revenue_wholesale": [{"timestamp": '

    with pytest.raises(MalformedResponseError) as caught:
        _normalise(body)

    message = str(caught.value)
    assert "not valid JSON" in message
    assert '{"data": {"revenue_wholesale"' in message
    assert ENDPOINT in message


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ([1, 2], "the body is a JSON array"),
        ({"metaData": []}, "'data' is missing"),
        ({"data": [1]}, "'data' is a JSON array"),
        ({"data": {"revenue_fcr": {"timestamp": "2025-01-01T00:00:00Z"}}}, "category revenue_fcr are a JSON object"),
        ({"data": {"revenue_fcr": [5]}}, "point 0 of category revenue_fcr is a JSON number"),
        ({"data": {"revenue_fcr": [{"value": 1}]}}, "point 0 of category revenue_fcr has no 'timestamp' key"),
        ({"data": {"revenue_fcr": [{"timestamp": "2025-01-01T00:00:00Z"}]}}, "has no 'value' key"),
        ({"data": {"revenue_fcr": [{"timestamp": 5, "value": 1}]}}, "timestamp 5 of point 0"),
        ({"data": {}, "metaData": [{"unit": "EUR"}]}, "metaData entry 0"),
    ],
)
def test_normalise_wrong_shape_names_problem(document: object, expected: str):
    body = json.dumps(document).encode()

    with pytest.raises(MalformedResponseError) as caught:
        _normalise(body)

    assert expected in str(caught.value)
    assert "the body starts with" in str(caught.value)


def test_normalise_unit_from_metadata_then_catalogue():
    point = [{"timestamp": "2025-01-01T00:00:00Z", "value": 1.0}]
    body = _body(
        {"revenue_wholesale": point, "buy_volume_wholesale": point, "brand_new_metric": point},
        meta_data=[{"dataPointName": "revenue_wholesale", "unit": "kEUR"}, {"dataPointName": "brand_new_metric"}],
    )

    page = _normalise(body)

    units = {row["category"]: row["unit"] for row in page.table.to_pylist()}
    assert units == {"revenue_wholesale": "kEUR", "buy_volume_wholesale": "MWh", "brand_new_metric": None}
    assert page.unknown_categories == ("brand_new_metric",)
    assert len(_rows_of(page.table, "brand_new_metric")) == 1


def test_normalise_returns_next_cursor():
    body = _body({"revenue_fcr": [{"timestamp": "2025-01-01T00:00:00Z", "value": 1.0}]}, next_cursor="page-2")

    assert _normalise(body).next_cursor == "page-2"


def _normalise_buckets(document: object):
    return normalise_revenue_buckets(
        json.dumps(document).encode(),
        virtual_asset_id="va-1",
        product="tolling",
        run_id="run-1",
        fetched_at=FETCHED_AT,
        endpoint="/revenue-reporting/va-1/tolling",
    )


def test_normalise_revenue_buckets_rows_and_schema():
    table = _normalise_buckets(
        [
            {"start": "2024-10-26T22:00:00Z", "end": "2024-10-27T23:00:00Z", "revenue": 1234.56, "currency": "EUR"},
            {"start": "2024-10-27T23:00:00Z", "end": "2024-10-28T23:00:00Z", "revenue": None, "currency": "EUR"},
        ]
    )

    assert table.schema == BUCKET_SCHEMA
    rows = table.to_pylist()
    assert rows[0]["bucket_start"] == datetime(2024, 10, 26, 22, tzinfo=UTC)
    assert rows[0]["bucket_end"] == datetime(2024, 10, 27, 23, tzinfo=UTC)
    assert rows[0]["revenue_eur"] == 1234.56
    assert rows[0]["product"] == "tolling"
    assert rows[0]["entity_id"] == "va-1"
    assert rows[1]["revenue_eur"] is None


def test_normalise_revenue_buckets_rejects_other_currency():
    with pytest.raises(MalformedResponseError, match="currency 'USD'"):
        _normalise_buckets(
            [{"start": "2024-10-26T22:00:00Z", "end": "2024-10-27T23:00:00Z", "revenue": 1.0, "currency": "USD"}]
        )


def test_normalise_revenue_buckets_rejects_end_before_start():
    with pytest.raises(MalformedResponseError, match="not after its start"):
        _normalise_buckets(
            [{"start": "2024-10-27T23:00:00Z", "end": "2024-10-26T22:00:00Z", "revenue": 1.0, "currency": "EUR"}]
        )


def test_normalise_revenue_buckets_rejects_missing_key():
    with pytest.raises(MalformedResponseError, match="bucket 0 has no 'currency' key"):
        _normalise_buckets([{"start": "2024-10-26T22:00:00Z", "end": "2024-10-27T23:00:00Z", "revenue": 1.0}])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_normalise_bare_non_finite_literal_named(literal: str):
    body = (
        '{"data":{"revenue_fcr":[{"timestamp":"2024-10-27T00:00:00Z","value":1.5},'
        f'{{"timestamp":"2024-10-27T00:15:00Z","value":{literal}}}]}},"metaData":[],"nextCursor":null}}'
    ).encode()

    with pytest.raises(MalformedResponseError) as raised:
        _normalise(body)

    message = str(raised.value)
    assert "revenue_fcr" in message
    assert "2024-10-27T00:15:00Z" in message
    assert literal in message
