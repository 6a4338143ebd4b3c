"""Sources -> ImageResults: the local streaming engine and the Ray Data engine."""
