-- materialized: table
-- Check 6 at daily resolution: the reported daily normalised values (per MW and per MW and
-- year) equal those recomputed in mart_per_mw_daily from the daily revenue and the
-- capacity of the members active on the day. Days without the reported normalised row
-- are left to the completeness check.
-- Grain: one row per (check_name, entity, category, local day).

with

all_days as (

    select * from mart_per_mw_daily

),

scope as (

    select * from check_scope

),

per_mw_daily as (

    -- The mart covers every day; the check compares the days in check_scope.
    select all_days.*

    from all_days
    cross join scope
    where all_days.local_day >= scope.first_day
        and all_days.local_day < scope.end_day

),

per_mw as (

    select
        'normalised_daily' as check_name,
        entity_type,
        entity_id,
        'revenue_normalised_' || product as category,
        local_day as period,

        revenue_eur_per_mw as expected,
        reported_eur_per_mw as actual,
        difference_eur_per_mw as difference,
        comparison_tolerance('EUR/MW', revenue_eur_per_mw) as tolerance

    from per_mw_daily
    where is_per_mw_reported

),

per_mw_year as (

    select
        'normalised_daily' as check_name,
        entity_type,
        entity_id,
        'revenue_normalised_per_year_' || product as category,
        local_day as period,

        revenue_eur_per_mw_year as expected,
        reported_eur_per_mw_year as actual,
        difference_eur_per_mw_year as difference,
        comparison_tolerance('EUR/MW/year', revenue_eur_per_mw_year) as tolerance

    from per_mw_daily
    where is_per_mw_year_reported

),

comparisons as (

    select * from per_mw
    union all
    select * from per_mw_year

)

select * from comparisons
