"""An object not uploaded yet is asked for again after 0.05 s, not Flower's 1 s."""

from __future__ import annotations

import itertools
import time
import types

import pytest
from flwr.supercore.inflatable.inflatable_utils import (
    ObjectPullError,
    ObjectUnavailableError,
    pull_objects,
)

from client.node import object_pulls


def arrives_after(seconds: float) -> tuple[object, list[float]]:
    """A pull function whose object is 'still uploading' for ``seconds``; the ask times."""
    # perf_counter: a test may stand a fake clock in for time.monotonic
    start = time.perf_counter()
    asks: list[float] = []

    def pull(object_id: str) -> bytes:
        asks.append(time.perf_counter() - start)
        if asks[-1] < seconds:
            raise ObjectUnavailableError(object_id)
        return b"content"

    return pull, asks


def test_an_object_uploading_for_a_moment_arrives_a_moment_later_not_a_second() -> None:
    pull, asks = arrives_after(0.1)
    quick = object_pulls.quick(pull_objects)
    assert quick(["a" * 64], pull_object_fn=pull) == {"a" * 64: b"content"}
    assert asks[-1] < 0.6  # Flower's own first retry alone is 0.8-1.2 s

    pull, asks = arrives_after(0.1)
    pull_objects(["b" * 64], pull_object_fn=pull)
    assert asks[-1] >= 0.8  # what it replaces


def test_the_callers_own_backoff_and_flowers_limits_still_apply() -> None:
    seen: dict[str, object] = {}

    def fake(*args: object, **kwargs: object) -> dict[str, bytes]:
        seen.update(kwargs)
        return {}

    object_pulls.quick(fake)([], pull_object_fn=None, initial_backoff=2.0)
    assert seen["initial_backoff"] == 2.0
    pull, _ = arrives_after(60)
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


def test_a_task_asks_its_supernode_again_soon_for_a_message_still_arriving() -> None:
    """The task's pull of its message (Flower's ``pull_and_inflate_object_from_tree``, which
    hands its backoff to ``pull_objects``) retries after 0.05 s, doubling to at most 1 s,
    where Flower's waits 1 s first and doubles to 10 s."""
    seen: dict[str, object] = {}

    def pull_and_inflate(object_ids: list[str], pull_fn: object, **kwargs: object) -> object:
        seen.update(kwargs)
        return pull_objects(object_ids, pull_fn, **kwargs)  # type: ignore[arg-type]

    pull, asks = arrives_after(0.3)
    quick = object_pulls.quick_task(pull_and_inflate)
    assert quick(["d" * 64], pull) == {"d" * 64: b"content"}
    assert seen == {"initial_backoff": 0.05, "backoff_cap": 1.0, "max_tries_per_object": None}
    assert asks[-1] < 0.6  # Flower's own first retry alone is 0.8-1.2 s
    gaps = [b - a for a, b in itertools.pairwise(asks)]
    assert len(gaps) >= 3 and max(gaps) < 0.3  # 0.05, 0.1, 0.2: doubling from 0.05 s

    seen.clear()
    object_pulls.quick_task(pull_and_inflate)(["e" * 64], pull, initial_backoff=2.0)
    assert seen["initial_backoff"] == 2.0  # a caller's own choice stays


def test_install_task_replaces_run_clientapps_pull_once() -> None:
    from flwr.supernode.runtime import run_clientapp

    module = types.ModuleType("copy")
    module.__dict__.update(vars(run_clientapp))
    original = module.pull_and_inflate_object_from_tree  # type: ignore[attr-defined]
    assert object_pulls.install_task(module)
    first = module.pull_and_inflate_object_from_tree  # type: ignore[attr-defined]
    assert first is not original and getattr(first, "_edufl_quick_retry", False)
    assert object_pulls.install_task(module)
    assert module.pull_and_inflate_object_from_tree is first  # type: ignore[attr-defined]
    assert not object_pulls.install_task(types.ModuleType("no_pulls"))
