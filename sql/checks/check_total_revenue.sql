-- materialized: table
-- Check 2: revenue_total_revenue equals wholesale + fcr + afrr_capacity + afrr_energy +
-- tolling + vba in every period, at every resolution and for every entity. A null product
-- counts as 0; all six null expects a null total. Periods missing any of the seven rows are
-- left to the completeness check.
-- Grain: the period with the largest difference per (check_name, entity, local day).

with

datapoints as (

    select * from stg_checked_datapoints

),

revenue_rows as (

    select * from datapoints
    where category in (
        'revenue_total_revenue',
        'revenue_wholesale',
        'revenue_fcr',
        'revenue_afrr_capacity',
        'revenue_afrr_energy',
        'revenue_tolling',
        'revenue_vba'
    )

),

periods as (

    select
        entity_type,
        entity_id,
        resolution,
        period_start,
        local_day,

        count(*) filter (where category <> 'revenue_total_revenue') as product_rows,
        sum(value) filter (where category <> 'revenue_total_revenue') as products_eur,

        count(*) filter (where category = 'revenue_total_revenue') as total_rows,
        any_value(value) filter (where category = 'revenue_total_revenue') as total_eur

    from revenue_rows
    group by all

),

comparisons as (

    select
        'total_revenue_' || resolution as check_name,
        entity_type,
        entity_id,
        'revenue_total_revenue' as category,
        local_day as period,

        products_eur as expected,
        total_eur as actual,
        total_eur - products_eur as difference,
        comparison_tolerance('EUR', products_eur) as tolerance

    from periods
    where product_rows = 6 and total_rows = 1

),

worst_per_day as (

    select * from comparisons
    qualify row_number() over (
        partition by check_name, entity_type, entity_id, category, period
        order by comparison_severity(expected, actual, tolerance) desc
    ) = 1

)

select * from worst_per_day
