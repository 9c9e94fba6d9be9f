-- materialized: view
-- The revenue buckets the checks compare: those whose delivery day lies in check_scope (see
-- stg_checked_datapoints).

with

buckets as (

    select * from stg_revenue_buckets

),

scope as (

    select * from check_scope

),

checked as (

    select buckets.*

    from buckets
    cross join scope
    where buckets.local_day >= scope.first_day
        and buckets.local_day < scope.end_day

)

select * from checked
