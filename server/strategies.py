"""Flower strategies chosen by name, a NaN-aware metric average, and server-side strategy state.

The classes are Flower's own (``flwr.serverapp.strategy``); edufl only picks one by name, passes
the common sampling settings and the strategy's own parameters, and averages metrics so that a
node whose ROC-AUC is undefined (one class in its test split) does not turn the round's average
into NaN.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import MetricRecord, RecordDict
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

from shared_models.errors import EduflError

logger = logging.getLogger(__name__)

_STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedavgm": FedAvgM,
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
        train_metrics_aggr_fn=weighted_metrics,
        evaluate_metrics_aggr_fn=weighted_metrics,
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
