"""edufl: client."""
