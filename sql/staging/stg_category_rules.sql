-- materialized: view
-- The documented categories and their aggregation rules. The runner writes the seed table
-- category_rules from terralayr_etl.categories before it builds any model.

with

source as (

    select * from category_rules

),

renamed as (

    select
        category::varchar as category,
        unit::varchar as unit,

        -- sum, weighted or mean over time; sum, weighted, max, mean, capacity_weighted,
        -- net_off or normalised across entities.
        over_time::varchar as over_time,
        over_entities::varchar as over_entities,
        weight_category::varchar as weight_category,

        -- Set for normalised categories only: the absolute revenue they divide by capacity
        -- and its product, and whether the value is per MW and year. The factor turns per MW
        -- into the category's unit: 365 days for per-year categories, else 1.
        revenue_category::varchar as revenue_category,
        product::varchar as product,
        per_year::boolean as per_year,
        annualisation_factor::double as annualisation_factor

    from source

)

select * from renamed
