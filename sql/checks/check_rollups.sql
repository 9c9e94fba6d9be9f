-- materialized: table
-- Check 4: every hourly and daily value equals its category's over_time rule applied to the
-- same entity's 15-minute values:
--   sum       sum of the values (null when all are null)
--   mean      mean of the non-null values
--   weighted  sum(value x weight) / sum(weight) over periods where both are non-null, null
--             when those weights sum to 0
-- Normalised categories are left to the normalised checks, which recompute them from revenue
-- and capacity at every resolution. An hour or day is compared only when all its
-- quarter-hours have a row, and a weight row for weighted categories. Missing rows are
-- left to the completeness check.
-- Grain: the period with the largest difference per (check_name, entity, category, local day).

with

datapoints as (

    select * from stg_checked_datapoints

),

category_rules as (

    select * from stg_category_rules

),

local_days as (

    select * from stg_local_days

),

rolled_up_rules as (

    select * from category_rules
    where over_entities <> 'normalised'

),

quarter_hours as (

    select * from datapoints
    where resolution = '15min'

),

quarter_hours_with_weights as (

    select
        quarter_hours.entity_type,
        quarter_hours.entity_id,
        quarter_hours.category,
        quarter_hours.period_start,
        quarter_hours.local_day,
        quarter_hours.value,

        rolled_up_rules.unit,
        rolled_up_rules.over_time,
        rolled_up_rules.weight_category,
        weights.value as weight,
        weights.category is not null as has_weight_row

    from quarter_hours
    join rolled_up_rules using (category)
    left join quarter_hours as weights
        on weights.entity_type = quarter_hours.entity_type
        and weights.entity_id = quarter_hours.entity_id
        and weights.period_start = quarter_hours.period_start
        and weights.category = rolled_up_rules.weight_category

),

quarter_hour_periods as (

    select distinct
        period_start,
        local_day

    from quarter_hours

),

coarse_periods as (

    -- Each quarter-hour belongs to one UTC hour and one Europe/Berlin delivery day. The
    -- session time zone is UTC (the runner sets it), so date_trunc cuts UTC hours.
    select
        period_start,
        'hourly' as resolution,
        date_trunc('hour', period_start) as coarse_period_start,
        4 as due_quarter_hours

    from quarter_hour_periods

    union all

    select
        quarter_hour_periods.period_start,
        'daily' as resolution,
        local_days.day_start as coarse_period_start,
        local_days.quarter_hours as due_quarter_hours

    from quarter_hour_periods
    join local_days using (local_day)

),

rolled_up as (

    select
        quarter_hours_with_weights.entity_type,
        quarter_hours_with_weights.entity_id,
        quarter_hours_with_weights.category,
        coarse_periods.resolution,
        coarse_periods.coarse_period_start,
        coarse_periods.due_quarter_hours,
        quarter_hours_with_weights.unit,
        quarter_hours_with_weights.over_time,
        quarter_hours_with_weights.weight_category,

        count(*) as quarter_hour_rows,
        count(*) filter (where quarter_hours_with_weights.has_weight_row) as weight_rows,

        sum(quarter_hours_with_weights.value) as value_sum,
        avg(quarter_hours_with_weights.value) as value_mean,
        sum(quarter_hours_with_weights.value * quarter_hours_with_weights.weight)
            / nullif(
                sum(quarter_hours_with_weights.weight)
                    filter (where quarter_hours_with_weights.value is not null),
                0
            ) as value_weighted

    from quarter_hours_with_weights
    join coarse_periods using (period_start)
    group by all

),

recomputed as (

    select
        *,
        case over_time
            when 'sum' then value_sum
            when 'mean' then value_mean
            when 'weighted' then value_weighted
        end as expected

    from rolled_up
    where quarter_hour_rows = due_quarter_hours
        and (weight_category is null or weight_rows = quarter_hour_rows)

),

reported as (

    select * from datapoints
    where resolution in ('hourly', 'daily')

),

comparisons as (

    select
        'rollup_' || reported.resolution as check_name,
        reported.entity_type,
        reported.entity_id,
        reported.category,
        reported.local_day as period,

        recomputed.expected,
        reported.value as actual,
        reported.value - recomputed.expected as difference,
        comparison_tolerance(recomputed.unit, recomputed.expected) as tolerance

    from reported
    join recomputed
        on recomputed.entity_type = reported.entity_type
        and recomputed.entity_id = reported.entity_id
        and recomputed.category = reported.category
        and recomputed.resolution = reported.resolution
        and recomputed.coarse_period_start = reported.period_start

),

worst_per_day as (

    select * from comparisons
    qualify row_number() over (
        partition by check_name, entity_type, entity_id, category, period
        order by comparison_severity(expected, actual, tolerance) desc
    ) = 1

)

select * from worst_per_day
