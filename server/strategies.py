"""Flower strategies chosen by name, edufl's metric aggregation, and server-side strategy state.

The classes are Flower's own (``flwr.serverapp.strategy``); edufl only picks one by name, passes
the common sampling settings and the strategy's own parameters, and aggregates the replies'
metrics with `aggregate_metrics` (Flower's hooks ``train_metrics_aggr_fn`` and
``evaluate_metrics_aggr_fn``): exact metrics are averaged so that a node whose ROC-AUC is
undefined (one class in its test split) does not turn the round's average into NaN; DP releases
(`server.release`) are summed, never averaged: the noised counts, and the noised histograms,
from which the consortium's evaluation figures are then computed.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import AggregationError
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from server.release import evaluation_figures, histogram_release, is_dp_evaluate, is_dp_train
from shared_models.errors import EduflError
from shared_models.metrics import sum_histograms
from shared_models.protocol import (
    NOISE_COUNT_STD,
    NOISE_HIST_STD,
    NUM_EXAMPLES,
    RISK_HIST_NEG,
    RISK_HIST_POS,
)

logger = logging.getLogger(__name__)


class _ByName(FedAvg):
    """Hands the aggregate on with its arrays in the global model's order, matched by name.

    Nodes may send their arrays in another order than the server's global model (an LSTM
    trained under DP sends weight_ih, weight_hh, bias_ih, bias_hh; the model holds weight_ih,
    bias_ih, weight_hh, bias_hh), and Flower's FedAvgM pairs the aggregate with the global
    arrays by position. A reply with other names is refused.
    """

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        current: ArrayRecord | None = getattr(self, "current_arrays", None)
        if arrays is None or current is None or list(arrays.keys()) == list(current.keys()):
            return arrays, metrics
        missing = sorted(set(current.keys()) - set(arrays.keys()))
        extra = sorted(set(arrays.keys()) - set(current.keys()))
        if missing or extra:
            raise AggregationError(
                reason=f"round {server_round}: the nodes' arrays do not match the global "
                f"model's (missing {missing}, unexpected {extra})"
            )
        return ArrayRecord({key: arrays[key] for key in current}), metrics


class ByNameFedAvgM(FedAvgM, _ByName):
    """Flower's FedAvgM, its server step taken on arrays paired by name (`_ByName`)."""


_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": ByNameFedAvgM,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
}
STRATEGY_NAMES: tuple[str, ...] = tuple(_STRATEGIES)

#: Set by edufl from its own config, so not accepted among a strategy's parameters.
_COMMON = {
    "self",
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
    "proximal_mu",
}


class UnknownStrategyError(EduflError, ValueError):
    """A strategy name or strategy parameter that edufl does not know."""


def strategy_parameters(name: str) -> tuple[str, ...]:
    """The parameters strategy ``name`` accepts beyond the common sampling settings."""
    cls = _lookup(name)
    return tuple(p for p in inspect.signature(cls.__init__).parameters if p not in _COMMON)


def check_strategy(name: str, params: Mapping[str, float] | None = None) -> None:
    """Raise `UnknownStrategyError` for an unknown name or parameter (listing the valid ones)."""
    valid = strategy_parameters(name)
    unknown = sorted(set(params or {}) - set(valid))
    if unknown:
        raise UnknownStrategyError(
            f"strategy {name!r} has no parameter(s) {unknown}; "
            f"it accepts: {', '.join(valid) or '(none)'}"
        )


def build_strategy(
    name: str,
    *,
    fraction_train: float = 1.0,
    fraction_evaluate: float = 1.0,
    min_nodes: int = 2,
    proximal_mu: float = 0.0,
    params: Mapping[str, float] | None = None,
) -> FedAvg:
    """Flower strategy ``name`` with edufl's sampling settings and metric averaging.

    Args:
        name: one of `STRATEGY_NAMES`.
        fraction_train: share of connected nodes sampled for training each round.
        fraction_evaluate: share sampled for evaluation (0 skips federated evaluation).
        min_nodes: nodes that must be connected (and sampled at least) before a round starts.
        proximal_mu: FedProx's coefficient (FedProx only; it sends it to the nodes).
        params: the strategy's own parameters (e.g. ``eta`` for FedAdam, ``beta`` for
            FedTrimmedAvg); see `strategy_parameters`.

    Raises:
        UnknownStrategyError: unknown name or parameter; the message lists the valid ones.
    """
    check_strategy(name, params)
    cls = _STRATEGIES[name]
    kwargs: dict[str, Any] = dict(params or {})
    if name == "fedprox":
        kwargs["proximal_mu"] = proximal_mu
    elif proximal_mu > 0:
        raise UnknownStrategyError(
            f"proximal_mu is FedProx's; use strategy 'fedprox', not {name!r}"
        )
    return cls(
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes if fraction_evaluate > 0 else 0,
        min_available_nodes=min_nodes,
        train_metrics_aggr_fn=aggregate_metrics,
        evaluate_metrics_aggr_fn=aggregate_metrics,
        **kwargs,
    )


