"""The Flower ``ClientApp`` every institution runs: ``client.app:app``.

The node reads its own export from its node config (`shared_models.protocol.NodeConfig`),
checks that it holds the contract the server trains with (spec fingerprint), trains or evaluates
locally, and replies through the wire protocol's schema (`shared_models.protocol.Reply`).
Student records and predictions never leave the node. Errors are raised: Flower turns them into
an error reply that the strategy skips and logs.

What a reply carries depends on whether the round is private:

- under DP (the node's or the server's budget), only released values: the noised update, the
  run's noised student count as ``num-examples`` (released once per run, `privacy.releases`),
  for an evaluation noised risk histograms of the test students instead of metrics, the noise
  levels, and the signed ledger entries of each release. The exact training loss, time, steps,
  validation and test metrics stay on the node (the loss alone told a crafted-weights server
  whether a student trained);
- without DP (no budget, or ``dp="off"``), today's exact aggregate metrics.

A failed task's error reply carries the error's text only for errors that say nothing about a
student (`PUBLIC_ERRORS`: configuration, protocol, budget, contract mismatch, a refused
delivery); any other failure, a data error above all (it may quote a value of the export), is
logged here in full and replaced by its kind (`_public_errors`). Error replies are releases too.

After the last round the server delivers the final global model (a ``query`` message): the node
verifies it and adopts it into its home (`deliver`), and acknowledges with a yes/no and the
model's checksum only.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.local import build_local_model, local_evaluate, local_train, risk_histograms
from client.release_cache import Release, ReleaseCache
from privacy.accountant_store import AccountantStateError
from privacy.budget import PrivacyBudget, node_budget
from shared_models import protocol
from shared_models.data.contract import FeatureSpec, load_spec
from shared_models.data.node import NodeData, clear_cohorts, prepare_node_data
from shared_models.data.stamp import export_stamp, file_stamp
from shared_models.devices import resolve_device
from shared_models.errors import (
    DataContractError,
    EduflError,
    PrivacyBudgetExceeded,
    PrivacyConfigError,
    PublicError,
)
from shared_models.models.weights import assign_weights, named_weights
from shared_models.protocol import (
    DELIVERY_RECORD,
    DEVICE,
    HOME_PATH,
    NOISE_COUNT_STD,
    NOISE_HIST_STD,
    PRIVACY_STATE,
    RISK_HIST_NEG,
    RISK_HIST_POS,
    SPEC_PATH,
    TRAIN_SECONDS,
    TRAIN_STEPS,
    Acknowledgement,
    Delivery,
    NodeConfig,
    ProtocolError,
    Reply,
    RoundSettings,
    encode_acknowledgement,
    encode_reply,
    weights_sha256,
)

logger = logging.getLogger(__name__)

app = ClientApp()
#: Flower's record classes for `shared_models.protocol`'s record walk (see `_public_errors`).
_RECORDS = protocol.RecordTypes(record_dict=RecordDict, array_record=ArrayRecord, array=Array)


class ContractMismatch(DataContractError, PublicError):
    """The node's contract or config does not match the server's: public, names no student."""


class NodeTaskFailed(EduflError, RuntimeError):
    """A task failed for a reason that stays in the node's log (what the server is told)."""


#: Errors whose text may leave the node: they depend on the message, the node's configuration
#: and its budget's public parameters only.
PUBLIC_ERRORS: tuple[type[BaseException], ...] = (
    PublicError,
    ProtocolError,
    PrivacyBudgetExceeded,
    PrivacyConfigError,
    AccountantStateError,
)


def _public_errors(handler: Callable[[Message, Context], Message]) -> Any:
    """Let only `PUBLIC_ERRORS` reach the server with their text; log the others here."""

    @functools.wraps(handler)
    def guarded(msg: Message, context: Context) -> Message:
        if msg.has_content():
            # edufl's node unpacks the weights before this app sees them (`client.node.own_code`);
            # under Flower's own process isolation (`flwr-clientapp`) they arrive packed.
            msg.content = protocol.unpack_records(msg.content, _RECORDS)
        try:
            return handler(msg, context)
        except PUBLIC_ERRORS:
            raise
        except Exception as exc:
            logger.exception("the %s task failed", handler.__name__)
            raise NodeTaskFailed(
                f"the {handler.__name__} task failed at this node ({type(exc).__name__}); the "
                "reason stays in the node's log, which its operator can read"
            ) from None

    return guarded


