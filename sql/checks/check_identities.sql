-- materialized: table
-- Check 3, identities that hold in every period, at every resolution and for every entity:
--   net_volume_wholesale = sell_volume_wholesale - buy_volume_wholesale
--   revenue_wholesale = sell_vwap x sell_volume - buy_vwap x buy_volume (a null VWAP counts 0)
--   revenue_afrr_energy = revenue_afrr_energy_pos + revenue_afrr_energy_neg
--   net_off_volume_wholesale = 0 for a virtual asset
-- In a sum a null term counts as 0, and all terms null expect null. Periods missing one of
-- the rows an identity needs are left to the completeness check.
-- Grain: the period with the largest difference per (check_name, entity, category, local day).

with

datapoints as (

    select * from stg_checked_datapoints

),

periods as (

    select
        entity_type,
        entity_id,
        resolution,
        period_start,
        local_day,

        count(*) filter (where category = 'buy_volume_wholesale') as buy_volume_rows,
        any_value(value) filter (where category = 'buy_volume_wholesale') as buy_volume_mwh,
        count(*) filter (where category = 'sell_volume_wholesale') as sell_volume_rows,
        any_value(value) filter (where category = 'sell_volume_wholesale') as sell_volume_mwh,
        count(*) filter (where category = 'net_volume_wholesale') as net_volume_rows,
        any_value(value) filter (where category = 'net_volume_wholesale') as net_volume_mwh,
        count(*) filter (where category = 'net_off_volume_wholesale') as net_off_volume_rows,
        any_value(value) filter (where category = 'net_off_volume_wholesale') as net_off_volume_mwh,

        count(*) filter (where category = 'buy_vwap_wholesale') as buy_vwap_rows,
        any_value(value) filter (where category = 'buy_vwap_wholesale') as buy_vwap_eur_per_mwh,
        count(*) filter (where category = 'sell_vwap_wholesale') as sell_vwap_rows,
        any_value(value) filter (where category = 'sell_vwap_wholesale') as sell_vwap_eur_per_mwh,
        count(*) filter (where category = 'revenue_wholesale') as wholesale_rows,
        any_value(value) filter (where category = 'revenue_wholesale') as wholesale_eur,

        count(*) filter (where category = 'revenue_afrr_energy') as afrr_energy_rows,
        any_value(value) filter (where category = 'revenue_afrr_energy') as afrr_energy_eur,
        count(*) filter (where category = 'revenue_afrr_energy_pos') as afrr_energy_pos_rows,
        any_value(value) filter (where category = 'revenue_afrr_energy_pos') as afrr_energy_pos_eur,
        count(*) filter (where category = 'revenue_afrr_energy_neg') as afrr_energy_neg_rows,
        any_value(value) filter (where category = 'revenue_afrr_energy_neg') as afrr_energy_neg_eur

    from datapoints
    where category in (
        'buy_volume_wholesale',
        'sell_volume_wholesale',
        'net_volume_wholesale',
        'net_off_volume_wholesale',
        'buy_vwap_wholesale',
        'sell_vwap_wholesale',
        'revenue_wholesale',
        'revenue_afrr_energy',
        'revenue_afrr_energy_pos',
        'revenue_afrr_energy_neg'
    )
    group by all

),

net_volume as (

    select
        'net_volume_' || resolution as check_name,
        entity_type,
        entity_id,
        'net_volume_wholesale' as category,
        local_day as period,
        case
            when sell_volume_mwh is null and buy_volume_mwh is null then null
            else coalesce(sell_volume_mwh, 0) - coalesce(buy_volume_mwh, 0)
        end as expected,
        net_volume_mwh as actual,
        'MWh' as unit

    from periods
    where sell_volume_rows = 1 and buy_volume_rows = 1 and net_volume_rows = 1

),

wholesale_revenue as (

    select
        'wholesale_revenue_' || resolution as check_name,
        entity_type,
        entity_id,
        'revenue_wholesale' as category,
        local_day as period,
        case
            when sell_volume_mwh is null and buy_volume_mwh is null then null
            else coalesce(sell_vwap_eur_per_mwh * sell_volume_mwh, 0)
                - coalesce(buy_vwap_eur_per_mwh * buy_volume_mwh, 0)
        end as expected,
        wholesale_eur as actual,
        'EUR' as unit

    from periods
    where sell_volume_rows = 1 and buy_volume_rows = 1
        and sell_vwap_rows = 1 and buy_vwap_rows = 1 and wholesale_rows = 1

),

afrr_energy as (

    select
        'afrr_energy_' || resolution as check_name,
        entity_type,
        entity_id,
        'revenue_afrr_energy' as category,
        local_day as period,
        case
            when afrr_energy_pos_eur is null and afrr_energy_neg_eur is null then null
            else coalesce(afrr_energy_pos_eur, 0) + coalesce(afrr_energy_neg_eur, 0)
        end as expected,
        afrr_energy_eur as actual,
        'EUR' as unit

    from periods
    where afrr_energy_pos_rows = 1 and afrr_energy_neg_rows = 1 and afrr_energy_rows = 1

),

virtual_asset_net_off as (

    -- A single virtual asset has nothing to net against, so its net-off volume is 0.
    select
        'net_off_virtual_asset_' || resolution as check_name,
        entity_type,
        entity_id,
        'net_off_volume_wholesale' as category,
        local_day as period,
        0::double as expected,
        net_off_volume_mwh as actual,
        'MWh' as unit

    from periods
    where entity_type = 'virtual_asset' and net_off_volume_rows = 1

),

identities as (

    select * from net_volume
    union all
    select * from wholesale_revenue
    union all
    select * from afrr_energy
    union all
    select * from virtual_asset_net_off

),

comparisons as (

    select
        check_name,
        entity_type,
        entity_id,
        category,
        period,

        expected,
        actual,
        actual - expected as difference,
        comparison_tolerance(unit, expected) as tolerance

    from identities

),

worst_per_day as (

    select * from comparisons
    qualify row_number() over (
        partition by check_name, entity_type, entity_id, category, period
        order by comparison_severity(expected, actual, tolerance) desc
    ) = 1

)

select * from worst_per_day
