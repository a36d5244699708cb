"""The Flower ``ClientApp`` every institution runs: ``client.app:app``.

The node reads its own export from its node config (`shared_models.protocol.NodeConfig`),
checks that it holds the contract the server trains with (spec fingerprint), trains or evaluates
locally, and replies with the model's weights, its number of records and aggregate metrics only
(`shared_models.protocol.Reply`). Student records and predictions never leave the node. Errors
are raised: Flower turns them into an error reply that the strategy skips and logs.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local import build_local_model, local_evaluate, local_train
from client.release_cache import Release, ReleaseCache, weights_digest
from privacy.budget import PrivacyBudget, node_budget
from shared_models.data.contract import FeatureSpec, load_spec
from shared_models.data.node import NodeData, prepare_node_data
from shared_models.errors import DataContractError, PrivacyConfigError
from shared_models.models.weights import assign_weights, named_weights
from shared_models.protocol import (
    PRIVACY_STATE,
    SPEC_PATH,
    TRAIN_STEPS,
    NodeConfig,
    Reply,
    RoundSettings,
    encode_reply,
)

logger = logging.getLogger(__name__)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's train split for the configured epochs.

    A round that trains with DP (or explicitly without, under ``dp="off"``) commits its spend
    to the institution's accountant and ledger before the update may leave the node, and keeps
    the released update: a retry of the same round from the same global weights (a server that
    restarted before committing it) gets the same reply again, without a second spend.
    """
    settings = RoundSettings.from_config(_config(msg))
    own = NodeConfig.parse(context.node_config)
    node = _node(own, settings)
    global_weights = _weights(msg)
    budget = _budget(own, settings)
    run_id = settings.run_id or str(msg.metadata.run_id)
    recorded = budget is not None or own.dp == "off"
    cache = ReleaseCache(_privacy_state(own, node)) if recorded else None
    digest = weights_digest(global_weights) if cache is not None else ""
    if cache is not None and (done := cache.lookup(run_id, settings.server_round, digest)):
        logger.warning(
            "round %d of run %s was already trained and released by %s; re-sending that "
            "update (no new privacy spend)",
            settings.server_round,
            run_id,
            node.institution,
        )
        return _reply(
            msg, node, len(node.train), done.metrics, done.weights, _ledger(own, node, done.entry)
        )

    model = build_local_model(settings, node.shapes)
    assign_weights(model, global_weights)
    session = _dp_session(own, settings, node, budget) if budget is not None else None
    try:
        metrics = local_train(
            model,
            node.train,
            settings,
            global_weights,
            validation=node.val,
            privatize=session.make_private if session is not None else None,
        )
    except BaseException:
        if session is not None:
            session.abandon_round()  # nothing spent; the model never leaves the node
        raise
    logger.info(
        "round %d: %s trained on %d records",
        settings.server_round,
        node.institution,
        len(node.train),
    )
    weights = named_weights(model)
    if cache is None:
        return _reply(msg, node, len(node.train), metrics, weights)
    if session is not None:
        # Commit the spend before the model may leave the node (raises if over budget).
        entry = session.spend_round(run_id, settings.server_round, str(context.node_id))
    else:
        entry = _record_without_dp(own, settings, node, run_id, metrics, str(context.node_id))
    cache.store(run_id, settings.server_round, digest, Release(weights, metrics, entry))
    return _reply(msg, node, len(node.train), metrics, weights, _ledger(own, node, entry))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's held-out test split."""
    settings = RoundSettings.from_config(_config(msg))
    node = _node(NodeConfig.parse(context.node_config), settings)
    model = build_local_model(settings, node.shapes)
    assign_weights(model, _weights(msg))
    metrics = local_evaluate(model, node.test, settings)
    return _reply(msg, node, len(node.test), metrics, None)


