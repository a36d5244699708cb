"""UCI Student Performance (Cortez & Silva 2008)."""
