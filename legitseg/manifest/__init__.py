"""models.yaml -> validated, typed specs (no torch)."""
