-- materialized: table
-- Check 5: every portfolio, fleet and physical asset value equals its category's
-- over_entities rule applied to the member virtual assets active in the period:
--   sum                sum of the values (null when all are null)
--   max                largest value
--   mean               mean of the non-null values
--   weighted           sum(value x weight) / sum(weight) over members where both are non-null
--   capacity_weighted  sum(value x capacity_mw) / sum(capacity_mw) over members with a value
--   net_off            least(sum of buy volume, sum of sell volume), 15-minute periods only
-- At 15 minutes every rule is checked. A daily aggregate is compared with its members'
-- daily values only where the two orders of aggregation agree: sum over time and entities,
-- or weighted both ways by a weight that is summed both ways. Other daily aggregates follow
-- from the 15-minute check and the roll-up check. Normalised categories are left to the
-- normalised checks. A period where an active member lacks a row (or a weight row) is left
-- to the completeness check.
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

entity_members as (

    select * from stg_entity_members

),

virtual_assets as (

    select * from stg_virtual_assets

),

weight_rules as (

    select
        category as weight_category,
        over_time as weight_over_time,
        over_entities as weight_over_entities

    from category_rules

),

checked_rules as (

    select
        '15min' as resolution,
        category_rules.*

    from category_rules
    where over_entities <> 'normalised'

    union all

    select
        'daily' as resolution,
        category_rules.*

    from category_rules
    left join weight_rules using (weight_category)
    where (category_rules.over_time = 'sum' and category_rules.over_entities = 'sum')
        or (
            category_rules.over_time = 'weighted'
            and category_rules.over_entities = 'weighted'
            and weight_rules.weight_over_time = 'sum'
            and weight_rules.weight_over_entities = 'sum'
        )

),

member_rows as (

    select * from datapoints
    where entity_type = 'virtual_asset' and resolution in ('15min', 'daily')

),

aggregate_rows as (

    select * from datapoints
    where entity_type <> 'virtual_asset' and resolution in ('15min', 'daily')

),

aggregate_periods as (

    select distinct
        aggregate_rows.entity_type,
        aggregate_rows.entity_id,
        aggregate_rows.resolution,
        aggregate_rows.period_start,
        case aggregate_rows.resolution
            when '15min' then aggregate_rows.period_start + interval 15 minutes
            else local_days.day_end
        end as period_end

    from aggregate_rows
    join local_days using (local_day)

),

active_members as (

    -- A member is active in a period when its lifetime overlaps the period. Lifetimes
    -- start and end at local midnight, so the member is active for the whole period.
    select
        aggregate_periods.entity_type,
        aggregate_periods.entity_id,
        aggregate_periods.resolution,
        aggregate_periods.period_start,
        virtual_assets.virtual_asset_id,
        virtual_assets.capacity_mw

    from aggregate_periods
    join entity_members using (entity_type, entity_id)
    join virtual_assets using (virtual_asset_id)
    where virtual_assets.start_at < aggregate_periods.period_end
        and virtual_assets.end_at > aggregate_periods.period_start

),

active_member_counts as (

    select
        entity_type,
        entity_id,
        resolution,
        period_start,
        count(*) as active_members

    from active_members
    group by all

),

member_values as (

    select
        active_members.entity_type,
        active_members.entity_id,
        active_members.resolution,
        active_members.period_start,
        active_members.capacity_mw,

        member_rows.category,
        member_rows.value,

        checked_rules.unit,
        checked_rules.over_entities,
        checked_rules.weight_category,
        weights.value as weight,
        weights.category is not null as has_weight_row

    from active_members
    join member_rows
        on member_rows.entity_id = active_members.virtual_asset_id
        and member_rows.resolution = active_members.resolution
        and member_rows.period_start = active_members.period_start
    join checked_rules
        on checked_rules.resolution = member_rows.resolution
        and checked_rules.category = member_rows.category
    left join member_rows as weights
        on weights.entity_id = member_rows.entity_id
        and weights.resolution = member_rows.resolution
        and weights.period_start = member_rows.period_start
        and weights.category = checked_rules.weight_category

),

combined as (

    select
        entity_type,
        entity_id,
        resolution,
        period_start,
        category,
        unit,
        over_entities,
        weight_category,

        count(*) as member_rows,
        count(*) filter (where has_weight_row) as weight_rows,

        sum(value) as value_sum,
        max(value) as value_max,
        avg(value) as value_mean,
        sum(value * weight) / nullif(sum(weight) filter (where value is not null), 0) as value_weighted,
        sum(value * capacity_mw) / nullif(sum(capacity_mw) filter (where value is not null), 0)
            as value_capacity_weighted

    from member_values
    group by all

),

recomputed_by_rule as (

    select
        combined.entity_type,
        combined.entity_id,
        combined.resolution,
        combined.period_start,
        combined.category,
        combined.unit,

        case combined.over_entities
            when 'sum' then combined.value_sum
            when 'max' then combined.value_max
            when 'mean' then combined.value_mean
            when 'weighted' then combined.value_weighted
            when 'capacity_weighted' then combined.value_capacity_weighted
        end as expected,

        combined.member_rows = active_member_counts.active_members
            and (combined.weight_category is null or combined.weight_rows = combined.member_rows)
            as is_complete

    from combined
    join active_member_counts using (entity_type, entity_id, resolution, period_start)
    where combined.over_entities <> 'net_off'

),

traded_volumes as (

    select
        combined.entity_type,
        combined.entity_id,
        combined.resolution,
        combined.period_start,

        any_value(combined.value_sum) filter (where combined.category = 'buy_volume_wholesale')
            as buy_volume_mwh,
        any_value(combined.value_sum) filter (where combined.category = 'sell_volume_wholesale')
            as sell_volume_mwh,

        count(*) filter (where combined.member_rows = active_member_counts.active_members) = 2
            as is_complete

    from combined
    join active_member_counts using (entity_type, entity_id, resolution, period_start)
    where combined.resolution = '15min'
        and combined.category in ('buy_volume_wholesale', 'sell_volume_wholesale')
    group by all

),

net_off as (

    -- Energy bought by one member and sold by another in the same quarter-hour nets off
    -- inside the aggregate instead of being traded.
    select
        entity_type,
        entity_id,
        resolution,
        period_start,
        'net_off_volume_wholesale' as category,
        'MWh' as unit,

        case
            when buy_volume_mwh is null or sell_volume_mwh is null then null
            else least(buy_volume_mwh, sell_volume_mwh)
        end as expected,

        is_complete

    from traded_volumes

),

recomputed as (

    select * from recomputed_by_rule
    union all by name
    select * from net_off

),

comparisons as (

    select
        'aggregate_' || aggregate_rows.resolution as check_name,
        aggregate_rows.entity_type,
        aggregate_rows.entity_id,
        aggregate_rows.category,
        aggregate_rows.local_day as period,

        recomputed.expected,
        aggregate_rows.value as actual,
        aggregate_rows.value - recomputed.expected as difference,
        comparison_tolerance(recomputed.unit, recomputed.expected) as tolerance

    from aggregate_rows
    join recomputed
        on recomputed.entity_type = aggregate_rows.entity_type
        and recomputed.entity_id = aggregate_rows.entity_id
        and recomputed.resolution = aggregate_rows.resolution
        and recomputed.period_start = aggregate_rows.period_start
        and recomputed.category = aggregate_rows.category
    where recomputed.is_complete

),

worst_per_day as (

    select * from comparisons
    qualify row_number() over (
        partition by check_name, entity_type, entity_id, category, period
        order by comparison_severity(expected, actual, tolerance) desc
    ) = 1

)

select * from worst_per_day