@app.train()
@_public_errors
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's train split for the configured epochs.

    A round that trains with DP (or explicitly without, under ``dp="off"``) commits its spend
    to the institution's accountant and ledger before the update may leave the node, and keeps
    the released update: a retry of the same round from the same global weights (a server that
    restarted before committing it) gets the same reply again, without a second spend.
    """
    settings = RoundSettings.from_config(_config(msg))
    own = _own(context)
    node = _node(own, settings)
    global_weights = _weights(msg)
    budget = _budget(own, settings)
    run_id = settings.run_id or str(msg.metadata.run_id)
    recorded = budget is not None or own.dp == "off"
    cache = ReleaseCache(_privacy_state(own, node)) if recorded else None
    digest = weights_sha256(global_weights) if cache is not None else ""
    if cache is not None and (done := cache.lookup(run_id, settings.server_round, digest)):
        logger.warning(
            "round %d of run %s was already trained and released by %s; re-sending that "
            "update (no new privacy spend)",
            settings.server_round,
            run_id,
            node.institution,
        )
        sent = len(node.train) if done.num_examples is None else done.num_examples
        ledger = _ledger(own, node, done.entry)
        private = bool(done.entry.get("private"))
        return _reply(msg, node, sent, done.metrics, done.weights, ledger, private=private)
    if budget is not None:
        return _train_private(msg, context, settings, own, node, budget, run_id, digest)

    model = build_local_model(settings, node.shapes, _device(own))
    _assign(model, global_weights)
    metrics = local_train(model, node.train, settings, global_weights, validation=node.val)
    logger.info(
        "round %d: %s trained on %d records in %.3f s",
        settings.server_round,
        node.institution,
        len(node.train),
        metrics[TRAIN_SECONDS],
    )
    weights = named_weights(model)
    if cache is None:
        return _reply(msg, node, len(node.train), metrics, weights)
    entry = _record_without_dp(own, settings, node, run_id, metrics, str(context.node_id))
    cache.store(run_id, settings.server_round, digest, Release(weights, metrics, entry))
    return _reply(msg, node, len(node.train), metrics, weights, _ledger(own, node, entry))


def _train_private(
    msg: Message,
    context: Context,
    settings: RoundSettings,
    own: NodeConfig,
    node: NodeData,
    budget: PrivacyBudget,
    run_id: str,
    digest: str,
) -> Message:
    """A DP-SGD round: count release (once per run), refusal first, then train, spend, reply."""
    count = _count_release(own, settings, node, budget, run_id, str(context.node_id))
    session = _dp_session(own, settings, node, budget, count.n_public)
    global_weights = _weights(msg)
    model = build_local_model(settings, node.shapes, _device(own))
    _assign(model, global_weights)
    try:
        # The exact loss, time and steps local_train returns stay here; none may leave.
        kept = local_train(
            model,
            node.train,
            settings,
            global_weights,
            privatize=functools.partial(session.make_private, student_ids=node.train.student_ids),
        )
    except BaseException:
        session.abandon_round()  # nothing spent; the model never leaves the node
        raise
    weights = named_weights(model)
    # Commit the spend before the model may leave the node (raises if over budget).
    entry = session.spend_round(run_id, settings.server_round, str(context.node_id))
    # In this node's own log only (the deployment benchmark reads it): never in the reply.
    logger.info(
        "round %d: %s trained with DP-SGD in %.3f s (%d steps)",
        settings.server_round,
        node.institution,
        kept[TRAIN_SECONDS],
        int(kept[TRAIN_STEPS]),
    )
    metrics: dict[str, Any] = {NOISE_COUNT_STD: count.noise_std}
    release = Release(weights, metrics, entry, num_examples=count.n_public)
    ReleaseCache(_privacy_state(own, node)).store(run_id, settings.server_round, digest, release)
    ledger = _ledger(own, node, entry)
    return _reply(msg, node, count.n_public, metrics, weights, ledger, private=True)


@app.evaluate()
@_public_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's held-out test split.

    Under DP the answer is the pair of noised risk histograms of the test students (one count
    per student), released and accounted like any other value (`privacy.releases`); a node
    whose budget cannot pay for it declines with an error naming why, and sends nothing exact.
    """
    settings = RoundSettings.from_config(_config(msg))
    own = _own(context)
    node = _node(own, settings)
    weights = _weights(msg)
    model = build_local_model(settings, node.shapes, _device(own))
    _assign(model, weights)
    budget = _budget(own, settings)
    if budget is None:
        metrics = local_evaluate(model, node.test, settings)
        return _reply(msg, node, len(node.test), metrics, None)
    if settings.task == "grade":
        raise PrivacyConfigError(
            "under DP a federated evaluation is answered with noised risk histograms, and the "
            "grade task has no risk head; evaluate centrally or use task 'risk' or 'multitask'"
        )
    run_id = settings.run_id or str(msg.metadata.run_id)
    count = _count_release(own, settings, node, budget, run_id, str(context.node_id))
    session = _dp_session(own, settings, node, budget, count.n_public)
    pos, neg = risk_histograms(model, node.test)
    release = session.release_histogram(
        run_id,
        settings.server_round,
        str(context.node_id),
        [*pos, *neg],
        digest=weights_sha256(weights),
    )
    bins = len(pos)
    metrics: dict[str, Any] = {
        RISK_HIST_POS: list(release.values[:bins]),
        RISK_HIST_NEG: list(release.values[bins:]),
        NOISE_HIST_STD: release.noise_std,
    }
    ledger = _ledger(own, node, release.entry)
    return _reply(msg, node, count.n_public, metrics, None, ledger, private=True)


