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

A task's process can meet the same wait one step later: Flower's SuperNode creates a message's
task before it pulls the message's objects from the SuperLink, so a task handed out then (the
warm executor used to fork on "Receiving: "; an idle ask can still hand it out early) asks the
SuperNode's local Runtime API for objects it does not hold yet, and Flower's
``run_clientapp.pull_task_input`` waits the same 1 s: 0.6 to 1 s in most tasks of a steady
round (bench/bench_deploy.py with ``--log-times``). The executor now forks once the SuperNode
says it received the message (`client.node.warm_exec`), and ``install_task`` makes a task that
is early all the same ask again after ``TASK_BACKOFF_S``, doubling up to ``TASK_BACKOFF_CAP_S``
(1 s, Flower's first wait): a message 0.3 s late costs 0.05 + 0.1 + 0.2 s of asking, and a task
waiting long (50 nodes loading one SuperLink) asks its node once a second. With a cap of 0.1 s
the 50-node load test's first round never ended (load average 35-38 on 2 cores, the run failed
after 7 min: up to 50 early tasks asking ten times a second); with 1 s it ran 10/10 rounds,
0 of 500 updates lost, at load 6-20, as before the quick retry. The tries per object are then
unbounded and Flower's time limit (2 h) the bound,
about the time Flower's own 500 tries with its backoff take, so a large message on a slow link
is not given up sooner than Flower would.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from shared_models import object_pulls as _shared

#: Seconds before asking again for an object that was not there (Flower: 1 s), then doubling.
INITIAL_BACKOFF_S = 0.05
#: In a task's process, asking the SuperNode: the first wait and the longest (Flower: 1 s, 10 s).
TASK_BACKOFF_S = 0.05
TASK_BACKOFF_CAP_S = 1.0
#: The SuperNode's settings: Flower's doubling, cap and tries.
_NODE = {"initial_backoff": INITIAL_BACKOFF_S}
#: The task's settings: tries unbounded, Flower's time limit the bound.
_TASK = {
    "initial_backoff": TASK_BACKOFF_S,
    "backoff_cap": TASK_BACKOFF_CAP_S,
    "max_tries_per_object": None,
}


def quick(pull_objects: Callable[..., Any]) -> Callable[..., Any]:
    """``pull_objects`` with a first retry after ``INITIAL_BACKOFF_S`` unless told otherwise."""
    return _shared.sooner(pull_objects, **_NODE)


def install(module: ModuleType) -> bool:
    """Replace ``module.pull_objects`` (Flower's, imported by name) by ``quick``'s version."""
    return _shared.install(module, "pull_objects", **_NODE)


def quick_task(pull_and_inflate: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's ``pull_and_inflate_object_from_tree`` asking again after ``TASK_BACKOFF_S``
    (doubling up to ``TASK_BACKOFF_CAP_S``, tries bounded by Flower's time limit only), unless
    told otherwise."""
    return _shared.sooner(pull_and_inflate, **_TASK)


def install_task(module: ModuleType) -> bool:
    """Replace ``module.pull_and_inflate_object_from_tree`` (Flower's ``run_clientapp`` imports
    it by name) by ``quick_task``'s version; call it in the task's own process only."""
    return _shared.install(module, "pull_and_inflate_object_from_tree", **_TASK)
