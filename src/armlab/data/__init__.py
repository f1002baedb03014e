"""Data: pools, selection, shards, preparation, blob storage."""