@app.query()
@_public_errors
def deliver(msg: Message, context: Context) -> Message:
    """Verify the federation's final global model and adopt it into this node's home.

    The server sends it after the last round (`server.delivery`). The checks
    (`client.early_warning.adopt.adopt_delivery`: checksum, this node's contract, its own ledger
    shows it took part in the run, the weights fit the model) fail with an error reply naming
    the check; the previous model stays the latest. A node without a home keeps nothing and
    says so (not adopted).
    """
    from client.early_warning.adopt import DeliveryRefused, adopt_delivery

    own = _own(context)
    delivery = Delivery.from_config(_record(msg, DELIVERY_RECORD))
    weights = _weights(msg)
    data_path = Path(own.export_path())
    institution = own.institution or data_path.resolve().name
    if not own.home_path:
        logger.warning(
            "the server delivered the final model of run %s, but this node has no %r in its "
            "node config: not adopted",
            delivery.settings.run_id,
            HOME_PATH,
        )
        return _acknowledge(msg, Acknowledgement(False, delivery.weights_sha256, institution))
    try:
        adoption = adopt_delivery(
            weights,
            delivery,
            data_path,
            _spec(own.spec_path or None),
            home=Path(own.home_path),
            ledger=_ledger_file(own, institution),
        )
    except DeliveryRefused as exc:
        # Each check reads only the message, this node's spec and its ledger (whose entries
        # the server already holds): the reason says nothing about a student.
        logger.error("%s", exc)
        raise
    except DataContractError as exc:
        # Past the checks, a failure depends on the export: its reason stays on this node.
        logger.error(
            "the final model of run %s passed its checks but: %s", delivery.settings.run_id, exc
        )
        raise DataContractError(
            f"the final model of run {delivery.settings.run_id} passed its checks but could not "
            f"be adopted at {institution} (its node log says why); it keeps its previous model"
        ) from None
    logger.info(
        "adopted the final model of run %s (round %d) into %s",
        delivery.settings.run_id,
        delivery.settings.server_round,
        adoption.model_dir,
    )
    # The acknowledgement is not a DP release and needs none: the checksum is the server's own,
    # and "adopted" follows from the message, this node's spec and ledger, and whether its
    # export (which trained in every round of the run) can be split again; an export whose
    # validation split cannot fit a calibration is adopted uncalibrated, so even the outcomes
    # do not change the answer. No count, metric or calibration figure is sent.
    return _acknowledge(msg, Acknowledgement(True, delivery.weights_sha256, institution))


def _record(msg: Message, name: str) -> ConfigRecord:
    if name not in msg.content.config_records:
        raise ValueError(
            f"expected a ConfigRecord {name!r} in the message; are server and node running "
            "the same edufl version?"
        )
    return msg.content.config_records[name]


def _ledger_file(own: NodeConfig, institution: str) -> Path | None:
    """This node's own ledger (`_privacy_state`'s folder), or None when it keeps none."""
    from privacy.ledger.entries import LEDGER_FILE

    if own.privacy_state:
        return Path(own.privacy_state) / LEDGER_FILE
    if own.privacy_root:
        return Path(own.privacy_root) / institution / LEDGER_FILE
    return None


