"""Asking again soon for a Flower object that is not uploaded yet: the wrapper both ends use.

Flower 1.41 hands a message out (to a SuperNode, or a reply to the ServerApp) as soon as its
metadata is in the SuperLink, while its objects may still be on their way up; a pull that comes
too early gets "object unavailable", and Flower's ``pull_objects`` then waits 1 s, doubling up
to 10 s, before asking again. `sooner` gives such a puller other defaults (a first wait of a
fraction of a second); the node (`client.node.object_pulls`) and the ServerApp
(`server.superlink.retry`) choose theirs. Nothing here imports Flower: the function and the
module to patch are handed in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

#: Set on a wrapped puller, so that wrapping (and installing) twice changes nothing.
MARK = "_edufl_quick_retry"


def sooner(pull: Callable[..., Any], **defaults: Any) -> Callable[..., Any]:
    """``pull`` with ``defaults`` for the keyword arguments a caller did not give itself."""
    if getattr(pull, MARK, False):
        return pull

    @functools.wraps(pull)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name, value in defaults.items():
            kwargs.setdefault(name, value)
        return pull(*args, **kwargs)

    setattr(wrapper, MARK, True)
    return wrapper


def install(module: ModuleType, name: str, **defaults: Any) -> bool:
    """Replace ``module.<name>`` (a Flower puller imported by name) by `sooner`'s version.

    Returns whether the module had such a function (a Flower layout without it is left as is).
    """
    pull = getattr(module, name, None)
    if not callable(pull):
        return False
    setattr(module, name, sooner(pull, **defaults))
    return True
