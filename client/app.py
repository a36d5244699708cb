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

from client.local import build_local_model, local_evaluate, local_train
from client.release_cache import Release, ReleaseCache, weights_digest
from shared_models.data.contract import FeatureSpec, load_spec
from shared_models.data.node import NodeData, prepare_node_data
from shared_models.errors import DataContractError
from shared_models.models.weights import assign_weights, named_weights
from shared_models.protocol import RoundSettings

logger = logging.getLogger(__name__)

#: Node-config keys (``flower-supernode --node-config 'data-path="..."'``).
DATA_PATH = "data-path"
INSTITUTION = "institution"
SPEC_PATH = "spec-path"
PRIVACY_STATE = "privacy-state"  # this institution's DP state folder (accountant, ledger, key)
PRIVACY_ROOT = "privacy-root"  # else ROOT/<institution> (simulation: <out-dir>/privacy)
PRIVACY_KEY = "privacy-key"  # optional OpenSSH EC key signing the ledger entries
#: The institution's own DP policy. ``edufl client start`` sets ``dp="required"`` (the
#: deployment default: every round trains with DP-SGD, whatever the server asks) unless started
#: with ``--no-dp`` (``dp="off"``: a round the server asks without DP trains without it and is
#: recorded as non-private in the signed ledger). Without the key (simulations) the server's
#: config decides. ``dp-epsilon``/``dp-delta`` are the institution's budget for a run; they
#: override what the server proposes.
DP_MODE = "dp"
DP_MODE_REQUIRED = "required"
DP_MODE_OFF = "off"
DP_EPSILON = "dp-epsilon"
DP_DELTA = "dp-delta"
#: The budget of an institution that requires DP but set none of its own; a server's proposal
#: can lower it, never raise it.
DEFAULT_DP_EPSILON = 8.0
DEFAULT_DP_DELTA = 1e-5

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
    node = _node(context, settings)
    global_weights = _weights(msg)
    budget = privacy_budget(context, settings)
    run_id = settings.run_id or str(msg.metadata.run_id)
    recorded = budget is not None or context.node_config.get(DP_MODE) == DP_MODE_OFF
    cache = ReleaseCache(_privacy_state(context, node)) if recorded else None
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
            msg,
            node,
            len(node.train),
            done.metrics,
            _arrays(done.weights),
            _ledger_record(context, node, done.entry),
        )

    model = build_local_model(settings, node.shapes)
    assign_weights(model, global_weights)
    session = _dp_session(context, settings, node, budget) if budget is not None else None
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
        return _reply(msg, node, len(node.train), metrics, _arrays(weights))
    if session is not None:
        # Commit the spend before the model may leave the node (raises if over budget).
        entry = session.spend_round(run_id, settings.server_round, str(context.node_id))
    else:
        entry = _record_without_dp(context, settings, node, run_id, metrics)
    cache.store(run_id, settings.server_round, digest, Release(weights, metrics, entry))
    privacy = _ledger_record(context, node, entry)
    return _reply(msg, node, len(node.train), metrics, _arrays(weights), privacy)


def _arrays(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(w) for name, w in weights.items()})


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


def privacy_budget(context: Context, settings: RoundSettings) -> Any:
    """The ``privacy.PrivacyBudget`` this round trains under, or None to train without DP.

    The institution's node config wins over the server's proposal: a node that requires DP
    trains with DP-SGD even when the server asks for none, under its own epsilon/delta when set
    (else 8 and 1e-5); a server proposing a smaller epsilon or delta gets it, a larger one not.

    Raises:
        PrivacyConfigError: the node config's DP keys are not valid.
    """
    from privacy.budget import PrivacyBudget, PrivacyConfigError

    mode = context.node_config.get(DP_MODE)
    if mode not in (None, DP_MODE_REQUIRED, DP_MODE_OFF):
        raise PrivacyConfigError(
            f"node config {DP_MODE}={mode!r} is not valid; use {DP_MODE_REQUIRED!r} or "
            f"{DP_MODE_OFF!r}"
        )
    own_epsilon = _node_float(context, DP_EPSILON)
    own_delta = _node_float(context, DP_DELTA)
    if mode == DP_MODE_REQUIRED:
        # The server may ask for more privacy than the institution's budget, never less.
        cap = own_epsilon or DEFAULT_DP_EPSILON
        epsilon = min(cap, settings.dp_epsilon or cap)
        delta = own_delta or min(settings.dp_delta, DEFAULT_DP_DELTA)
    elif settings.dp_epsilon > 0:
        epsilon = own_epsilon or settings.dp_epsilon
        delta = own_delta or settings.dp_delta
    else:
        return None
    try:
        return PrivacyBudget(
            epsilon=epsilon,
            delta=delta,
            max_grad_norm=settings.dp_max_grad_norm,
            accountant=settings.dp_accountant,
        )
    except ValueError as exc:
        raise PrivacyConfigError(f"this node's DP budget is not valid: {exc}") from None


