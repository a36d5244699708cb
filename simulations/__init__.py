"""edufl: simulations."""
