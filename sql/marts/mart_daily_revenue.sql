-- materialized: table
-- Daily revenue per entity and product as the API reports it at daily resolution.
-- Products: total, wholesale, fcr, afrr_capacity, afrr_energy, tolling, vba, and the aFRR
-- energy directions afrr_energy_pos and afrr_energy_neg, so that every normalised category
-- has its revenue here.
-- Grain: one row per (entity_type, entity_id, local_day, product) with a daily value.

with

datapoints as (

    select * from stg_datapoints

),

category_rules as (

    select * from stg_category_rules

),

products as (

    select distinct
        product,
        revenue_category

    from category_rules
    where product is not null

),

daily_revenue as (

    select
        datapoints.entity_type,
        datapoints.entity_id,
        datapoints.local_day,
        products.product,
        datapoints.value as revenue_eur

    from datapoints
    join products on products.revenue_category = datapoints.category
    where datapoints.resolution = 'daily'

)

select * from daily_revenue
