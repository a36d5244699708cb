"""One federated run on a Flower ``Grid``: the ServerApp's work, independent of how it is started.

It builds the global model from the data contract (seeded weights, or a public prior's with
``init_from``), picks and guards the strategy, restores the last checkpoint when resuming, runs
the remaining rounds and, after every round, commits a checkpoint and the round's
per-institution metrics to the run directory; at the end it writes ``summary.md`` and
``rounds.png`` there.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid
from torch import nn

from server.averaging import TailAverage
from server.checkpoints import Checkpoint, CheckpointError, CheckpointStore
from server.config import FederationConfig, FederationConfigError
from server.guard import GuardedStrategy
from server.release import (
    LedgerRef,
    is_dp_evaluate,
    is_dp_train,
    released_evaluation,
    released_train,
)
from server.report import write_report
from server.rounds import NodeResult, RoundReport, run_rounds
from server.strategies import build_strategy, restore_strategy_state, strategy_state
from shared_models.data.contract import FeatureSpec, load_spec
from shared_models.errors import EduflError
from shared_models.models.prior import PriorError, apply_prior, read_prior
from shared_models.models.registry import build_model
from shared_models.models.weights import assign_weights, named_weights
from shared_models.protocol import (
    LOSS,
    NOISE_COUNT_STD,
    NOISE_HIST_STD,
    NUM_EXAMPLES,
    RISK_ROC_AUC,
    TRAIN_LOSS,
    VAL_RISK_ROC_AUC,
)
from shared_models.training import set_seed

logger = logging.getLogger(__name__)

#: Compared between a checkpoint and the config that resumes it; any difference is refused
#: (the seed fixes every node's train/test split: changing it mid-run would leak test records).
_RESUME_KEYS = ("model", "model_overrides", "task", "strategy", "seed", "spec_fingerprint")


class FederationError(EduflError, RuntimeError):
    """A federation that cannot go on (every node failed in a round)."""


@dataclass(frozen=True)
class FederationResult:
    """Where a run ended."""

    first_round: int  # the first round this invocation ran (> last_round if none was left)
    last_round: int
    #: Aggregated test metrics after the last round run here; under DP computed from the
    #: nodes' noised histograms (``noised``), their figures with noise and ledger in ``released``.
    evaluate: dict[str, Any]
    noised: bool = False
    released: dict[str, Any] = field(default_factory=dict)  # `server.release` figures (DP)


def run_federation(
    grid: Grid,
    config: FederationConfig,
    *,
    on_round: Callable[[RoundReport], None] | None = None,
    deliver: bool = False,
) -> FederationResult:
    """Run (or resume) the federation ``config`` describes on ``grid``.

    Args:
        grid: Flower's grid of connected nodes.
        config: the validated federation config.
        on_round: called after each committed round; logs a progress line by default.
        deliver: after the last round, send the final model to every node to adopt
            (`server.delivery`; a deployment's nodes, which have homes of their own).

    Raises:
        CheckpointError: the run directory holds another run's checkpoints, or holds checkpoints
            and ``config.resume`` is false.
        FederationError: every node failed in a round (the round is not committed).
    """
    spec = load_spec(config.spec_path)
    model = _seeded_model(config, spec)
    store = CheckpointStore(config.out_dir)
    strategy = GuardedStrategy(
        build_strategy(
            config.strategy,
            fraction_train=config.fraction_train,
            fraction_evaluate=config.fraction_evaluate,
            min_nodes=config.min_nodes,
            proximal_mu=config.proximal_mu,
            params=config.strategy_params,
        ),
        config.guard,
    )
    # Without averaging, a first round past the last: a resumed run still trains on from an
    # iterate its checkpoint kept, and releases that.
    average = TailAverage(
        config.first_averaged_round if config.average_rounds > 0 else config.rounds + 1
    )
    first_round, iterate = _restore(store, config, spec, model, strategy, average)
    if first_round > config.rounds:
        logger.warning(
            "all %d rounds of %s are done; nothing to run", config.rounds, config.out_dir
        )
        return FederationResult(first_round, config.rounds, {})
    run_id = _run_id(store, first_round)
    manifest = {
        **_identity(config, spec),
        # The public prior the run started from (path, weights SHA-256), or None: seeded.
        "init_from": _started_from(store, config, spec, model, first_round),
        "rounds_planned": config.rounds,
        "run_id": run_id,
        "dp_epsilon": config.dp_epsilon,  # None: the server asked for no DP (nodes may still)
    }
    final: dict[str, Any] = {}
    final_record: dict[str, Any] = {}

    ledger = _consortium_ledger(config)

    def commit(report: RoundReport) -> None:
        nonlocal final, final_record
        if report.failures and not report.train_nodes:
            # Nothing was trained: stop before committing a round that did not happen.
            reason = report.failures[0].error.strip().splitlines() or ["unknown"]
            raise FederationError(
                f"round {report.server_round}: every node failed; node "
                f"{report.failures[0].node_id}: {reason[-1]}"
            )
        assign_weights(model, {k: v.numpy() for k, v in report.arrays.items()})  # released
        _record_privacy(ledger, report, dp_requested=config.privacy_budget is not None)
        record = round_record(
            report,
            config.strategy,
            ledger_entries=ledger.entries(),
            run_id=run_id,
            dp_requested=config.privacy_budget is not None,
        )
        store.save(
            report.server_round,
            model,
            {
                **manifest,
                # Under DP the released figures only, as in metrics.jsonl (`server.release`).
                "train": record["train"],
                "evaluate": record["evaluate"],
                "update_digests": strategy.seen,  # replays stay detectable after a restart
                # The checkpoint's model is the mean of these rounds' global models (None:
                # this round's own), `server.averaging`.
                "averaged_rounds": (
                    [average.first, report.server_round] if report.iterate is not None else None
                ),
            },
            state=strategy_state(strategy.inner)
            | (average.state(report.iterate) if report.iterate is not None else {}),
            metrics_record=record,
        )
        final, final_record = report.evaluate, record
        if on_round is not None:
            on_round(report)
        else:
            logger.info(progress_line(report, config.rounds))

    if iterate is None:
        iterate = ArrayRecord({k: Array(v) for k, v in named_weights(model).items()})
    train_config = config.train_config(spec.fingerprint, run_id)
    run_rounds(
        strategy,
        grid,
        iterate,
        first_round=first_round,
        last_round=config.rounds,
        train_config=train_config,
        evaluate_config=train_config,
        timeout=config.round_timeout,
        on_round=commit,
        evaluate_round=config.evaluates,
        average=average,
    )
    write_report(config.out_dir)
    if deliver:
        from server.delivery import deliver_final_model

        deliver_final_model(
            grid,
            config.out_dir,
            spec,
            institution=strategy.institution,
            timeout=config.round_timeout,
        )
    noised = final_record.get("release") == "dp"
    return FederationResult(
        first_round,
        config.rounds,
        final,
        noised=noised,
        released=final_record.get("evaluate", {}) if noised else {},
    )


def _run_id(store: CheckpointStore, first_round: int) -> str:
    """The run's own id: kept in every checkpoint, so a resumed run (a new Flower run) keeps it."""
    last = store.latest()
    if first_round > 1 and last is not None and last.manifest.get("run_id"):
        return str(last.manifest["run_id"])
    return uuid.uuid4().hex


def _consortium_ledger(config: FederationConfig) -> Any:
    """The run's ``ledger.jsonl``: every institution's signed DP (or explicitly non-DP) rounds.

    Kept whether or not the server asks for DP: in a deployment each institution's node decides
    (DP is its default), and a round it trains without DP is recorded too.
    """
    from privacy.ledger.consortium import ConsortiumLedger

    return ConsortiumLedger(config.out_dir / "ledger.jsonl")


def _record_privacy(ledger: Any, report: RoundReport, *, dp_requested: bool) -> None:
    """Append each node's signed entries (training and evaluation releases); a refused one is
    logged, never silently kept."""
    from privacy.ledger.entries import LedgerError

    for phase, results in (("train", report.train_nodes), ("evaluate", report.evaluate_nodes)):
        for result in results:
            if not result.privacy:
                if dp_requested and phase == "train":
                    logger.warning(
                        "round %d: %s sent no privacy ledger entry in a DP run",
                        report.server_round,
                        result.institution or result.node_id,
                    )
                continue
            try:
                ledger.receive_text(result.privacy, earlier=result.privacy_earlier)
            except LedgerError as exc:
                logger.error("round %d: %s", report.server_round, exc)


def _decoded(result: NodeResult) -> dict[str, Any] | None:
    """The node's signed entry of the round, or None (none sent, or not valid JSON)."""
    from privacy.ledger.consortium import decode_entry
    from privacy.ledger.entries import LedgerError

    if not result.privacy:
        return None
    try:
        return decode_entry(result.privacy)
    except LedgerError:
        return None


def node_epsilons(report: RoundReport) -> dict[str, float]:
    """Epsilon each institution reported spent after the round, all its releases counted.

    The latest entry (highest ``seq``) of each institution, training or evaluation, holds its
    cumulative epsilon; DP runs only.
    """
    latest: dict[str, tuple[int, float]] = {}
    for result in [*report.train_nodes, *report.evaluate_nodes]:
        entry = _decoded(result)
        if entry is None:
            continue
        name = result.institution or str(result.node_id)
        epsilon = entry.get("epsilon_after", math.nan)
        # None: the institution trained this round without DP, its epsilon is unbounded.
        spent = math.inf if epsilon is None else float(epsilon)
        seq = entry.get("seq", -1)
        seq = seq if isinstance(seq, int) else -1
        if name not in latest or seq >= latest[name][0]:
            latest[name] = (seq, spent)
    return {name: spent for name, (_, spent) in latest.items()}


def global_model(config: FederationConfig, spec: FeatureSpec) -> nn.Module:
    """The federation's initial model for the contract's shapes.

    Its weights are seeded (``config.seed``), or the public prior's when ``config.init_from``
    names one (`load_prior`).

    Raises:
        FederationConfigError: the prior is missing, damaged or does not fit the run.
    """
    model = _seeded_model(config, spec)
    if config.init_from is not None:
        load_prior(config, spec, model)
    return model


def load_prior(
    config: FederationConfig, spec: FeatureSpec, model: nn.Module, *, quiet: bool = False
) -> dict[str, Any]:
    """Check the prior ``config.init_from`` names and copy its weights into ``model``.

    Checked: the same model name, the same contract (when the prior records one), the same
    weight names and shapes, finite weights, and the checksum its card or manifest names.
    Differences that do not stop it (another task, other input normalisation) are logged,
    unless ``quiet``.

    Returns:
        What the run records about its start: path, kind, weights file and their SHA-256.

    Raises:
        FederationConfigError: the prior does not pass a check; the message names the path,
            what differs and how to fix it.
    """
    assert config.init_from is not None
    try:
        prior = read_prior(config.init_from)
        notes = apply_prior(
            prior,
            model,
            name=config.model,
            overrides=config.model_overrides,
            task=config.task,
            spec=spec,
        )
    except PriorError as exc:
        raise FederationConfigError(f"--init-from {exc}") from None
    if quiet:
        return prior.record()
    for note in notes:
        logger.warning("--init-from %s", note)
    logger.info(
        "initial weights from the prior %s (weights SHA-256 %s)",
        config.init_from,
        prior.weights_sha256,
    )
    return prior.record()


def _seeded_model(config: FederationConfig, spec: FeatureSpec) -> nn.Module:
    set_seed(config.seed)
    return build_model(
        config.model,
        spec.weeks,
        len(spec.dynamic_names),
        len(spec.static_names),
        config.model_overrides,
    )


def _started_from(
    store: CheckpointStore,
    config: FederationConfig,
    spec: FeatureSpec,
    model: nn.Module,
    first_round: int,
) -> dict[str, Any] | None:
    """The prior the run starts from: applied to ``model`` on a fresh start, else the one its
    checkpoints recorded (a resumed run goes on from its checkpoint: never re-applied)."""
    last = store.latest() if first_round > 1 else None
    if last is None:
        return None if config.init_from is None else load_prior(config, spec, model)
    recorded = last.manifest.get("init_from")
    recorded = recorded if isinstance(recorded, dict) else None
    if config.init_from is not None:
        logger.warning(
            "--init-from %s is not applied: %s resumes from its round-%d checkpoint, which "
            "started from %s",
            config.init_from,
            store.run_dir,
            last.round,
            recorded.get("path") if recorded else "seeded weights",
        )
    return recorded


def _identity(config: FederationConfig, spec: FeatureSpec) -> dict[str, Any]:
    return {
        "model": config.model,
        "model_overrides": config.model_overrides,
        "task": config.task,
        "strategy": config.strategy,
        "strategy_params": config.strategy_params,
        "seed": config.seed,
        "spec_fingerprint": spec.fingerprint,
        "spec": f"{spec.name} {spec.version}",
    }


def check_out_dir(config: FederationConfig) -> None:
    """Refuse a start that could not go on, before anything runs (a simulation's Ray).

    That is a new run over another run's checkpoints (resuming is explicit), or a new run
    whose prior (``config.init_from``) does not fit it; a resumed run goes on from its
    checkpoint, and its prior is not read.

    Raises:
        CheckpointError: ``config.out_dir`` holds checkpoints and ``config.resume`` is false.
        FederationConfigError: the prior does not fit the run (`load_prior`).
    """
    check_prior(config, _refuse_another_run(config))


def check_prior(config: FederationConfig, last: Checkpoint | None = None) -> None:
    """Check that ``config.init_from`` fits the run, unless ``last`` is the checkpoint that a
    resumed run goes on from (its prior is not read then).

    Raises:
        FederationConfigError: the prior does not fit the run (`load_prior`).
    """
    if config.init_from is None or (last is not None and config.resume):
        return
    spec = load_spec(config.spec_path)
    load_prior(config, spec, _seeded_model(config, spec), quiet=True)  # the run logs its notes


def _refuse_another_run(config: FederationConfig) -> Checkpoint | None:
    last = CheckpointStore(config.out_dir).latest()
    if last is not None and not config.resume:
        raise CheckpointError(
            f"{config.out_dir} already holds checkpoints up to round {last.round}; "
            "resume that run (--resume) or choose another output directory"
        )
    return last


def _restore(
    store: CheckpointStore,
    config: FederationConfig,
    spec: FeatureSpec,
    model: nn.Module,
    strategy: GuardedStrategy,
    average: TailAverage,
) -> tuple[int, ArrayRecord | None]:
    """Load the last checkpoint into ``model``/``strategy``/``average`` when resuming.

    Returns:
        The next round, and the global model it trains from when that is not ``model``'s
        (the checkpoint holds a mean of iterates, `server.averaging`); None on a new run.
    """
    _refuse_another_run(config)
    last = store.latest()
    if last is None:
        if config.resume:
            logger.warning("no checkpoint in %s to resume from; starting at round 1", store.run_dir)
        store.trim_metrics(0)
        return 1, None
    expected = _identity(config, spec)
    differs = [k for k in _RESUME_KEYS if last.manifest.get(k) != expected[k]]
    if differs:
        detail = ", ".join(f"{k}: {last.manifest.get(k)!r} != {expected[k]!r}" for k in differs)
        raise CheckpointError(
            f"cannot resume {store.run_dir}: its checkpoints belong to a different run ({detail})"
        )
    state = store.load(last, model)
    restore_strategy_state(
        strategy.inner, {k: v for k, v in state.items() if not TailAverage.is_state(k)}
    )
    released = ArrayRecord({k: Array(v) for k, v in named_weights(model).items()})
    iterate = average.restore(last.round, released, state)
    digests = last.manifest.get("update_digests", {})
    if isinstance(digests, dict):
        strategy.seen = {str(k): int(v) for k, v in digests.items()}
    store.trim_metrics(last.round)
    logger.warning("resuming %s after round %d", store.run_dir, last.round)
    return last.round + 1, iterate


def round_record(
    report: RoundReport,
    strategy: str,
    *,
    ledger_entries: Iterable[Any] = (),
    run_id: str = "",
    dp_requested: bool = False,
) -> dict[str, Any]:
    """The round's line in ``metrics.jsonl``: aggregates and each institution's metrics.

    Exact metrics as the nodes sent them in a run without DP; under DP only released figures
    (`server.release`), each traced to the entries of ``ledger_entries`` (the run's consortium
    ledger after the round) it comes from.
    """
    refs = _LedgerIndex(ledger_entries, run_id)
    epsilons = node_epsilons(report)
    dp = dp_requested or is_dp_round(report)
    rejected_evaluations = {r.node_id for r in report.rejected if r.reason.startswith("evaluation")}
    rejected_updates = {r.node_id for r in report.rejected if not r.reason.startswith("evaluation")}
    train_refs: list[LedgerRef] = []
    evaluate_refs: list[LedgerRef] = []
    nodes: dict[int, dict[str, Any]] = {}
    for phase, results in (("train", report.train_nodes), ("evaluate", report.evaluate_nodes)):
        for result in results:
            entry = nodes.setdefault(
                result.node_id, {"node_id": result.node_id, "institution": result.institution}
            )
            entry["institution"] = entry["institution"] or result.institution
            who = result.institution or f"node {result.node_id}"
            if phase == "train" and is_dp_train(result.metrics):
                own = refs.counts(result)
                entry[phase] = released_train(result.metrics, own, who=who)
                if result.node_id not in rejected_updates:
                    train_refs += own
            elif phase == "evaluate" and is_dp_evaluate(result.metrics):
                own = refs.release(result)
                entry[phase] = released_evaluation(result.metrics, own, who=who)
                if result.node_id not in rejected_evaluations:
                    evaluate_refs += own
            elif dp and not math.isinf(epsilons.get(result.institution, math.nan)):
                # Exact values in a DP round from a node whose ledger does not say it opted out
                # of DP: not released by any mechanism, so not written.
                logger.warning(
                    "withheld %s's exact %s metrics from the run's outputs: not DP releases",
                    who,
                    phase,
                )
                entry[phase] = {}
            else:
                # No DP, or a node whose signed entry says it trained without DP (named in
                # ``trained_without_dp``): its exact metrics, as in a run without DP.
                entry[phase] = result.metrics
    for entry in nodes.values():
        if entry["institution"] in epsilons:
            epsilon = epsilons[entry["institution"]]
            entry["epsilon"] = None if math.isinf(epsilon) else epsilon  # None: trained w/o DP
    train: dict[str, Any] = report.train
    evaluate: dict[str, Any] = report.evaluate
    all_without_dp = bool(epsilons) and all(math.isinf(e) for e in epsilons.values())
    if is_dp_train(report.train):
        train = released_train(report.train, train_refs)
    elif dp and not all_without_dp and train:
        logger.warning("withheld the round's exact train metrics: not DP releases")
        train = {}
    if is_dp_evaluate(report.evaluate):
        evaluate = released_evaluation(report.evaluate, evaluate_refs)
    elif dp and not all_without_dp and evaluate:
        logger.warning("withheld the round's exact evaluation metrics: not DP releases")
        evaluate = {}
    record: dict[str, Any] = {
        "round": report.server_round,
        "seconds": round(report.seconds, 3),
        "strategy": strategy,
        "release": "dp" if dp else "exact",
        "train": train,
        "evaluate": evaluate,
        "evaluated": report.evaluated,  # False: no evaluation was asked for (not a failure)
        "institutions": sorted(nodes.values(), key=lambda e: e["institution"] or str(e["node_id"])),
        "rejected": [vars(r) for r in report.rejected],
        "failures": [{"node_id": f.node_id, "error": f.error} for f in report.failures],
    }
    bounded = [e for e in epsilons.values() if not math.isinf(e)]
    if bounded:
        record["epsilon_max"] = max(bounded)
    without_dp = sorted(name for name, e in epsilons.items() if math.isinf(e))
    if without_dp:
        record["trained_without_dp"] = without_dp
    return record


def is_dp_round(report: RoundReport) -> bool:
    """Whether a reply of the round holds DP releases or a node's entry says it trained with DP."""
    if is_dp_train(report.train) or is_dp_evaluate(report.evaluate):
        return True
    if any(is_dp_train(r.metrics) for r in report.train_nodes):
        return True
    if any(is_dp_evaluate(r.metrics) for r in report.evaluate_nodes):
        return True
    return any(not math.isinf(e) for e in node_epsilons(report).values())


class _LedgerIndex:
    """The run's ledger entries by institution, to trace a released figure to its entries."""

    def __init__(self, entries: Iterable[Any], run_id: str) -> None:
        self.held: set[LedgerRef] = set()
        self.count_entries: dict[str, list[LedgerRef]] = {}
        for entry in entries:
            if run_id and entry.run_id != run_id:
                continue
            ref = (entry.institution, int(entry.seq))
            self.held.add(ref)
            if getattr(entry, "kind", None) == "count":
                self.count_entries.setdefault(entry.institution, []).append(ref)

    def release(self, result: NodeResult) -> list[LedgerRef]:
        """The reply's own entry, if the consortium ledger holds it."""
        entry = _decoded(result)
        if entry is None:
            return []
        ref = (str(entry.get("institution")), entry.get("seq"))
        if isinstance(ref[1], int) and ref in self.held:
            return [ref]  # type: ignore[list-item]
        logger.warning(
            "%s's release is not in the run's ledger: its figures have no ledger entry",
            result.institution or f"node {result.node_id}",
        )
        return []

    def counts(self, result: NodeResult) -> list[LedgerRef]:
        """The count release(s) of the node's institution in this run (its noised n)."""
        entry = _decoded(result)
        name = str(entry.get("institution")) if entry else result.institution
        found = self.count_entries.get(name, [])
        if not found:
            logger.warning("%s sent a noised count without a count entry in the ledger", name)
        return found


def progress_line(report: RoundReport, total_rounds: int) -> str:
    """One human-readable line per round; under DP, released figures only, marked as noised."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"

    parts = [f"round {report.server_round}/{total_rounds}", f"{report.seconds:6.1f} s"]
    if is_dp_round(report):
        parts.append(f"nodes {len(report.train_nodes)}")
        if is_dp_train(report.train):
            parts.append(
                f"n {report.train.get(NUM_EXAMPLES, math.nan):.0f} "
                f"(noised, std {report.train.get(NOISE_COUNT_STD, math.nan):.1f})"
            )
        if is_dp_evaluate(report.evaluate):
            std = report.evaluate.get(NOISE_HIST_STD, math.nan)
            parts.append(
                f"federated ROC-AUC {fmt(report.evaluate.get(RISK_ROC_AUC))} "
                f"(noised histograms, count std {std:.1f})"
            )
        elif not report.evaluated:  # no figure rather than an earlier round's
            parts.append("not evaluated this round")
        else:
            parts.append("federated ROC-AUC n/a (no evaluation released)")
    else:
        parts += [
            f"train loss {fmt(report.train.get(TRAIN_LOSS))}",
            f"val ROC-AUC {fmt(report.train.get(VAL_RISK_ROC_AUC))}",
            f"test loss {fmt(report.evaluate.get(LOSS))}",
            f"federated ROC-AUC {fmt(report.evaluate.get(RISK_ROC_AUC))}",
        ]
    epsilons = node_epsilons(report)
    bounded = [e for e in epsilons.values() if not math.isinf(e)]
    if bounded:
        parts.append(f"epsilon max {max(bounded):.3f}")
    if len(bounded) < len(epsilons):
        parts.append(f"WITHOUT DP {len(epsilons) - len(bounded)}")
    if report.rejected:
        parts.append(f"rejected {len(report.rejected)}")
    if report.failures:
        parts.append(f"failed {len(report.failures)}")
    return "  ".join(parts)