def _node_float(context: Context, key: str) -> float | None:
    from privacy.budget import PrivacyConfigError

    value = context.node_config.get(key)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise PrivacyConfigError(f"node config {key}={value!r} is not a number") from None


def _privacy_state(context: Context, node: NodeData) -> Path:
    from privacy.budget import PrivacyConfigError

    state = context.node_config.get(PRIVACY_STATE)
    root = context.node_config.get(PRIVACY_ROOT)
    if state:
        return Path(str(state))
    if root:
        return Path(str(root)) / node.institution
    raise PrivacyConfigError(
        f"this round trains with DP but this node has no {PRIVACY_STATE!r} in its node "
        f"config; start it with --node-config '{PRIVACY_STATE}=\"/path/to/private/state\"'"
    )


def _signing_key(context: Context) -> Path | None:
    key = context.node_config.get(PRIVACY_KEY)
    return Path(str(key)) if key else None


def _ledger_record(context: Context, node: NodeData, entry: dict[str, Any]) -> ConfigRecord:
    """The reply's privacy record: the round's signed entry and this run's earlier ones.

    The earlier entries let the server's ledger fill a gap, e.g. a round this node trained for
    a server that crashed before committing it and that did not sample the node again.
    """
    from privacy.ledger.consortium import EARLIER_KEY, REPLY_KEY, encode_entries, encode_entry
    from privacy.ledger.entries import LEDGER_FILE, parse_entries

    chain = parse_entries(_privacy_state(context, node) / LEDGER_FILE)
    earlier = [
        e.model_dump() for e in chain if e.run_id == entry["run_id"] and e.seq < entry["seq"]
    ]
    return ConfigRecord({REPLY_KEY: encode_entry(entry), EARLIER_KEY: encode_entries(earlier)})


def _record_without_dp(
    context: Context,
    settings: RoundSettings,
    node: NodeData,
    run_id: str,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """The signed ledger entry of a round this institution explicitly trained without DP."""
    from privacy.ledger.institution import record_non_private_round

    return record_non_private_round(
        _privacy_state(context, node),
        institution=node.institution,
        run_id=run_id,
        server_round=settings.server_round,
        node=str(context.node_id),
        n_students=len(node.train),
        steps=int(metrics.get("train/steps", 0)),
        signing_key=_signing_key(context),
    )


def _dp_session(context: Context, settings: RoundSettings, node: NodeData, budget: Any) -> Any:
    """This institution's `privacy.DPSession` for ``budget`` (state kept across rounds)."""
    from privacy.budget import DPPlan
    from privacy.dp import DPSession

    state_dir = _privacy_state(context, node)
    plan = DPPlan.for_training(
        len(node.train), settings.batch_size, settings.local_epochs, settings.planned_rounds
    )
    return DPSession.open(
        state_dir,
        budget,
        plan,
        institution=node.institution,
        signing_key=_signing_key(context),
    )


@functools.lru_cache(maxsize=8)
def _spec(path: str | None) -> FeatureSpec:
    return load_spec(path)


# One process may serve several virtual nodes in simulation; loading and splitting an export is
# the slowest part of a round, so each process keeps the last few it prepared.
@functools.lru_cache(maxsize=8)
def _node_data(path: str, spec: FeatureSpec, seed: int, institution: str | None) -> NodeData:
    return prepare_node_data(path, spec, seed=seed, institution=institution)
