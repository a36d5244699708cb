"""An object not uploaded yet is asked for again after 0.05 s, not Flower's 1 s."""

from __future__ import annotations

import time
import types

import pytest
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectUnavailableError,
    pull_objects,
)

from client.node import object_pulls


def _arrives_after(seconds: float) -> tuple[object, list[float]]:
    """A pull function whose object is 'still uploading' for ``seconds``; the ask times."""
    start = time.monotonic()
    asks: list[float] = []

    def pull(object_id: str) -> bytes:
        asks.append(time.monotonic() - start)
        if asks[-1] < seconds:
            raise ObjectUnavailableError(object_id)
        return b"content"

    return pull, asks


def test_an_object_uploading_for_a_moment_arrives_a_moment_later_not_a_second() -> None:
    pull, asks = _arrives_after(0.1)
    quick = object_pulls.quick(pull_objects)
    assert quick(["a" * 64], pull_object_fn=pull) == {"a" * 64: b"content"}
    assert asks[-1] < 0.6  # Flower's own first retry alone is 0.8-1.2 s

    pull, asks = _arrives_after(0.1)
    pull_objects(["b" * 64], pull_object_fn=pull)
    assert asks[-1] >= 0.8  # what it replaces


def test_the_callers_own_backoff_and_flowers_limits_still_apply() -> None:
    seen: dict[str, object] = {}

    def fake(*args: object, **kwargs: object) -> dict[str, bytes]:
        seen.update(kwargs)
        return {}

    object_pulls.quick(fake)([], pull_object_fn=None, initial_backoff=2.0)
    assert seen["initial_backoff"] == 2.0
    pull, _ = _arrives_after(60)
    with pytest.raises(ObjectPullError, match="retry limit"):
        object_pulls.quick(pull_objects)(["c" * 64], pull_object_fn=pull, max_tries_per_object=3)


def test_install_replaces_a_modules_pull_objects_once() -> None:
    module = types.ModuleType("caller")
    module.pull_objects = pull_objects  # type: ignore[attr-defined]
    assert object_pulls.install(module)
    first = module.pull_objects  # type: ignore[attr-defined]
    assert first is not pull_objects
    assert object_pulls.install(module)
    assert module.pull_objects is first  # type: ignore[attr-defined]
    assert not object_pulls.install(types.ModuleType("no_pulls"))


def test_a_paced_supernode_uses_the_quick_version() -> None:
    from flwr.supernode import start_client_internal

    from client.node.pacing import Pace, install

    loop = types.ModuleType("copy")
    loop.__dict__.update(vars(start_client_internal))
    assert install(loop, Pace())
    assert getattr(loop.pull_objects, "_edufl_quick_retry", False)