def _config(msg: Message) -> ConfigRecord:
    records = list(msg.content.config_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one ConfigRecord in the message, got {len(records)}")
    return records[0]


def _weights(msg: Message) -> dict[str, np.ndarray]:
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one ArrayRecord in the message, got {len(records)}")
    return {name: array.numpy() for name, array in records[0].items()}


def _reply(
    msg: Message,
    node: NodeData,
    num_examples: int,
    metrics: dict[str, float],
    weights: dict[str, np.ndarray] | None,
    ledger: tuple[str, str] | None = None,
) -> Message:
    """The reply, laid out by the wire protocol's schema: nothing else leaves the node."""
    entry, earlier = ledger if ledger is not None else (None, "")
    reply = Reply(
        num_examples=num_examples,
        metrics=metrics,
        # The institution's name, not a student's: lets the server name a node in its logs.
        institution=node.institution,
        weights=weights,
        ledger_entry=entry,  # the signed ledger entry: aggregate DP parameters only
        ledger_earlier=earlier,
    )
    content = RecordDict()
    for record in encode_reply(reply):
        if record.kind == "ArrayRecord":
            content[record.name] = ArrayRecord({k: Array(v) for k, v in record.items.items()})
        elif record.kind == "MetricRecord":
            content[record.name] = MetricRecord(record.items)
        else:
            content[record.name] = ConfigRecord(record.items)
    return Message(content, reply_to=msg)


def _node(own: NodeConfig, settings: RoundSettings) -> NodeData:
    data_path = own.export_path()
    spec_path = own.spec_path or None  # the node's own: the server cannot name its files
    spec = _spec(spec_path)
    if settings.spec_fingerprint and settings.spec_fingerprint != spec.fingerprint:
        raise DataContractError(
            f"this node's data contract ({spec.name} {spec.version}, fingerprint "
            f"{spec.short_fingerprint}) differs from the server's (fingerprint "
            f"{settings.spec_fingerprint[:12]}); install the consortium's spec and set "
            f"{SPEC_PATH!r} in the node config"
        )
    return _node_data(str(Path(data_path).resolve()), spec, settings.seed, own.institution)


def privacy_budget(context: Context, settings: RoundSettings) -> PrivacyBudget | None:
    """The budget this round trains under, or None to train without DP.

    `privacy.budget.node_budget` applied to this node's config and the server's proposal.

    Raises:
        PrivacyConfigError: the node config's DP keys are not valid.
    """
    return _budget(NodeConfig.parse(context.node_config), settings)


def _budget(own: NodeConfig, settings: RoundSettings) -> PrivacyBudget | None:
    return node_budget(
        own.dp,
        own.dp_epsilon,
        own.dp_delta,
        proposed_epsilon=settings.dp_epsilon,
        proposed_delta=settings.dp_delta,
        max_grad_norm=settings.dp_max_grad_norm,
        accountant=settings.dp_accountant,
    )


def _privacy_state(own: NodeConfig, node: NodeData) -> Path:
    if own.privacy_state:
        return Path(own.privacy_state)
    if own.privacy_root:
        return Path(own.privacy_root) / node.institution
    raise PrivacyConfigError(
        f"this round trains with DP but this node has no {PRIVACY_STATE!r} in its node "
        f"config; start it with --node-config '{PRIVACY_STATE}=\"/path/to/private/state\"'"
    )


def _signing_key(own: NodeConfig) -> Path | None:
    return Path(own.privacy_key) if own.privacy_key else None


def _ledger(own: NodeConfig, node: NodeData, entry: dict[str, Any]) -> tuple[str, str]:
    """The reply's ledger texts: the round's signed entry and this run's earlier ones.

    The earlier entries let the server's ledger fill a gap, e.g. a round this node trained for
    a server that crashed before committing it and that did not sample the node again.
    """
    from privacy.ledger.consortium import encode_entries, encode_entry
    from privacy.ledger.entries import LEDGER_FILE, parse_entries

    chain = parse_entries(_privacy_state(own, node) / LEDGER_FILE)
    earlier = [
        e.model_dump() for e in chain if e.run_id == entry["run_id"] and e.seq < entry["seq"]
    ]
    return encode_entry(entry), encode_entries(earlier)


def _record_without_dp(
    own: NodeConfig,
    settings: RoundSettings,
    node: NodeData,
    run_id: str,
    metrics: dict[str, float],
    node_id: str,
) -> dict[str, Any]:
    """The signed ledger entry of a round this institution explicitly trained without DP."""
    from privacy.ledger.institution import record_non_private_round

    return record_non_private_round(
        _privacy_state(own, node),
        institution=node.institution,
        run_id=run_id,
        server_round=settings.server_round,
        node=node_id,
        n_students=len(node.train),
        steps=int(metrics.get(TRAIN_STEPS, 0)),
        signing_key=_signing_key(own),
    )


def _dp_session(
    own: NodeConfig, settings: RoundSettings, node: NodeData, budget: PrivacyBudget
) -> Any:
    """This institution's `privacy.DPSession` for ``budget`` (state kept across rounds)."""
    from privacy.budget import DPPlan
    from privacy.dp import DPSession

    plan = DPPlan.for_training(
        len(node.train), settings.batch_size, settings.local_epochs, settings.planned_rounds
    )
    return DPSession.open(
        _privacy_state(own, node),
        budget,
        plan,
        institution=node.institution,
        signing_key=_signing_key(own),
    )


@functools.lru_cache(maxsize=8)
def _spec(path: str | None) -> FeatureSpec:
    return load_spec(path)


# One process may serve several virtual nodes in simulation; loading and splitting an export is
# the slowest part of a round, so each process keeps the last few it prepared.
@functools.lru_cache(maxsize=8)
def _node_data(path: str, spec: FeatureSpec, seed: int, institution: str | None) -> NodeData:
    return prepare_node_data(path, spec, seed=seed, institution=institution)