def _acknowledge(msg: Message, ack: Acknowledgement) -> Message:
    """The acknowledgement, laid out by the wire protocol: nothing else leaves the node."""
    content = RecordDict()
    for record in encode_acknowledgement(ack):
        content[record.name] = ConfigRecord(record.items)
    return Message(content, reply_to=msg)


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
    metrics: dict[str, Any],
    weights: dict[str, np.ndarray] | None,
    ledger: tuple[str, str] | None = None,
    *,
    private: bool = False,
) -> Message:
    """The reply, laid out by the wire protocol's schema: nothing else leaves the node."""
    entry, earlier = ledger if ledger is not None else (None, "")
    reply = Reply(
        private=private,  # the protocol's DP allow-list: released values only
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


def _assign(model: Any, weights: dict[str, np.ndarray]) -> None:
    """Load the server's weights; a mismatch is the server's (its names are public)."""
    try:
        assign_weights(model, weights)
    except ValueError as exc:
        raise ProtocolError(f"the server's weights do not fit this node's model: {exc}") from None


def _own(context: Context) -> NodeConfig:
    """This node's config, its torch threads (``threads``) applied to this process.

    A deployed node handles each message in a process of its own (`client.node.warm_exec`), so
    the setting holds for that message's training, evaluation or adoption; unset, torch keeps
    its own choice.
    """
    own = NodeConfig.parse(context.node_config)
    if own.threads is not None:
        torch.set_num_threads(own.threads)
    return own


def _device(own: NodeConfig) -> Any:
    """Where this node trains and evaluates: its node config's ``device`` (unset: the CPU).

    Resolved here, in the process that computes (CUDA does not survive a fork).
    """
    return resolve_device(own.device or "cpu", option=DEVICE)


def _node(own: NodeConfig, settings: RoundSettings) -> NodeData:
    data_path = own.export_path()
    spec_path = own.spec_path or None  # the node's own: the server cannot name its files
    spec = _spec(spec_path)
    if settings.spec_fingerprint and settings.spec_fingerprint != spec.fingerprint:
        raise ContractMismatch(
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
        max_noise_multiplier=own.dp_max_noise,
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


def _count_release(
    own: NodeConfig,
    settings: RoundSettings,
    node: NodeData,
    budget: PrivacyBudget,
    run_id: str,
    node_id: str,
) -> Any:
    """The run's released student count (`privacy.releases.release_count`), made once per run."""
    from privacy.releases import release_count

    ids = node.train.student_ids
    return release_count(
        _privacy_state(own, node),
        budget,
        institution=node.institution,
        run_id=run_id,
        server_round=settings.server_round,
        node=node_id,
        n_students=len(np.unique(ids)) if len(ids) else len(node.train),
        signing_key=_signing_key(own),
    )


def _dp_session(
    own: NodeConfig, settings: RoundSettings, node: NodeData, budget: PrivacyBudget, n_public: int
) -> Any:
    """This institution's `privacy.DPSession` for ``budget`` (state kept across rounds).

    The plan (sampling rate, steps, delta's check) is built from the released count
    ``n_public``, never the exact one, and pays for the run's planned evaluations too.
    """
    from privacy.budget import DPPlan
    from privacy.dp import DPSession

    plan = DPPlan.for_training(
        n_public,
        settings.batch_size,
        settings.local_epochs,
        settings.planned_rounds,
        planned_evaluations=settings.evaluations,
        n_noised=True,
    )
    return DPSession.open(
        _privacy_state(own, node),
        budget,
        plan,
        institution=node.institution,
        signing_key=_signing_key(own),
    )


def _spec(path: str | None) -> FeatureSpec:
    """The node's spec, parsed again only when its file changed (`file_stamp`)."""
    stamp = file_stamp(Path(path)) if path else ()
    cached = _specs.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    spec = load_spec(path)
    _specs[path] = (stamp, spec)
    return spec


#: The prepared exports, by (path, spec fingerprint, seed, institution): each with the stamp
#: of the files it was read from. A warm node fills it in the executor's parent (`prime`), so
#: each message's forked process finds the export validated and split; a simulation's process
#: keeps the last few it prepared.
_prepared: dict[tuple[str, str, int, str | None], tuple[tuple[Any, ...], NodeData]] = {}
_specs: dict[str | None, tuple[tuple[Any, ...], FeatureSpec]] = {}
_KEEP_PREPARED = 8


def _node_data(path: str, spec: FeatureSpec, seed: int, institution: str | None) -> NodeData:
    """`prepare_node_data` of the export at ``path``, reused while none of its files changed."""
    key = (path, spec.fingerprint, seed, institution)
    stamp = export_stamp(Path(path))
    cached = _prepared.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    node = prepare_node_data(path, spec, seed=seed, institution=institution)
    # The stamp taken before reading: a file changed while it was read is read again next time.
    _prepared.pop(key, None)
    _prepared[key] = (stamp, node)
    while len(_prepared) > _KEEP_PREPARED:
        del _prepared[next(iter(_prepared))]
    return node


def prime(node_config: Mapping[str, Any]) -> bool:
    """Read, validate and split this node's export ahead of its messages (the warm executor).

    Called in `client.node.warm_exec`'s parent before it forks tasks, and again after each
    task (a no-op while the files are unchanged): the round settings' default seed is the
    server's default, and a task for another seed or a changed file prepares its own. A
    failure is left to the task, which reports it in its reply; whether it succeeded.
    """
    try:
        own = NodeConfig.parse(node_config)
        _node(own, RoundSettings())
    except Exception as exc:
        logger.info("the export could not be prepared ahead of a task (%s); tasks will", exc)
        return False
    return True


def clear_caches() -> None:
    """Forget the prepared exports, specs and read cohorts (a warm worker whose files changed)."""
    _prepared.clear()
    _specs.clear()
    clear_cohorts()
