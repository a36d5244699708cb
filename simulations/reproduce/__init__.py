"""`edufl reproduce`: the seed papers' experiments (config, data, runs, stats, figures, report)."""
