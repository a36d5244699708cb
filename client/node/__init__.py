"""The deployed node: launcher, warm ClientApp executor, pacing and object pulls.

Every use of a Flower-internal name on the node side lives in this package, so a Flower upgrade
touches only these files.
"""
