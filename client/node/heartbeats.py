"""The SuperNode's heartbeat, waiting longer for a loaded SuperLink's answer.

Flower 1.41's SuperNode tells the SuperLink it is alive every 17.5-22.5 s
(``(HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT) x 0.7-0.9``), and gives up on each
heartbeat after ``HEARTBEAT_CALL_TIMEOUT`` (5 s), retrying after a jittered 1, 2, 4 ... s. The
SuperLink declares a node gone after 2 x 30 s without a heartbeat it has read, and the server
counts that node's round as failed, even when the node trained and replied.

A SuperLink under load answers later than 5 s. In the 50-node load test (``bench/load_test.py``:
50 nodes training on the SuperLink's 2 cores) 1,373 of 2,471 heartbeats reached Flower's route
after the node had given up on them (logged as ``ClientDisconnect``: a request whose caller left
is not read, so it does not count), and the SuperLink declared up to half of the nodes gone in
a round. Every heartbeat given up is also sent again, so the late ones add to the load that made
them late.

``install`` makes the node wait ``CALL_TIMEOUT_S`` (15 s) for each heartbeat's answer. Flower's
sender keeps its own rule that the wait fits in the interval: the next heartbeat follows the
last answer by ``(30 - 15) x 0.7-0.9`` = 10.5-13.5 s, so between two of the SuperLink's checks
(60 s) a node makes three or more tries, each of which counts if the SuperLink reads it within
15 s, instead of four or five that count only within 5 s. Nothing changes in how soon a dead
node is declared gone: that is the SuperLink's 60 s, as before. The node's other calls wait
Flower's 30 s as before.
"""

from __future__ import annotations

import logging
from types import ModuleType

from client.node import flower_surface

#: `client.node.pacing`'s logger: the one the paced SuperNode prints (`pacing._log_own_lines`).
logger = logging.getLogger("edufl.supernode_pace")

#: Seconds the node waits for the SuperLink's answer to a heartbeat (Flower: 5 s).
CALL_TIMEOUT_S = 15.0
#: Flower's interval between heartbeats (s); the wait must stay well inside it.
FLOWER_INTERVAL_S = 30.0
_NAME = flower_surface.HEARTBEAT_CALL_TIMEOUT.attr


def install(*modules: ModuleType, timeout: float = CALL_TIMEOUT_S) -> bool:
    """Set ``HEARTBEAT_CALL_TIMEOUT`` to ``timeout`` in each of ``modules`` (Flower's Fleet HTTP
    client, which reads it for each heartbeat call, and its heartbeat sender, which spaces the
    heartbeats by it); whether it could be done in all of them (nothing is changed otherwise)."""
    if not 0 < timeout <= FLOWER_INTERVAL_S / 2:
        raise ValueError(f"the heartbeat timeout must be in (0, {FLOWER_INTERVAL_S / 2:g}] s")
    if not all(isinstance(getattr(module, _NAME, None), (int, float)) for module in modules):
        logger.warning(
            "this Flower release's SuperNode has no %s where edufl sets it (flwr 1.41); "
            "heartbeats wait Flower's own time for the SuperLink's answer",
            _NAME,
        )
        return False
    for module in modules:
        setattr(module, _NAME, timeout)
    return True
