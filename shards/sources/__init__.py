"""shards/sources."""
