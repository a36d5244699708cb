"""The round loop: Flower's ``Strategy.start`` with a first round and per-node results.

``Strategy.start`` always numbers rounds from 1 and hands the caller only aggregated metrics.
A resumed run must continue at round ``k + 1`` (FedAdam's bias correction and the nodes' seeds
depend on the round number), and the run log needs each institution's metrics, so this loop
calls the strategy's own four steps (``configure_train``, ``aggregate_train``,
``configure_evaluate``, ``aggregate_evaluate``) exactly as ``start`` does, with both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from server.averaging import TailAverage
from server.guard import GuardedStrategy, Rejection
from server.superlink.retry import exchange
from shared_models.protocol import RISK_HIST_NEG, RISK_HIST_POS, read_reply

logger = logging.getLogger(__name__)

ConfigValues = Mapping[str, bool | int | float | str]


@dataclass(frozen=True)
class NodeResult:
    """Aggregate metrics one node reported in one phase of a round."""

    node_id: int
    institution: str
    metrics: dict[str, Any]  # numbers; under DP also its releases' lists (the histograms)
    error: str = ""  # why the node failed (an error reply, or no reply in time)
    privacy: str = ""  # the node's signed DP ledger entry (encode_entry's text), if it sent one
    privacy_earlier: str = ""  # the run's earlier entries of its chain (encode_entries' text)


@dataclass(frozen=True)
class RoundReport:
    """What happened in one round (handed to the caller's ``on_round``)."""

    server_round: int
    seconds: float
    #: The model the round releases: what the nodes evaluated and the checkpoint holds; the
    #: mean of the iterates once tail averaging has begun (`server.averaging`).
    arrays: ArrayRecord
    train: dict[str, Any]  # aggregated train metrics (empty if nothing was aggregated)
    evaluate: dict[str, Any]  # aggregated evaluation metrics on the nodes' test splits
    train_nodes: list[NodeResult] = field(default_factory=list)
    evaluate_nodes: list[NodeResult] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    failures: list[NodeResult] = field(default_factory=list)  # error or missing replies
    #: Whether the nodes were asked for a federated evaluation this round (under DP, by
    #: default the last round only); False leaves ``evaluate`` empty, not stale.
    evaluated: bool = True
    #: The aggregated global model the next round trains from; None: ``arrays`` itself.
    iterate: ArrayRecord | None = None


def run_rounds(
    strategy: GuardedStrategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    last_round: int,
    train_config: ConfigValues,
    evaluate_config: ConfigValues,
    timeout: float,
    on_round: Callable[[RoundReport], None],
    evaluate_round: Callable[[int], bool] | None = None,
    average: TailAverage | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round..last_round``; ``on_round`` runs after each (e.g. to checkpoint).

    ``evaluate_round`` says after which rounds the nodes are asked for a federated evaluation
    (`FederationConfig.evaluates`); None: after every round. ``average``: the released model
    is its mean of the last rounds' global models (evaluated and reported as ``arrays``),
    while training goes on from the aggregated model (``iterate``); None releases that.

    Returns:
        The model the last round released.
    """
    released = arrays
    for server_round in range(first_round, last_round + 1):
        started = time.monotonic()
        logger.info("round %d/%d: training", server_round, last_round)
        messages = list(
            strategy.configure_train(server_round, arrays, ConfigRecord(dict(train_config)), grid)
        )
        replies = exchange(grid, messages, timeout)
        train_nodes, failures = _node_results(messages, replies, strategy.institution)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        released = arrays if average is None else average.update(server_round, arrays)
        rejected = list(strategy.rejections)

        evaluated = evaluate_round is None or evaluate_round(server_round)
        evaluate_nodes: list[NodeResult] = []
        eval_failures: list[NodeResult] = []
        evaluate_metrics = None
        if evaluated:
            logger.info("round %d/%d: evaluating", server_round, last_round)
            messages = list(
                strategy.configure_evaluate(
                    server_round, released, ConfigRecord(dict(evaluate_config)), grid
                )
            )
            replies = exchange(grid, messages, timeout)
            evaluate_nodes, eval_failures = _node_results(messages, replies, strategy.institution)
            evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
            rejected += strategy.rejections[len(rejected) :]
        else:
            logger.info("round %d/%d: no federated evaluation planned", server_round, last_round)

        on_round(
            RoundReport(
                server_round=server_round,
                seconds=time.monotonic() - started,
                arrays=released,
                train=dict(train_metrics or {}),
                evaluate=dict(evaluate_metrics or {}),
                train_nodes=train_nodes,
                evaluate_nodes=evaluate_nodes,
                rejected=rejected,
                failures=failures + eval_failures,
                evaluated=evaluated,
                iterate=None if released is arrays else arrays,
            )
        )
    return released


def _histograms(msg: Message) -> dict[str, list[float]]:
    """A DP evaluate reply's noised histograms (`read_reply` reads numbers only)."""
    found: dict[str, list[float]] = {}
    for record in msg.content.metric_records.values():
        for key in (RISK_HIST_POS, RISK_HIST_NEG):
            value = record.get(key)
            if isinstance(value, list) and all(isinstance(v, int | float) for v in value):
                found[key] = [float(v) for v in value]
    return found


def _node_results(
    sent: Iterable[Message], replies: list[Message], institution: Callable[[Message], str]
) -> tuple[list[NodeResult], list[NodeResult]]:
    """Per-node metrics of the replies, and the nodes that failed or did not reply.

    ``institution`` names a reply's sender: in a deployment by its enrolled key, never by the
    name the reply carries (`GuardedStrategy.institution`).
    """
    results, failures = [], []
    answered = set()
    for msg in replies:
        node_id = int(msg.metadata.src_node_id)
        answered.add(node_id)
        if msg.has_error():
            failures.append(NodeResult(node_id, institution(msg), {}, msg.error.reason))
            logger.warning("node %d replied with an error: %s", node_id, msg.error.reason)
            continue
        received = read_reply(msg.content.metric_records, msg.content.config_records)
        results.append(
            NodeResult(
                node_id,
                institution(msg),
                received.metrics | _histograms(msg),
                privacy=received.ledger_entry,
                privacy_earlier=received.ledger_earlier,
            )
        )
    for msg in sent:
        node_id = int(msg.metadata.dst_node_id)
        if node_id not in answered:
            failures.append(NodeResult(node_id, "", {}, "no reply in time"))
            logger.warning("node %d did not reply in time", node_id)
    return sorted(results, key=lambda r: r.institution or str(r.node_id)), failures
