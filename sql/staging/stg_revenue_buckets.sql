-- materialized: view
-- Daily revenue buckets per virtual asset and product, with their Europe/Berlin delivery day.

with

source as (

    select * from revenue_buckets

),

renamed as (

    select
        entity_id::varchar as virtual_asset_id,
        product::varchar as product,
        bucket_start::timestamptz as bucket_start,
        bucket_end::timestamptz as bucket_end,

        -- A bucket starts at local midnight; its Europe/Berlin date is the delivery day.
        (bucket_start::timestamptz at time zone 'Europe/Berlin')::date as local_day,

        revenue_eur::double as revenue_eur,
        currency::varchar as currency,

        run_id::varchar as run_id,
        fetched_at::timestamptz as fetched_at

    from source

)

select * from renamed
