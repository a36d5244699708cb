"""The deployed server: SuperLink launcher, Flower control calls and the reply retry.

Every use of a Flower-internal name on the server side lives in this package.
"""
