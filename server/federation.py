"""One federated run on a Flower ``Grid``: the ServerApp's work, independent of how it is started.

It builds the global model from the data contract, picks and guards the strategy, restores the
last checkpoint when resuming, runs the remaining rounds and, after every round, commits a
checkpoint and the round's per-institution metrics to the run directory; at the end it writes
``summary.md`` and ``rounds.png`` there.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid
from torch import nn

from server.checkpoints import CheckpointError, CheckpointStore
from server.config import FederationConfig
from server.guard import GuardedStrategy
from server.report import write_report
from server.rounds import RoundReport, run_rounds
from server.strategies import build_strategy, restore_strategy_state, strategy_state
from shared_models.data.contract import FeatureSpec, load_spec
from shared_models.errors import EduflError
from shared_models.models.registry import build_model
from shared_models.models.weights import assign_weights, named_weights
from shared_models.protocol import LOSS, TRAIN_LOSS, metric_key
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
    evaluate: dict[str, float]  # aggregated test metrics after the last round run here


def run_federation(
    grid: Grid,
    config: FederationConfig,
    *,
    on_round: Callable[[RoundReport], None] | None = None,
) -> FederationResult:
    """Run (or resume) the federation ``config`` describes on ``grid``.

    Args:
        grid: Flower's grid of connected nodes.
        config: the validated federation config.
        on_round: called after each committed round; logs a progress line by default.

    Raises:
        CheckpointError: the run directory holds another run's checkpoints, or holds checkpoints
            and ``config.resume`` is false.
        FederationError: every node failed in a round (the round is not committed).
    """
    spec = load_spec(config.spec_path)
    model = global_model(config, spec)
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
    first_round = _restore(store, config, spec, model, strategy)
    if first_round > config.rounds:
        logger.warning(
            "all %d rounds of %s are done; nothing to run", config.rounds, config.out_dir
        )
        return FederationResult(first_round, config.rounds, {})
    run_id = _run_id(store, first_round)
    manifest = {
        **_identity(config, spec),
        "rounds_planned": config.rounds,
        "run_id": run_id,
        "dp_epsilon": config.dp_epsilon,  # None: the server asked for no DP (nodes may still)
    }
    final: dict[str, float] = {}

    ledger = _consortium_ledger(config)

    def commit(report: RoundReport) -> None:
        nonlocal final
        if report.failures and not report.train_nodes:
            # Nothing was trained: stop before committing a round that did not happen.
            reason = report.failures[0].error.strip().splitlines() or ["unknown"]
            raise FederationError(
                f"round {report.server_round}: every node failed; node "
                f"{report.failures[0].node_id}: {reason[-1]}"
            )
        assign_weights(model, {k: v.numpy() for k, v in report.arrays.items()})
        _record_privacy(ledger, report, dp_requested=config.privacy_budget is not None)
        store.save(
            report.server_round,
            model,
            {
                **manifest,
                "train": report.train,
                "evaluate": report.evaluate,
                "update_digests": strategy.seen,  # replays stay detectable after a restart
            },
            state=strategy_state(strategy.inner),
            metrics_record=round_record(report, config.strategy),
        )
        final = report.evaluate
        if on_round is not None:
            on_round(report)
        else:
            logger.info(progress_line(report, config.rounds))

    arrays = ArrayRecord({k: Array(v) for k, v in named_weights(model).items()})
    train_config = config.train_config(spec.fingerprint, run_id)
    run_rounds(
        strategy,
        grid,
        arrays,
        first_round=first_round,
        last_round=config.rounds,
        train_config=train_config,
        evaluate_config=train_config,
        timeout=config.round_timeout,
        on_round=commit,
    )
    write_report(config.out_dir)
    return FederationResult(first_round, config.rounds, final)


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
    """Append each node's signed entry; a refused one is logged, never silently kept."""
    from privacy.ledger.entries import LedgerError

    for result in report.train_nodes:
        if not result.privacy:
            if dp_requested:
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


