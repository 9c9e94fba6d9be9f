-- materialized: view
-- One row per reported value, with the Europe/Berlin delivery day that contains its period.

with

source as (

    select * from datapoints

),

renamed as (

    select
        entity_type::varchar as entity_type,
        entity_id::varchar as entity_id,
        resolution::varchar as resolution,
        category::varchar as category,
        period_start::timestamptz as period_start,

        -- AT TIME ZONE turns the UTC instant into Europe/Berlin wall-clock time, whose date
        -- is the delivery day. This does not depend on the session time zone.
        (period_start::timestamptz at time zone 'Europe/Berlin')::date as local_day,

        value::double as value,
        unit::varchar as unit,

        run_id::varchar as run_id,
        fetched_at::timestamptz as fetched_at

    from source

)

select * from renamed
