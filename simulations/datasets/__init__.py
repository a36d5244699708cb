"""Public datasets, one folder each with the same file names (FLamby's convention).

``<name>/loader.py`` exposes the names of `simulations.datasets.registry.DatasetModule`;
``<name>/spec.toml`` is its data contract.
"""
