-- materialized: view
-- Virtual assets with their rated capacity: the mean of rated charge and discharge power.

with

source as (

    select * from virtual_assets

),

renamed as (

    select
        virtual_asset_id::varchar as virtual_asset_id,
        portfolio_id::varchar as portfolio_id,

        -- Lifetime [start_at, end_at): local midnights as UTC instants, end exclusive.
        start_at::timestamptz as start_at,
        end_at::timestamptz as end_at,

        rated_charge_power_mw::double as rated_charge_power_mw,
        rated_discharge_power_mw::double as rated_discharge_power_mw,
        (rated_charge_power_mw::double + rated_discharge_power_mw::double) / 2 as capacity_mw,

        energy_capacity_mwh::double as energy_capacity_mwh,
        charge_efficiency::double as charge_efficiency,
        discharge_efficiency::double as discharge_efficiency,
        delivery_zone::varchar as delivery_zone

    from source

)

select * from renamed
