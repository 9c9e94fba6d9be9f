-- materialized: table
-- Daily revenue per MW of rated capacity and per MW and year, recomputed from the absolute
-- daily revenue and the entity's capacity, next to the normalised values the API reports.
-- Differences are reported minus recomputed.
-- Grain: one row per (entity_type, entity_id, local_day, product) with daily revenue.

with

daily_revenue as (

    select * from mart_daily_revenue

),

capacity as (

    select * from mart_entity_capacity_daily

),

datapoints as (

    select * from stg_datapoints

),

category_rules as (

    select * from stg_category_rules

),

normalised_rules as (

    select
        category,
        product,
        per_year,
        annualisation_factor

    from category_rules
    where over_entities = 'normalised'

),

days_per_year as (

    select
        product,
        max(annualisation_factor) filter (where per_year) as days_per_year

    from normalised_rules
    group by product

),

reported as (

    select
        datapoints.entity_type,
        datapoints.entity_id,
        datapoints.local_day,
        normalised_rules.product,

        count(*) filter (where not normalised_rules.per_year) > 0 as is_per_mw_reported,
        any_value(datapoints.value) filter (where not normalised_rules.per_year) as reported_eur_per_mw,

        count(*) filter (where normalised_rules.per_year) > 0 as is_per_mw_year_reported,
        any_value(datapoints.value) filter (where normalised_rules.per_year) as reported_eur_per_mw_year

    from datapoints
    join normalised_rules using (category)
    where datapoints.resolution = 'daily'
    group by all

),

recomputed as (

    select
        daily_revenue.entity_type,
        daily_revenue.entity_id,
        daily_revenue.local_day,
        daily_revenue.product,
        daily_revenue.revenue_eur,
        capacity.capacity_mw,

        daily_revenue.revenue_eur / nullif(capacity.capacity_mw, 0) as revenue_eur_per_mw,
        daily_revenue.revenue_eur / nullif(capacity.capacity_mw, 0) * days_per_year.days_per_year
            as revenue_eur_per_mw_year

    from daily_revenue
    left join capacity using (entity_type, entity_id, local_day)
    left join days_per_year using (product)

),

compared as (

    select
        recomputed.*,

        coalesce(reported.is_per_mw_reported, false) as is_per_mw_reported,
        reported.reported_eur_per_mw,
        reported.reported_eur_per_mw - recomputed.revenue_eur_per_mw as difference_eur_per_mw,

        coalesce(reported.is_per_mw_year_reported, false) as is_per_mw_year_reported,
        reported.reported_eur_per_mw_year,
        reported.reported_eur_per_mw_year - recomputed.revenue_eur_per_mw_year as difference_eur_per_mw_year

    from recomputed
    left join reported using (entity_type, entity_id, local_day, product)

)

select * from compared
