"""edufl: server."""
