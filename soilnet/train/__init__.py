"""soilnet/train."""