def _lookup(name: str) -> type[FedAvg]:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; valid names are: {', '.join(STRATEGY_NAMES)}"
        ) from None


def weighted_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Average every metric over the replies, weighted by ``weight_key``, skipping NaN values.

    A metric NaN at every node stays NaN; the weight itself is summed (total examples).
    """
    weighted: dict[str, float] = {}
    totals: dict[str, float] = {}
    examples = 0.0
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        weight = float(metrics[weight_key])  # type: ignore[arg-type]
        examples += weight
        for key, value in metrics.items():
            if key == weight_key or not isinstance(value, int | float):
                continue
            weighted.setdefault(key, 0.0)
            totals.setdefault(key, 0.0)
            if math.isfinite(value):
                weighted[key] += weight * value
                totals[key] += weight
    out = MetricRecord({k: weighted[k] / totals[k] if totals[k] else math.nan for k in weighted})
    out[weight_key] = examples
    return out


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """The round's metrics: DP releases summed (`sum_releases`), exact ones `weighted_metrics`.

    The guard lets only replies with the round's majority metric keys through, so a round's
    replies are all DP releases or all exact.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    released = [m for m in metrics if is_dp_train(m) or is_dp_evaluate(m)]
    if not released:
        return weighted_metrics(records, weight_key)
    if len(released) < len(metrics):
        logger.warning(
            "%d reply(ies) with exact metrics in a round of DP releases: left out of the "
            "round's metrics",
            len(metrics) - len(released),
        )
    return sum_releases(released)


def sum_releases(metrics: list[MetricRecord]) -> MetricRecord:
    """Sum DP replies' releases: the noised counts and, for evaluations, the histograms.

    Independent noise adds in variance, so the sums' noise std is ``sqrt(sum(sigma_i²))``. An
    evaluation's figures (ROC-AUC, calibration, accuracy at the thresholds, ...) are computed
    from the summed histograms (NaN where undefined).

    Raises:
        ValueError: the replies mix train and evaluate releases.
    """
    out = MetricRecord()
    counts = [m for m in metrics if NUM_EXAMPLES in m]
    out[NUM_EXAMPLES] = float(sum(float(m[NUM_EXAMPLES]) for m in counts))  # type: ignore[arg-type]
    if all(is_dp_train(m) for m in metrics):
        out[NOISE_COUNT_STD] = math.sqrt(sum(float(m[NOISE_COUNT_STD]) ** 2 for m in metrics))  # type: ignore[arg-type]
        return out
    if not all(is_dp_evaluate(m) for m in metrics):
        raise ValueError("a round's replies mix noised histograms with noised counts")
    pos, neg, std = sum_histograms([histogram_release(m) for m in metrics])
    out[RISK_HIST_POS] = pos.tolist()
    out[RISK_HIST_NEG] = neg.tolist()
    out[NOISE_HIST_STD] = std
    for key, value in evaluation_figures(pos.tolist(), neg.tolist(), std).items():
        out[key] = math.nan if value is None else float(value)
    return out


# --- server-side optimizer state (FedAdam/FedYogi/FedAdagrad moments, FedAvgM momentum) ------

_DICT_STATE = ("m_t", "v_t")


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Arrays a strategy carries from round to round, by name (empty for stateless ones).

    Saved with each checkpoint, so a resumed FedAdam continues with its moments instead of
    restarting them at zero.
    """
    state: dict[str, np.ndarray] = {}
    for attr in _DICT_STATE:
        value = getattr(strategy, attr, None)
        if isinstance(value, dict):
            state |= {f"{attr}/{k}": np.asarray(v) for k, v in value.items()}
    momentum = getattr(strategy, "momentum_vector", None)
    if isinstance(momentum, list):
        state |= {f"momentum_vector/{i}": np.asarray(v) for i, v in enumerate(momentum)}
    return state


def restore_strategy_state(strategy: Strategy, state: Mapping[str, np.ndarray]) -> None:
    """Put arrays saved by `strategy_state` back into ``strategy``."""
    for attr in _DICT_STATE:
        part = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{attr}/")}
        if part:
            setattr(strategy, attr, part)
    momentum = {k: v for k, v in state.items() if k.startswith("momentum_vector/")}
    if momentum:
        order = sorted(momentum, key=lambda k: int(k.split("/", 1)[1]))
        strategy.momentum_vector = [momentum[k] for k in order]  # type: ignore[attr-defined]
