"""soilnet/models."""
