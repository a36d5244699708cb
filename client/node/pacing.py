"""Flower's SuperNode, asking for its next message sooner while a run is busy.

``python -m client.node.pacing [--pull-interval S] -- flower-supernode ARGS...``

Flower 1.41's SuperNode (``flwr.supernode.start_client_internal``) asks the SuperLink for a
message, and when there is none sleeps a fixed 3 s before asking again; once a message is
handed to the ClientApp it checks for the reply every 0.5 s. Both are literals in its loop, with
no option to change them. In a federation the next message usually comes within a second of the
node's reply (the next round starts when the last node answers), so the 3 s sleep alone costs a
round 1.5 s on average (``bench/bench_deploy.py``: 5.9 s of overhead per round with Flower's
pace, 3.4 s paced).

This command runs Flower's own ``flower-supernode`` entry point with that loop paced instead:
after the node received or sent a message, an empty pull is followed by ``--pull-interval``
seconds (0.25) for ``FLAT_S`` (2.5 s), then each further empty pull by 25 % more, up to
Flower's 3 s: a busy node asks about ten times in the 2.5 s after each message and about
a dozen more in the 10 s after that, an idle one exactly as Flower does.
The reply check runs every 0.05 s (it reads the SuperNode's own in-memory state), and an
object of a message that is not uploaded yet is asked for again after 0.05 s instead of 1 s
(``client.node.object_pulls``), and each heartbeat waits 15 s for the SuperLink's answer
instead of 5 s, sent a little more often to fit (``client.node.heartbeats``: a loaded SuperLink
that reads a heartbeat after its caller left does not count it). Nothing else in Flower's loop
changes: the same pulls, pushes and retries.

On by default (``edufl client start``; ``--pull-interval 0`` keeps Flower's pace): every
quicker ask is a request to the SuperLink. With 50 paced nodes on one 2-core machine
(``bench/load_test.py``) Flower's SQLite store once answered "database is locked" to so many
of them that the ServerApp's heartbeat failed and the run with it; the SuperLink now waits up to
30 s for SQLite's lock (WAL journal) and serves at most 16 Fleet requests at once
(`server.superlink.serve`). It saves about 1.5 s a round.

If the Flower release in use no longer has the loop this is written against (``pyproject.toml``
pins ``flwr==1.41.0`` and `main` refuses another), the SuperNode runs at Flower's own pace,
with a warning.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from client.node import flower_surface, heartbeats, log_times, object_pulls
from shared_models.deployment import exit_unless_pinned_flower

logger = logging.getLogger("edufl.supernode_pace")

#: Seconds Flower 1.41's loop sleeps after a pull that brought no message.
FLOWER_IDLE_S = 3.0
#: Seconds Flower 1.41's loop sleeps between checks for a reply (and for a reply's objects).
FLOWER_REPLY_CHECK_S = 0.5
#: The first wait after the node's last message; each later empty pull waits ``GROWTH`` x more.
PULL_INTERVAL_S = 0.25
GROWTH = 1.25
#: For this long after the node's last message every empty pull waits ``PULL_INTERVAL_S``; the
#: waits grow only after it. The next round's message usually comes 0.5-2 s after a node's reply
#: (the other nodes' replies, aggregation, checkpoint), where the growing waits (0.49, 0.61 s)
#: had left a node a quarter of a second late on average (docs/benchmarks.md, section 4).
FLAT_S = 2.5
REPLY_CHECK_S = 0.05
#: The loop's functions wrapped here (their names in ``flwr.supernode.start_client_internal``).
_PULL, _PUSH = flower_surface.PULL.attr, flower_surface.PUSH.attr


class Pace:
    """How long the SuperNode waits after an empty pull: short after a message, then longer."""

    def __init__(
        self,
        first: float = PULL_INTERVAL_S,
        slowest: float = FLOWER_IDLE_S,
        growth: float = GROWTH,
        flat: float = FLAT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < first <= slowest:
            raise ValueError(f"the pull interval must be in (0, {slowest:g}] s, not {first!r}")
        if growth < 1:
            raise ValueError(f"growth must be at least 1, not {growth!r}")
        if flat < 0:
            raise ValueError(f"the flat window must be at least 0 s, not {flat!r}")
        self.first, self.slowest, self.growth, self.flat = first, slowest, growth, flat
        self._clock = clock
        self._empty = 0  # empty pulls since the last message, after the flat window
        self._since = clock()
        self._lock = threading.Lock()

    def busy(self) -> None:
        """The node just received or sent a message: ask again soon."""
        with self._lock:
            self._empty = 0
            self._since = self._clock()

    def next_wait(self) -> float:
        """Seconds to wait after one more empty pull."""
        with self._lock:
            if self._clock() - self._since < self.flat:
                return self.first
            wait = min(self.slowest, self.first * self.growth**self._empty)
            self._empty += 1
        return wait


class PacedClock:
    """Stands in for the ``time`` module inside Flower's SuperNode loop.

    Only the loop's two fixed sleeps change: the idle sleep becomes ``pace``'s wait, the reply
    check ``reply_check`` s; every other sleep and every other ``time`` function is the real one.
    """

    def __init__(self, pace: Pace, reply_check: float = REPLY_CHECK_S) -> None:
        self.pace = pace
        self.reply_check = reply_check

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_S:
            seconds = self.pace.next_wait()
        elif seconds == FLOWER_REPLY_CHECK_S:
            seconds = min(seconds, self.reply_check)
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install(loop: ModuleType, pace: Pace, reply_check: float = REPLY_CHECK_S) -> bool:
    """Pace ``loop`` (Flower's ``start_client_internal`` module); whether it could be done."""
    pull, push = getattr(loop, _PULL, None), getattr(loop, _PUSH, None)
    if getattr(loop, "time", None) is not time or not callable(pull) or not callable(push):
        logger.warning(
            "this Flower release's SuperNode loop is not the one edufl paces (flwr 1.41); "
            "the node asks for messages at Flower's own pace (every %g s when idle)",
            FLOWER_IDLE_S,
        )
        return False
    setattr(loop, _PULL, _after(pull, pace, lambda run_id: run_id is not None))
    object_pulls.install(loop)  # a message pulled that soon may still be uploading its arrays
    setattr(loop, _PUSH, _after(push, pace, lambda _result: True))
    loop.time = PacedClock(pace, reply_check)  # type: ignore[attr-defined]
    return True


def _after(
    fn: Callable[..., Any], pace: Pace, was_busy: Callable[[Any], bool]
) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        if was_busy(result):
            pace.busy()
        return result

    return wrapper


def _log_own_lines() -> None:
    """This module's lines to stderr. Not through the root logger: Flower's lines propagate
    there, so a root handler would print each a second time, and its debug lines too (one for
    every Runtime API request)."""
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(log_times.formatter())
        logger.addHandler(handler)
    logger.propagate = False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client.node.pacing", description=__doc__)
    parser.add_argument(
        "--pull-interval",
        type=float,
        default=PULL_INTERVAL_S,
        help=f"seconds before the first pull after a message (Flower: {FLOWER_IDLE_S:g})",
    )
    parser.add_argument("supernode", nargs=argparse.REMAINDER, help="-- flower-supernode ARGS")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run Flower's ``flower-supernode`` with the paced loop; exits as it does."""
    args = _parser().parse_args(argv)
    command = args.supernode[1:] if args.supernode[:1] == ["--"] else args.supernode
    if not command:
        raise SystemExit("give the flower-supernode command line after --")
    try:
        pace = Pace(args.pull_interval)
    except ValueError as exc:
        raise SystemExit(f"--pull-interval: {exc}") from None

    exit_unless_pinned_flower()  # the loop patched here is Flower 1.41.0's
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_client, start_client_internal
    from flwr.supernode.cli import flower_supernode

    _log_own_lines()
    log_times.time_flower_lines()  # EDUFL_NODE_LOG_TIMES=1: the SuperNode's lines timed
    install(start_client_internal, pace)
    heartbeats.install(fleet_http_client, heartbeat)  # a loaded SuperLink answers late
    sys.argv = ["flower-supernode", *command[1:]]  # command[0] is the flower-supernode path
    flower_supernode()


if __name__ == "__main__":
    main()
