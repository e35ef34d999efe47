"""soilnet/evaluate."""
