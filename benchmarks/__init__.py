"""`make bench`: legitseg against the forward bound and a researcher's loop (docs/benchmarks.md)."""