def node_epsilons(report: RoundReport) -> dict[str, float]:
    """Epsilon each institution reported spent after the round (DP runs only)."""
    from privacy.ledger.consortium import decode_entry
    from privacy.ledger.entries import LedgerError

    spent: dict[str, float] = {}
    for result in report.train_nodes:
        if not result.privacy:
            continue
        try:
            entry = decode_entry(result.privacy)
        except LedgerError:
            continue
        name = result.institution or str(result.node_id)
        epsilon = entry.get("epsilon_after", math.nan)
        # None: the institution trained this round without DP, its epsilon is unbounded.
        spent[name] = math.inf if epsilon is None else float(epsilon)
    return spent


def global_model(config: FederationConfig, spec: FeatureSpec) -> nn.Module:
    """The federation's model for the contract's shapes, with seeded initial weights."""
    set_seed(config.seed)
    return build_model(
        config.model,
        spec.weeks,
        len(spec.dynamic_names),
        len(spec.static_names),
        config.model_overrides,
    )


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
    """Refuse to start a new run over another run's checkpoints (resuming is explicit).

    Raises:
        CheckpointError: ``config.out_dir`` holds checkpoints and ``config.resume`` is false.
    """
    last = CheckpointStore(config.out_dir).latest()
    if last is not None and not config.resume:
        raise CheckpointError(
            f"{config.out_dir} already holds checkpoints up to round {last.round}; "
            "resume that run (--resume) or choose another output directory"
        )


def _restore(
    store: CheckpointStore,
    config: FederationConfig,
    spec: FeatureSpec,
    model: nn.Module,
    strategy: GuardedStrategy,
) -> int:
    """Load the last checkpoint into ``model``/``strategy`` when resuming; the next round."""
    check_out_dir(config)
    last = store.latest()
    if last is None:
        if config.resume:
            logger.warning("no checkpoint in %s to resume from; starting at round 1", store.run_dir)
        store.trim_metrics(0)
        return 1
    expected = _identity(config, spec)
    differs = [k for k in _RESUME_KEYS if last.manifest.get(k) != expected[k]]
    if differs:
        detail = ", ".join(f"{k}: {last.manifest.get(k)!r} != {expected[k]!r}" for k in differs)
        raise CheckpointError(
            f"cannot resume {store.run_dir}: its checkpoints belong to a different run ({detail})"
        )
    restore_strategy_state(strategy.inner, store.load(last, model))
    digests = last.manifest.get("update_digests", {})
    if isinstance(digests, dict):
        strategy.seen = {str(k): int(v) for k, v in digests.items()}
    store.trim_metrics(last.round)
    logger.warning("resuming %s after round %d", store.run_dir, last.round)
    return last.round + 1


def round_record(report: RoundReport, strategy: str) -> dict[str, Any]:
    """The round's line in ``metrics.jsonl``: aggregates and each institution's metrics."""
    nodes: dict[int, dict[str, Any]] = {}
    for phase, results in (("train", report.train_nodes), ("evaluate", report.evaluate_nodes)):
        for result in results:
            entry = nodes.setdefault(
                result.node_id, {"node_id": result.node_id, "institution": result.institution}
            )
            entry["institution"] = entry["institution"] or result.institution
            entry[phase] = result.metrics
    epsilons = node_epsilons(report)
    for entry in nodes.values():
        if entry["institution"] in epsilons:
            epsilon = epsilons[entry["institution"]]
            entry["epsilon"] = None if math.isinf(epsilon) else epsilon  # None: trained w/o DP
    record: dict[str, Any] = {
        "round": report.server_round,
        "seconds": round(report.seconds, 3),
        "strategy": strategy,
        "train": report.train,
        "evaluate": report.evaluate,
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


def progress_line(report: RoundReport, total_rounds: int) -> str:
    """One human-readable line per round."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"

    parts = [
        f"round {report.server_round}/{total_rounds}",
        f"{report.seconds:6.1f} s",
        f"train loss {fmt(report.train.get(TRAIN_LOSS))}",
        f"val ROC-AUC {fmt(report.train.get(metric_key('risk', 'roc_auc', validation=True)))}",
        f"test loss {fmt(report.evaluate.get(LOSS))}",
        f"federated ROC-AUC {fmt(report.evaluate.get(metric_key('risk', 'roc_auc')))}",
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
