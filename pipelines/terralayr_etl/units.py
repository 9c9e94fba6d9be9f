"""Unit conversion at the API boundary: the API reports power in kW and energy in kWh."""

KW_PER_MW = 1000.0


def kw_to_mw(value_kw: float) -> float:
    """Convert kW (or kWh) from the API to MW (or MWh)."""
    return value_kw / KW_PER_MW
