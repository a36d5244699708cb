"""edufl: shared_models."""
