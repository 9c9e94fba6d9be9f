-- Macros shared by the checks. The runner executes this file as written, before any model.

-- Tolerance of one comparison. Money (units starting with EUR: EUR, EUR/MWh, EUR/MW,
-- EUR/MW/year) allows half a cent, other units (MWh, MW, h, MW*h) allow 1e-6, and both
-- grow to a relative 1e-9 of the recomputed value when that is larger.
create or replace macro comparison_tolerance(unit, expected) as
    greatest(
        case when unit like 'EUR%' then 0.005::double else 0.000001::double end,
        1e-9::double * abs(expected::double)
    );

-- How far a comparison is beyond its tolerance: above 0 fails, 0 or below passes. Both sides
-- null passes (nothing to compare); one side null fails.
create or replace macro comparison_severity(expected, actual, tolerance) as
    case
        when expected is null and actual is null then -'infinity'::double
        when expected is null or actual is null then 'infinity'::double
        else abs(actual::double - expected::double) - tolerance::double
    end;
