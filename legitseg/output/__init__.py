"""The record format and OUT: records, writers (the Sink), overlays, locks, shards (no torch)."""
