"""The SQL models and checks on a real DuckDB file built by warehouse_fixture."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from datetime import date
from pathlib import Path

import duckdb
import pytest
from warehouse_fixture import PHYSICAL_ASSET_ID, PORTFOLIO_ID, build_warehouse

from terralayr_etl.models import CHECK_CHUNK_ROWS, ModelError, discover_models, run_checks, run_models

DST_DAY = "2024-10-27"
QUARTER_HOUR_ON_DST_DAY = "2024-10-27 10:00:00+00"

CHECK_NAMES = {
    *(f"completeness_{resolution}" for resolution in ("15min", "hourly", "daily")),
    *(f"total_revenue_{resolution}" for resolution in ("15min", "hourly", "daily")),
    *(f"net_volume_{resolution}" for resolution in ("15min", "hourly", "daily")),
    *(f"wholesale_revenue_{resolution}" for resolution in ("15min", "hourly", "daily")),
    *(f"afrr_energy_{resolution}" for resolution in ("15min", "hourly", "daily")),
    *(f"net_off_virtual_asset_{resolution}" for resolution in ("15min", "hourly", "daily")),
    "rollup_hourly",
    "rollup_daily",
    "aggregate_15min",
    "aggregate_daily",
    "normalised_15min",
    "normalised_hourly",
    "normalised_daily",
    "revenue_buckets",
}


@pytest.fixture(scope="module")
def base_warehouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "warehouse.duckdb"
    with duckdb.connect(str(path)) as connection:
        build_warehouse(connection)
    return path


@pytest.fixture
def connection(base_warehouse: Path, tmp_path: Path):
    path = tmp_path / "warehouse.duckdb"
    shutil.copy(base_warehouse, path)
    with duckdb.connect(str(path)) as connection:
        connection.execute("set TimeZone = 'UTC'")
        yield connection


def failing_checks(connection: duckdb.DuckDBPyConnection) -> set[tuple[str, str, str, str]]:
    rows = connection.execute(
        "select check_name, entity_id, category, period::varchar from check_results where status = 'fail'"
    ).fetchall()
    return set(rows)


def model_and_check(connection: duckdb.DuckDBPyConnection, chunk_rows: int = CHECK_CHUNK_ROWS):
    run_models(connection, chunk_rows=chunk_rows)
    return run_checks(connection)


def check_outcomes(connection: duckdb.DuckDBPyConnection) -> list[tuple]:
    # A check's row is the period with the largest difference of its day, and among equal
    # differences DuckDB picks any period, so expected and actual are left out.
    return connection.execute(
        "select check_name, entity_type, entity_id, category, period, round(difference, 9), tolerance, status "
        "from check_results order by all"
    ).fetchall()


def test_checks_pass_on_consistent_warehouse(connection):
    summary = model_and_check(connection)

    assert summary.failed == 0, summary.failing_rows
    assert set(summary.by_check) == CHECK_NAMES
    for check_name, counts in summary.by_check.items():
        assert counts["pass"] > 0, check_name
    assert summary.total == summary.passed


def test_checks_compare_every_entity_and_day(connection):
    model_and_check(connection)

    rows = connection.execute(
        "select entity_id, period::varchar from check_results where check_name = 'rollup_daily' group by all"
    ).fetchall()
    expected = {
        (entity_id, day)
        for entity_id in ("va-a", "va-b", PORTFOLIO_ID, PHYSICAL_ASSET_ID)
        for day in ("2024-10-26", DST_DAY, "2024-10-28")
    } | {("va-c", DST_DAY), ("va-c", "2024-10-28")}
    assert set(rows) == expected


def test_check_days_limit_checks_to_range(connection):
    run_models(connection, check_days=(date(2024, 10, 27), date(2024, 10, 28)))
    summary = run_checks(connection)

    rows = connection.execute(
        "select entity_id, period::varchar from check_results where check_name = 'rollup_daily' group by all"
    ).fetchall()
    assert summary.failed == 0, summary.failing_rows
    assert set(summary.by_check) == CHECK_NAMES
    assert set(rows) == {(entity_id, DST_DAY) for entity_id in ("va-a", "va-b", "va-c", PORTFOLIO_ID, PHYSICAL_ASSET_ID)}


def test_check_days_leave_other_days_unchecked(connection):
    connection.execute(
        "update datapoints set value = value + 10 where entity_id = 'va-a' and resolution = 'daily' "
        "and category = 'revenue_wholesale' and period_start = '2024-10-25 22:00:00+00'"
    )

    run_models(connection, check_days=(date(2024, 10, 27), date(2024, 10, 29)))
    scoped = run_checks(connection)
    run_models(connection)
    full = run_checks(connection)

    assert scoped.failed == 0
    assert full.failed > 0
    assert {row[0] for row in failing_checks(connection)} >= {"rollup_daily"}


def test_check_days_empty_range_checks_nothing(connection):
    run_models(connection, check_days=(date(2024, 10, 27), date(2024, 10, 27)))
    summary = run_checks(connection)

    assert summary.total == 0


def test_checks_in_day_chunks_match_one_pass(connection):
    one_pass = model_and_check(connection)
    one_pass_outcomes = check_outcomes(connection)

    # One stored row per chunk rounds up to one local day per chunk: three chunks here.
    chunked = model_and_check(connection, chunk_rows=1)

    assert chunked.by_check == one_pass.by_check
    assert check_outcomes(connection) == one_pass_outcomes
    assert connection.execute("select first_day, end_day from check_scope").fetchone() == (date(1, 1, 1), date(9999, 12, 31))


def test_check_days_in_chunks_keep_their_range(connection):
    run_models(connection, check_days=(date(2024, 10, 27), date(2024, 10, 29)), chunk_rows=1)
    summary = run_checks(connection)

    rows = connection.execute(
        "select distinct period::varchar from check_results where check_name = 'rollup_daily' order by 1"
    ).fetchall()
    assert summary.failed == 0, summary.failing_rows
    assert rows == [(DST_DAY,), ("2024-10-28",)]
    assert connection.execute("select first_day, end_day from check_scope").fetchone() == (date(2024, 10, 27), date(2024, 10, 29))


# Each corruption lists every check row it must fail, and no other row may fail. One wrong
# value breaks every relation it takes part in, so most corruptions fail more than one check.
CORRUPTIONS = {
    "quarter_hour_wholesale_revenue": (
        "update datapoints set value = value + 10 where entity_id = 'va-a' and resolution = '15min' "
        f"and category = 'revenue_wholesale' and period_start = '{QUARTER_HOUR_ON_DST_DAY}'",
        {
            ("wholesale_revenue_15min", "va-a", "revenue_wholesale", DST_DAY),
            ("total_revenue_15min", "va-a", "revenue_total_revenue", DST_DAY),
            ("rollup_hourly", "va-a", "revenue_wholesale", DST_DAY),
            ("rollup_daily", "va-a", "revenue_wholesale", DST_DAY),
            ("aggregate_15min", PORTFOLIO_ID, "revenue_wholesale", DST_DAY),
            ("aggregate_15min", PHYSICAL_ASSET_ID, "revenue_wholesale", DST_DAY),
            ("normalised_15min", "va-a", "revenue_normalised_wholesale", DST_DAY),
            ("normalised_15min", "va-a", "revenue_normalised_per_year_wholesale", DST_DAY),
        },
    ),
    "daily_normalised_total": (
        "update datapoints set value = value + 1 where entity_id = 'va-b' and resolution = 'daily' "
        f"and category = 'revenue_normalised_total' and period_start = '2024-10-26 22:00:00+00'",
        {("normalised_daily", "va-b", "revenue_normalised_total", DST_DAY)},
    ),
    "portfolio_quarter_hour_net_off": (
        "update datapoints set value = value + 0.5 where entity_id = 'portfolio-1' and resolution = '15min' "
        f"and category = 'net_off_volume_wholesale' and period_start = '{QUARTER_HOUR_ON_DST_DAY}'",
        {
            ("aggregate_15min", PORTFOLIO_ID, "net_off_volume_wholesale", DST_DAY),
            ("rollup_hourly", PORTFOLIO_ID, "net_off_volume_wholesale", DST_DAY),
            ("rollup_daily", PORTFOLIO_ID, "net_off_volume_wholesale", DST_DAY),
        },
    ),
    "portfolio_quarter_hour_tolling_price": (
        "update datapoints set value = value + 100 where entity_id = 'portfolio-1' and resolution = '15min' "
        f"and category = 'annual_price_tolling' and period_start = '{QUARTER_HOUR_ON_DST_DAY}'",
        {
            ("aggregate_15min", PORTFOLIO_ID, "annual_price_tolling", DST_DAY),
            ("rollup_hourly", PORTFOLIO_ID, "annual_price_tolling", DST_DAY),
            ("rollup_daily", PORTFOLIO_ID, "annual_price_tolling", DST_DAY),
        },
    ),
    "portfolio_daily_afrr_volume": (
        "update datapoints set value = value + 0.5 where entity_id = 'portfolio-1' and resolution = 'daily' "
        "and category = 'total_volume_afrr_energy_pos' and period_start = '2024-10-27 23:00:00+00'",
        {
            ("aggregate_daily", PORTFOLIO_ID, "total_volume_afrr_energy_pos", "2024-10-28"),
            ("rollup_daily", PORTFOLIO_ID, "total_volume_afrr_energy_pos", "2024-10-28"),
        },
    ),
    "hourly_sell_vwap": (
        "update datapoints set value = value + 1 where entity_id = 'va-b' and resolution = 'hourly' "
        "and category = 'sell_vwap_wholesale' and period_start = ("
        "select min(period_start) from datapoints where entity_id = 'va-b' and resolution = 'hourly' "
        "and category = 'sell_vwap_wholesale' and value is not null and period_start >= '2024-10-27 12:00:00+00')",
        {
            ("rollup_hourly", "va-b", "sell_vwap_wholesale", DST_DAY),
            ("wholesale_revenue_hourly", "va-b", "revenue_wholesale", DST_DAY),
        },
    ),
    "missing_quarter_hour_row": (
        "delete from datapoints where entity_id = 'va-a' and resolution = '15min' "
        f"and category = 'revenue_fcr' and period_start = '{QUARTER_HOUR_ON_DST_DAY}'",
        {("completeness_15min", "va-a", "revenue_fcr", DST_DAY)},
    ),
    "revenue_bucket": (
        "update revenue_buckets set revenue_eur = revenue_eur + 0.01 where entity_id = 'va-b' "
        "and product = 'ancillary' and bucket_start = '2024-10-26 22:00:00+00'",
        {("revenue_buckets", "va-b", "revenue_ancillary", DST_DAY)},
    ),
}


@pytest.mark.parametrize("chunk_rows", [CHECK_CHUNK_ROWS, 1])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corruption_fails_matching_checks(connection, corruption, chunk_rows):
    statement, expected_failures = CORRUPTIONS[corruption]
    connection.execute(statement)

    summary = model_and_check(connection, chunk_rows)

    assert failing_checks(connection) == expected_failures
    assert summary.failed == len(expected_failures)


@pytest.mark.parametrize(("offset_eur", "failures"), [(0.004, 0), (0.006, 1)])
def test_money_tolerance_is_half_a_cent(connection, offset_eur, failures):
    connection.execute(
        f"update datapoints set value = value + {offset_eur} where entity_id = 'va-b' and resolution = 'daily' "
        f"and category = 'hurdle_price_vba' and period_start = '2024-10-26 22:00:00+00'"
    )

    summary = model_and_check(connection)

    assert summary.failed == failures
    assert summary.by_check["rollup_daily"]["fail"] == failures


def test_missing_row_reported_with_counts(connection):
    connection.execute(CORRUPTIONS["missing_quarter_hour_row"][0])

    summary = model_and_check(connection)

    assert summary.failing_rows == [
        {
            "check_name": "completeness_15min",
            "entity_type": "virtual_asset",
            "entity_id": "va-a",
            "category": "revenue_fcr",
            "period": DST_DAY,
            "expected": 100.0,
            "actual": 99.0,
            "difference": -1.0,
            "tolerance": 0.0,
        }
    ]


def test_completeness_expects_calendar_counts_on_2024_10_27(connection):
    model_and_check(connection)

    due = dict(
        connection.execute(
            "select check_name, list_distinct(list(expected)) from check_results "
            f"where check_name like 'completeness_%' and period = '{DST_DAY}' group by all"
        ).fetchall()
    )
    assert due == {"completeness_15min": [100.0], "completeness_hourly": [25.0], "completeness_daily": [1.0]}


def test_completeness_expects_96_on_ordinary_day(connection):
    model_and_check(connection)

    due = connection.execute(
        "select list_distinct(list(expected)) from check_results "
        "where check_name = 'completeness_15min' and period = '2024-10-26'"
    ).fetchone()[0]
    assert due == [96.0]


def test_completeness_expects_92_on_2024_03_31(tmp_path):
    with duckdb.connect(str(tmp_path / "spring.duckdb")) as connection:
        build_warehouse(connection, first_day=date(2024, 3, 30), end_day=date(2024, 4, 2))
        summary = model_and_check(connection)

        due = dict(
            connection.execute(
                "select check_name, list_distinct(list(expected)) from check_results "
                "where check_name like 'completeness_%' and period = '2024-03-31' group by all"
            ).fetchall()
        )

    assert summary.failed == 0, summary.failing_rows
    assert due == {"completeness_15min": [92.0], "completeness_hourly": [23.0], "completeness_daily": [1.0]}


def test_completeness_flags_rows_outside_lifetime(connection):
    # va-c starts on 2024-10-27, so it must report nothing on 2024-10-26.
    connection.execute(
        "insert into datapoints select entity_type, 'va-c', resolution, category, period_start, value, unit, "
        "run_id, fetched_at from datapoints where entity_id = 'va-b' and resolution = '15min' "
        "and category = 'hurdle_price_vba' and period_start < '2024-10-26 22:00:00+00'"
    )

    summary = model_and_check(connection)

    assert failing_checks(connection) == {("completeness_15min", "va-c", "hurdle_price_vba", "2024-10-26")}
    assert summary.failing_rows[0]["expected"] == 0.0
    assert summary.failing_rows[0]["actual"] == 96.0


def test_check_summary_limits_failing_rows(connection):
    connection.execute("update datapoints set value = value + 1 where category = 'revenue_wholesale'")

    summary = model_and_check(connection)

    assert summary.failed > 20
    assert len(summary.failing_rows) == 20
    assert json.loads(json.dumps(asdict(summary)))["failed"] == summary.failed


def test_entity_days_match_each_instant_local_day(connection):
    # Around local midnight before 1970 (negative epochs) and on the day clocks go forward.
    for instant in ("1969-12-31 22:30:00+00", "1969-12-31 23:15:00+00", "2024-03-30 22:45:00+00", "2024-03-30 23:00:00+00"):
        connection.execute(
            "insert into datapoints select entity_type, entity_id, resolution, category, ?::timestamptz, value, unit, "
            "run_id, fetched_at from datapoints where resolution = '15min' order by all limit 1",
            [instant],
        )

    run_models(connection)

    expected = connection.execute(
        "select distinct entity_type::varchar, entity_id::varchar, (period_start at time zone 'Europe/Berlin')::date "
        "from datapoints"
    ).fetchall()
    actual = connection.execute("select entity_type, entity_id, local_day from mart_entity_capacity_daily").fetchall()
    days = {row[2] for row in actual}
    assert sorted(actual) == sorted(expected)
    assert {date(1969, 12, 31), date(1970, 1, 1), date(2024, 3, 30), date(2024, 3, 31)} <= days


def test_run_models_builds_in_dependency_order(connection):
    built = run_models(connection)

    models = discover_models()
    assert sorted(built) == sorted(models)
    for name in built:
        for dependency in models[name].depends_on:
            assert built.index(dependency) < built.index(name), (dependency, name)
    assert "stg_datapoints" in models["mart_daily_revenue"].depends_on
    assert "mart_per_mw_daily" in models["check_normalised_daily"].depends_on


def test_run_models_materializes_from_first_line(connection):
    run_models(connection)

    types = dict(
        connection.execute(
            "select table_name, table_type from information_schema.tables "
            "where table_name like 'stg_%' or table_name like 'mart_%' or table_name like 'check_%'"
        ).fetchall()
    )
    assert types["stg_datapoints"] == "VIEW"
    assert types["stg_local_days"] == "BASE TABLE"
    assert types["mart_per_mw_daily"] == "BASE TABLE"
    assert types["check_rollups"] == "BASE TABLE"


def write_models(sql_dir: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = sql_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_run_models_reports_cycle(tmp_path):
    write_models(
        tmp_path,
        {
            "staging/stg_one.sql": "select * from stg_two",
            "marts/mart_two.sql": "select 1 as x",
            "staging/stg_two.sql": "-- reads stg_one\nselect * from stg_one",
        },
    )

    with duckdb.connect() as connection, pytest.raises(ModelError) as raised:
        run_models(connection, tmp_path)

    message = str(raised.value)
    assert "cycle" in message
    assert "stg_one.sql" in message
    assert "stg_two.sql" in message
    assert "mart_two" not in message


def test_run_models_ignores_names_in_comments_and_strings(tmp_path):
    write_models(
        tmp_path,
        {
            "staging/stg_one.sql": "-- not stg_two\nselect 'stg_two' as label",
            "staging/stg_two.sql": "select * from stg_one",
        },
    )

    with duckdb.connect() as connection:
        assert run_models(connection, tmp_path) == ["stg_one", "stg_two"]


def test_run_models_rejects_unprefixed_file(tmp_path):
    write_models(tmp_path, {"marts/datapoints.sql": "select 1 as x"})

    with duckdb.connect() as connection, pytest.raises(ModelError, match="mart_<name>.sql"):
        run_models(connection, tmp_path)


def test_run_models_rejects_unknown_materialization(tmp_path):
    write_models(tmp_path, {"marts/mart_one.sql": "-- materialized: incremental\nselect 1 as x"})

    with duckdb.connect() as connection, pytest.raises(ModelError, match="incremental"):
        run_models(connection, tmp_path)


def test_run_models_switches_view_to_table(tmp_path):
    write_models(tmp_path, {"staging/stg_one.sql": "select 1 as x"})
    with duckdb.connect() as connection:
        run_models(connection, tmp_path)
        write_models(tmp_path, {"staging/stg_one.sql": "-- materialized: table\nselect 2 as x"})

        run_models(connection, tmp_path)

        table_type = connection.execute(
            "select table_type from information_schema.tables where table_name = 'stg_one'"
        ).fetchone()[0]
        assert table_type == "BASE TABLE"
        assert connection.execute("select x from stg_one").fetchone()[0] == 2


def test_run_models_failure_keeps_previous_models(tmp_path):
    write_models(tmp_path, {"staging/stg_one.sql": "select 1 as x"})
    with duckdb.connect() as connection:
        run_models(connection, tmp_path)
        write_models(
            tmp_path,
            {"staging/stg_one.sql": "select 2 as x", "marts/mart_two.sql": "select * from stg_one join missing_table"},
        )

        with pytest.raises(ModelError, match="mart_two.sql"):
            run_models(connection, tmp_path)

        assert connection.execute("select x from stg_one").fetchone()[0] == 1


_SCOPED_COUNT_MODELS = {
    "staging/stg_scoped.sql": (
        "select datapoints.period_start from datapoints cross join check_scope as scope "
        "where datapoints.period_start >= scope.first_instant and datapoints.period_start < scope.end_instant"
    ),
    "checks/check_one.sql": "-- materialized: table\nselect count(*) as periods from stg_scoped",
}


def _three_days_of_hours(connection: duckdb.DuckDBPyConnection) -> None:
    connection.execute("set TimeZone = 'UTC'")
    connection.execute(
        "create table datapoints as select unnest(range('2024-09-30 22:00:00+00'::timestamptz, "
        "'2024-10-03 22:00:00+00'::timestamptz, interval 1 hour)) as period_start"
    )


def test_run_models_appends_check_rows_per_chunk(tmp_path):
    write_models(tmp_path, _SCOPED_COUNT_MODELS)
    with duckdb.connect() as connection:
        _three_days_of_hours(connection)

        run_models(connection, tmp_path, chunk_rows=24)

        assert connection.execute("select periods from check_one order by all").fetchall() == [(24,), (24,), (24,)]


def test_run_models_one_pass_when_check_reads_check(tmp_path):
    # check_two sums check_one, which would count earlier chunks twice if both were appended.
    write_models(tmp_path, {**_SCOPED_COUNT_MODELS, "checks/check_two.sql": "-- materialized: table\nselect sum(periods) as periods from check_one"})
    with duckdb.connect() as connection:
        _three_days_of_hours(connection)

        run_models(connection, tmp_path, chunk_rows=24)

        assert connection.execute("select periods from check_one").fetchall() == [(72,)]
        assert connection.execute("select periods from check_two").fetchall() == [(72,)]


def test_run_checks_before_models_raises(connection):
    with pytest.raises(ModelError, match="call run_models"):
        run_checks(connection)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("-- materialized: table\n\nselect *\nfrom missing_table", 4),
        ("\n-- materialized: table\n-- a comment\nselect *\nfrom missing_table", 5),
        ("-- materialized: view\r\nselect *\r\nfrom missing_table", 3),
    ],
)
def test_model_error_gives_line_of_file(tmp_path, text: str, line: int):
    write_models(tmp_path, {"marts/mart_lines.sql": text})
    with duckdb.connect() as connection, pytest.raises(ModelError) as raised:
        run_models(connection, tmp_path)

    assert f"LINE {line}: from missing_table" in str(raised.value)
    assert str(raised.value).endswith("Otherwise fix the SQL.")


def test_materialization_after_blank_line(tmp_path):
    write_models(tmp_path, {"marts/mart_blank.sql": "\n-- materialized: table\nselect 1 as x"})
    with duckdb.connect() as connection:
        run_models(connection, tmp_path)

        table_type = connection.execute(
            "select table_type from information_schema.tables where table_name = 'mart_blank'"
        ).fetchone()[0]
    assert table_type == "BASE TABLE"
