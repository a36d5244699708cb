"""Asking again soon for a Flower object that is not uploaded yet.

Flower 1.41 hands a message out as soon as its metadata is in the SuperLink, while its objects
(the model's arrays, the records) may still be on their way up. A pull that comes too early
gets "object unavailable", and ``flwr.supercore.inflatable.inflatable_utils.pull_objects``
then waits 1 s (``PULL_INITIAL_BACKOFF``, doubling up to 10 s) before asking again. A paced
SuperNode (``client.node.pacing``) asks for messages a fraction of a second after they are
sent, so it often comes that early: the 1 s is then a large part of a round's overhead on
loopback (``bench/bench_deploy.py``). Each quicker retry is one more request to the SuperLink,
which is why it goes with the paced SuperNode only (the default; ``--pull-interval 0`` turns
both off: see ``client.node.launcher.NodeOptions``).

``install`` makes a module's ``pull_objects`` start at ``INITIAL_BACKOFF_S`` instead; the
doubling, the cap, the time limit and the tries per object stay Flower's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

#: Seconds before asking again for an object that was not there (Flower: 1 s), then doubling.
INITIAL_BACKOFF_S = 0.05
_MARK = "_edufl_quick_retry"


def quick(pull_objects: Callable[..., Any]) -> Callable[..., Any]:
    """``pull_objects`` with a first retry after ``INITIAL_BACKOFF_S`` unless told otherwise."""
    if getattr(pull_objects, _MARK, False):
        return pull_objects

    @functools.wraps(pull_objects)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", INITIAL_BACKOFF_S)
        return pull_objects(*args, **kwargs)

    setattr(wrapper, _MARK, True)
    return wrapper


def install(module: ModuleType) -> bool:
    """Replace ``module.pull_objects`` (Flower's, imported by name) by ``quick``'s version."""
    pull_objects = getattr(module, "pull_objects", None)
    if not callable(pull_objects):
        return False
    module.pull_objects = quick(pull_objects)  # type: ignore[attr-defined]
    return True
