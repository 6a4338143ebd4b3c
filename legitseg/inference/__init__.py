"""Runners (one per backend), the accuracy modes around them, postprocessing."""
