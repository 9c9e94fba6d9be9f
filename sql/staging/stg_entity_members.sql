-- materialized: view
-- Each entity's member virtual assets. A virtual asset lists itself, so every entity type
-- has its members here.

with

source as (

    select * from entity_members

),

renamed as (

    select distinct
        entity_type::varchar as entity_type,
        entity_id::varchar as entity_id,
        virtual_asset_id::varchar as virtual_asset_id

    from source

)

select * from renamed
