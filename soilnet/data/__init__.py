"""soilnet/data."""
