-- materialized: table
-- Check 7: each daily revenue bucket equals the daily data-point revenue of its product:
--   wholesale = revenue_wholesale
--   ancillary = revenue_fcr + revenue_afrr_capacity + revenue_afrr_energy
--   tolling   = revenue_tolling
--   vba       = revenue_vba
-- Buckets are compared in EUR; a bucket's delivery day is the Europe/Berlin date of its
-- start. Days without all the daily revenue rows of the product are left to the
-- completeness check.
-- Grain: one row per (virtual asset, product, local day).

with

buckets as (

    select * from stg_checked_revenue_buckets

),

daily_revenue as (

    select * from mart_daily_revenue

),

bucket_components as (

    select * from (
        values
            ('wholesale', 'wholesale'),
            ('ancillary', 'fcr'),
            ('ancillary', 'afrr_capacity'),
            ('ancillary', 'afrr_energy'),
            ('tolling', 'tolling'),
            ('vba', 'vba')
    ) as components (bucket_product, product)

),

due_components as (

    select
        bucket_product,
        count(*) as due_component_rows

    from bucket_components
    group by all

),

datapoint_revenue as (

    select
        daily_revenue.entity_id as virtual_asset_id,
        daily_revenue.local_day,
        bucket_components.bucket_product,

        count(*) as component_rows,
        sum(daily_revenue.revenue_eur) as revenue_eur

    from daily_revenue
    join bucket_components using (product)
    where daily_revenue.entity_type = 'virtual_asset'
    group by all

),

comparisons as (

    select
        'revenue_buckets' as check_name,
        'virtual_asset' as entity_type,
        buckets.virtual_asset_id as entity_id,
        'revenue_' || buckets.product as category,
        buckets.local_day as period,

        datapoint_revenue.revenue_eur as expected,
        buckets.revenue_eur as actual,
        buckets.revenue_eur - datapoint_revenue.revenue_eur as difference,
        comparison_tolerance('EUR', datapoint_revenue.revenue_eur) as tolerance

    from buckets
    join datapoint_revenue
        on datapoint_revenue.virtual_asset_id = buckets.virtual_asset_id
        and datapoint_revenue.local_day = buckets.local_day
        and datapoint_revenue.bucket_product = buckets.product
    join due_components
        on due_components.bucket_product = datapoint_revenue.bucket_product
    where datapoint_revenue.component_rows = due_components.due_component_rows

)

select * from comparisons
