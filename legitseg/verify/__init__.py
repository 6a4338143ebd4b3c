"""Verification packages: freezing a run's outputs as cases, checking later runs."""
