-- materialized: table
-- Check 6 at 15-minute and hourly resolution: every normalised value equals its revenue in
-- the same period divided by the entity's capacity in MW, times 365 for per-year
-- categories. The capacity is the sum of capacity_mw over the member virtual assets active
-- in the period; a virtual asset is its own only member. Periods without the revenue row
-- are left to the completeness check. Daily values: check_normalised_daily.
-- Grain: the period with the largest difference per (check_name, entity, category, local day).

with

datapoints as (

    select * from stg_checked_datapoints

),

category_rules as (

    select * from stg_category_rules

),

entity_members as (

    select * from stg_entity_members

),

virtual_assets as (

    select * from stg_virtual_assets

),

short_periods as (

    select * from datapoints
    where resolution in ('15min', 'hourly')

),

normalised_rows as (

    select
        short_periods.*,
        category_rules.revenue_category,
        category_rules.annualisation_factor,
        category_rules.unit as normalised_unit

    from short_periods
    join category_rules using (category)
    where category_rules.over_entities = 'normalised'

),

periods as (

    select distinct
        entity_type,
        entity_id,
        resolution,
        period_start,
        period_start
            + case resolution when '15min' then interval 15 minutes else interval 1 hour end
            as period_end

    from normalised_rows

),

capacity as (

    -- Lifetimes start and end at local midnight, which is a UTC hour boundary, so a
    -- member that overlaps a quarter-hour or an hour is active for all of it.
    select
        periods.entity_type,
        periods.entity_id,
        periods.resolution,
        periods.period_start,
        sum(virtual_assets.capacity_mw) as capacity_mw

    from periods
    join entity_members using (entity_type, entity_id)
    join virtual_assets using (virtual_asset_id)
    where virtual_assets.start_at < periods.period_end
        and virtual_assets.end_at > periods.period_start
    group by all

),

recomputed as (

    select
        normalised_rows.entity_type,
        normalised_rows.entity_id,
        normalised_rows.resolution,
        normalised_rows.category,
        normalised_rows.local_day,
        normalised_rows.normalised_unit,
        normalised_rows.value as reported_value,

        revenue_rows.value / nullif(capacity.capacity_mw, 0) * normalised_rows.annualisation_factor
            as expected

    from normalised_rows
    join short_periods as revenue_rows
        on revenue_rows.entity_type = normalised_rows.entity_type
        and revenue_rows.entity_id = normalised_rows.entity_id
        and revenue_rows.resolution = normalised_rows.resolution
        and revenue_rows.period_start = normalised_rows.period_start
        and revenue_rows.category = normalised_rows.revenue_category
    left join capacity
        on capacity.entity_type = normalised_rows.entity_type
        and capacity.entity_id = normalised_rows.entity_id
        and capacity.resolution = normalised_rows.resolution
        and capacity.period_start = normalised_rows.period_start

),

comparisons as (

    select
        'normalised_' || resolution as check_name,
        entity_type,
        entity_id,
        category,
        local_day as period,

        expected,
        reported_value as actual,
        reported_value - expected as difference,
        comparison_tolerance(normalised_unit, expected) as tolerance

    from recomputed

),

worst_per_day as (

    select * from comparisons
    qualify row_number() over (
        partition by check_name, entity_type, entity_id, category, period
        order by comparison_severity(expected, actual, tolerance) desc
    ) = 1

)

select * from worst_per_day
