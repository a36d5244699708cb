"""Timestamps on every line of a node's log, for timing a round: ``EDUFL_NODE_LOG_TIMES=1``.

A node's log (``HOME/logs/supernode.log``) holds the SuperNode's Flower lines, the warm
executor's and each task's; by default none carries a time, as Flower's do not. With
``EDUFL_NODE_LOG_TIMES=1`` in the node's environment (``EDUFL_NODE_LOG_TIMES=1 edufl client
start ...``) every one of them starts with the wall-clock time to the millisecond, so one round
can be followed from the SuperNode's pull to the reply's push and set beside the SuperLink's
log (``bench/bench_deploy.py --log-times`` does). It changes nothing else; Flower's own
``FLWR_LOG_LEVEL=DEBUG`` adds times too, with every debug line.
"""

from __future__ import annotations

import logging
import os

#: The environment variable that turns the timestamps on ("1"; anything else: off).
ENV = "EDUFL_NODE_LOG_TIMES"
#: edufl's own lines in a node's log, with and without the time.
PLAIN_FORMAT = "%(levelname)-8s:      %(message)s"
TIMED_FORMAT = "%(levelname)-8s %(asctime)s.%(msecs)03d:      %(message)s"
DATE_FORMAT = "%H:%M:%S"


def enabled() -> bool:
    """Whether this process was asked for timestamped log lines."""
    return os.environ.get(ENV, "") == "1"


def line_format() -> str:
    """The format of edufl's own lines in a node's log (timed when `enabled`)."""
    return TIMED_FORMAT if enabled() else PLAIN_FORMAT


def formatter() -> logging.Formatter:
    """A formatter for `line_format`."""
    return logging.Formatter(line_format(), DATE_FORMAT)


def time_flower_lines() -> None:
    """Timestamps on Flower's console lines in this process (and the children it forks) when
    `enabled`; its level and colours stay as they are."""
    if not enabled():
        return
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True)
