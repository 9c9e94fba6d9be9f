-- materialized: table
-- Check 1, completeness: rows per entity, category and delivery day against the calendar.
-- Due per active day: 92, 96 or 100 rows at 15min and raw, 23, 24 or 25 at hourly, 1 at
-- daily; 0 on a day when no member of the entity is active. Only days the run covered are
-- checked (days with any row for that entity and resolution), and every documented category
-- that an entity of the same type reports at that resolution is due. Categories the API sends
-- but the project does not know are kept in datapoints and reported by the run, but not
-- checked here, because no rule states on which days they are due.
-- Grain: one row per (check_name, entity, category, local day); tolerance 0 rows.

with

datapoints as (

    select * from stg_checked_datapoints

),

local_days as (

    select * from stg_local_days

),

category_rules as (

    select * from stg_category_rules

),

capacity as (

    select * from mart_entity_capacity_daily

),

row_counts as (

    select
        entity_type,
        entity_id,
        resolution,
        category,
        local_day,
        count(*) as row_count

    from datapoints
    group by all

),

covered_days as (

    select distinct
        entity_type,
        entity_id,
        resolution,
        local_day

    from row_counts

),

due_categories as (

    select distinct
        entity_type,
        resolution,
        category

    from row_counts
    where category in (select category from category_rules)

),

due_rows as (

    select
        covered_days.entity_type,
        covered_days.entity_id,
        covered_days.resolution,
        due_categories.category,
        covered_days.local_day,

        case
            when coalesce(capacity.active_members, 0) = 0 then 0
            when covered_days.resolution = 'daily' then 1
            when covered_days.resolution = 'hourly' then local_days.hours
            else local_days.quarter_hours
        end as due_row_count

    from covered_days
    join due_categories using (entity_type, resolution)
    join local_days using (local_day)
    left join capacity using (entity_type, entity_id, local_day)

),

comparisons as (

    select
        'completeness_' || due_rows.resolution as check_name,
        due_rows.entity_type,
        due_rows.entity_id,
        due_rows.category,
        due_rows.local_day as period,

        due_rows.due_row_count::double as expected,
        coalesce(row_counts.row_count, 0)::double as actual,
        coalesce(row_counts.row_count, 0)::double - due_rows.due_row_count::double as difference,
        0::double as tolerance

    from due_rows
    left join row_counts using (entity_type, entity_id, resolution, category, local_day)

)

select * from comparisons
