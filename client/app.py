"""The Flower ``ClientApp`` every institution runs: ``client.app:app``.

The node reads its own export from its node config (``data-path``; optional ``institution`` and
``spec-path``), checks that it holds the contract the server trains with (spec fingerprint),
trains or evaluates locally, and replies with the model's weights, ``num-examples`` and aggregate
metrics only. Student records and predictions never leave the node. Errors are raised: Flower
turns them into an error reply that the strategy skips and logs.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local import (
    NodeData,
    build_local_model,
    local_evaluate,
    local_train,
    prepare_node_data,
)
from client.settings import RoundSettings
from shared_models.contract import FeatureSpec, load_spec
from shared_models.errors import DataContractError
from shared_models.weights import assign_weights, named_weights

logger = logging.getLogger(__name__)

#: Node-config keys (``flower-supernode --node-config 'data-path="..."'``).
DATA_PATH = "data-path"
INSTITUTION = "institution"
SPEC_PATH = "spec-path"
PRIVACY_STATE = "privacy-state"  # this institution's DP state folder (accountant, ledger, key)
PRIVACY_ROOT = "privacy-root"  # else ROOT/<institution> (simulation: <out-dir>/privacy)
PRIVACY_KEY = "privacy-key"  # optional OpenSSH EC key signing the ledger entries

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's train split for the configured epochs."""
    settings = RoundSettings.from_config(_config(msg))
    node = _node(context, settings)
    model = build_local_model(settings, node.shapes)
    global_weights = _weights(msg)
    assign_weights(model, global_weights)
    session = _dp_session(context, settings, node) if settings.dp_epsilon > 0 else None
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
    privacy = None
    if session is not None:
        from privacy.consortium_ledger import REPLY_KEY, encode_entry

        # Commit the spend before the model may leave the node (raises if over budget).
        entry = session.spend_round(
            str(msg.metadata.run_id), settings.server_round, str(context.node_id)
        )
        privacy = ConfigRecord({REPLY_KEY: encode_entry(entry)})
    logger.info(
        "round %d: %s trained on %d records",
        settings.server_round,
        node.institution,
        len(node.train),
    )
    arrays = ArrayRecord({name: Array(w) for name, w in named_weights(model).items()})
    return _reply(msg, node, len(node.train), metrics, arrays, privacy)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's held-out test split."""
    settings = RoundSettings.from_config(_config(msg))
    node = _node(context, settings)
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
    arrays: ArrayRecord | None,
    privacy: ConfigRecord | None = None,
) -> Message:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays
    content["metrics"] = MetricRecord({"num-examples": num_examples, **metrics})
    # The institution's name, not a student's: lets the server name a node in its logs.
    content["node"] = ConfigRecord({INSTITUTION: node.institution})
    if privacy is not None:  # the signed ledger entry: aggregate DP parameters only
        content["privacy"] = privacy
    return Message(content, reply_to=msg)


def _node(context: Context, settings: RoundSettings) -> NodeData:
    raw_path = context.node_config.get(DATA_PATH)
    if not isinstance(raw_path, str) or not raw_path:
        raise DataContractError(
            f"this node has no {DATA_PATH!r} in its node config; start it with "
            f"--node-config '{DATA_PATH}=\"/path/to/export\"'"
        )
    spec_path = context.node_config.get(SPEC_PATH) or settings.spec_path or None
    spec = _spec(str(spec_path) if spec_path else None)
    if settings.spec_fingerprint and settings.spec_fingerprint != spec.fingerprint:
        raise DataContractError(
            f"this node's data contract ({spec.name} {spec.version}, fingerprint "
            f"{spec.short_fingerprint}) differs from the server's (fingerprint "
            f"{settings.spec_fingerprint[:12]}); install the consortium's spec and set "
            f"{SPEC_PATH!r} in the node config"
        )
    institution = context.node_config.get(INSTITUTION)
    return _node_data(
        str(Path(raw_path).resolve()),
        spec,
        settings.seed,
        str(institution) if institution else None,
    )


def _dp_session(context: Context, settings: RoundSettings, node: NodeData) -> Any:
    """This institution's `privacy.DPSession` for the run's budget (state kept across rounds)."""
    from privacy.budget import DPPlan, PrivacyBudget, PrivacyConfigError
    from privacy.dp import DPSession

    state = context.node_config.get(PRIVACY_STATE)
    root = context.node_config.get(PRIVACY_ROOT)
    if state:
        state_dir = Path(str(state))
    elif root:
        state_dir = Path(str(root)) / node.institution
    else:
        raise PrivacyConfigError(
            f"the server asks for DP training but this node has no {PRIVACY_STATE!r} in its node "
            f"config; start it with --node-config '{PRIVACY_STATE}=\"/path/to/private/state\"'"
        )
    budget = PrivacyBudget(
        epsilon=settings.dp_epsilon,
        delta=settings.dp_delta,
        max_grad_norm=settings.dp_max_grad_norm,
        accountant=settings.dp_accountant,
    )
    plan = DPPlan.for_training(
        len(node.train), settings.batch_size, settings.local_epochs, settings.planned_rounds
    )
    key = context.node_config.get(PRIVACY_KEY)
    return DPSession.open(
        state_dir,
        budget,
        plan,
        institution=node.institution,
        signing_key=Path(str(key)) if key else None,
    )


@functools.lru_cache(maxsize=8)
def _spec(path: str | None) -> FeatureSpec:
    return load_spec(path)


# One process may serve several virtual nodes in simulation; loading and splitting an export is
# the slowest part of a round, so each process keeps the last few it prepared.
@functools.lru_cache(maxsize=8)
def _node_data(path: str, spec: FeatureSpec, seed: int, institution: str | None) -> NodeData:
    return prepare_node_data(path, spec, seed=seed, institution=institution)
