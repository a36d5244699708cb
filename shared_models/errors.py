"""The small family of domain errors edufl raises for input a user can fix.

The CLI turns any of these into one clear line and a non-zero exit; no traceback for a user
mistake. Each refines the built-in exception it behaves like.
"""

from __future__ import annotations


class EduflError(Exception):
    """Base of every edufl error that a user, not a programmer, is expected to fix."""


class DataContractError(EduflError, ValueError):
    """A feature spec, an export or a mapping file does not satisfy the data contract."""


class PrivacyBudgetExceeded(EduflError, RuntimeError):
    """Spending more privacy budget would exceed what an institution allowed."""


class PrivacyConfigError(EduflError, ValueError):
    """A privacy budget or DP setting that cannot protect an institution's students as given."""


class PublicError(Exception):
    """Mixin: an error whose message says nothing about a student, so a node may send it.

    A node's ClientApp replies to a failed task with the error's text (`client.app`); only
    errors of this kind (and the configuration, protocol and budget errors it names) keep their
    text there. Anything else, a data error above all (it may quote a value of the export), is
    replaced by its kind and stays in the node's log.
    """
