"""edufl: privacy."""
