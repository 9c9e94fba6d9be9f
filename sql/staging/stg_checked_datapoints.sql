-- materialized: view
-- The data points the checks compare: those whose delivery day lies in check_scope, a one-row
-- table that run_models writes. A nightly run checks the days it loaded, not the whole warehouse;
-- `terralayr-etl check` checks every day.

with

datapoints as (

    select * from stg_datapoints

),

scope as (

    select * from check_scope

),

checked as (

    -- The day's bounds as UTC instants select the same rows as comparing local_day, and
    -- comparing period_start lets DuckDB skip the local-day conversion of other rows.
    select datapoints.*

    from datapoints
    cross join scope
    where datapoints.period_start >= scope.first_instant
        and datapoints.period_start < scope.end_instant

)

select * from checked
