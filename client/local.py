"""A node's local work in a federation round: its data splits, local training, evaluation.

Plain functions with no Flower types, so they are easy to test and so the privacy layer can wrap
training: `local_train` builds the optimizer and the loader, then hands both with the model to
an optional `Privatizer` (Opacus' ``make_private``) before the first step. Only aggregate
metrics leave these functions; per-student predictions never do. Under DP none of these metrics
leave the node either (they are exact functions of the students): `risk_histograms` gives the
counts a DP node releases, with noise, instead of evaluation metrics.

Training and evaluation run on the device the model was built on (`build_local_model`'s
``device``, the node config's ``device``); the weights that leave the node are CPU copies
(`shared_models.models.weights.named_weights`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from shared_models.data.cohort import ModelInputs
from shared_models.evaluation import evaluate, predict
from shared_models.models.native import native_recurrent
from shared_models.models.registry import build_model
from shared_models.protocol import (
    HEAD_METRICS,
    LOSS,
    RISK_HIST_BINS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRAIN_STEPS,
    VAL_PREFIX,
    RoundSettings,
)
from shared_models.training import make_loader, make_optimizer, set_seed, train_one_epoch

logger = logging.getLogger(__name__)

__all__ = [
    "HEAD_METRICS",
    "Privatizer",
    "build_local_model",
    "local_evaluate",
    "local_train",
    "risk_histograms",
]


def build_local_model(
    settings: RoundSettings,
    shapes: tuple[int, int, int],
    device: torch.device | str | None = None,
) -> nn.Module:
    """The federation's architecture for this node's contract shapes (weights are overwritten).

    Built on the CPU (the same initial draws everywhere), then moved to ``device`` if given.
    """
    model = build_model(settings.model, *shapes, settings.model_settings())
    return model if device is None else model.to(device)


class Privatizer(Protocol):
    """Turns a model, optimizer and loader into their private counterparts (e.g. Opacus).

    Called once per round before the first step; returns objects `train_one_epoch` accepts.
    """

    def __call__(
        self, model: nn.Module, optimizer: Optimizer, loader: DataLoader[Any]
    ) -> tuple[nn.Module, Optimizer, DataLoader[Any]]: ...


def local_train(
    model: nn.Module,
    inputs: ModelInputs,
    settings: RoundSettings,
    global_weights: Mapping[str, np.ndarray],
    *,
    validation: ModelInputs | None = None,
    privatize: Privatizer | None = None,
) -> dict[str, float]:
    """Train ``model`` (holding the round's global weights) for ``settings.local_epochs`` epochs.

    FedProx's proximal term is added when ``settings.proximal_mu`` > 0, anchored at
    ``global_weights``. Shuffling and dropout are seeded by ``settings.seed`` and the round, so
    a round is reproducible (and a resumed run retrains a round exactly).

    Returns:
        ``train/loss`` (mean loss of the last epoch), ``train/seconds`` (local training
        time), ``train/steps`` (optimizer steps taken) and, with ``validation``, ``val/...``
        aggregate metrics; no per-student value.
    """
    set_seed(settings.seed * 100_003 + settings.server_round)
    loader: DataLoader[Any] = make_loader(
        inputs, settings.batch_size, shuffle=True, seed=settings.seed + settings.server_round
    )
    optimizer: Optimizer = make_optimizer(model, settings.learning_rate)
    if privatize is not None:
        model, optimizer, loader = privatize(model, optimizer, loader)
    loss = math.nan
    started = time.perf_counter()
    # Without DP no per-student gradient is needed: torch's own recurrent kernels train the
    # same parameters (under DP the privatizer has already swapped in its fused twins).
    with native_recurrent(model):
        for _ in range(settings.local_epochs):
            loss = train_one_epoch(
                model,
                loader,
                optimizer,
                settings.task,
                proximal_mu=settings.proximal_mu,
                global_params=global_weights if settings.proximal_mu > 0 else None,
            )
    metrics = {
        TRAIN_LOSS: float(loss),
        # Local work only (the deployment benchmark subtracts it from a round's wall time).
        TRAIN_SECONDS: time.perf_counter() - started,
        TRAIN_STEPS: float(settings.local_epochs * len(loader)),
    }
    if validation is not None:
        metrics |= local_evaluate(model, validation, settings, prefix=VAL_PREFIX)
    return metrics


def local_evaluate(
    model: nn.Module, inputs: ModelInputs, settings: RoundSettings, *, prefix: str = ""
) -> dict[str, float]:
    """Aggregate metrics of ``model`` on ``inputs``: the task loss and each trained head's.

    Every key of `shared_models.protocol.HEAD_METRICS` for the task's heads is present;
    undefined values (ROC-AUC on a split with one class) are NaN.
    """
    report = evaluate(model, inputs, settings.task)
    metrics = {f"{prefix}{LOSS}": float(report["loss"])}
    for head, names in HEAD_METRICS.items():
        if head not in report:
            continue
        for name in names:
            value = report[head].get(name)
            metrics[f"{prefix}{head}/{name}"] = math.nan if value is None else float(value)
    return metrics


def risk_histograms(
    model: nn.Module, inputs: ModelInputs, bins: int = RISK_HIST_BINS
) -> tuple[list[float], list[float]]:
    """Counts of students by predicted risk: at-risk students' and the others', exact.

    One prediction per *student* (their last record: the loader orders a student's records by
    term), ``bins`` equal bins over [0, 1]; each student adds 1 to exactly one bin of one of the
    two histograms, so the pair has L2 sensitivity 1 under adding or removing a student. Records
    whose outcome is unknown are left out. A DP node releases these only with noise
    (``DPSession.release_histogram``).
    """
    risk = predict(model, inputs)["risk"]
    ids = inputs.student_ids if len(inputs.student_ids) else np.arange(len(inputs))
    last: dict[object, int] = {}
    for index, student in enumerate(ids):
        last[student] = index  # a later record of the same student replaces an earlier one
    chosen = np.fromiter(last.values(), dtype=np.int64, count=len(last))
    labels = inputs.at_risk[chosen]
    known = ~np.isnan(labels)
    scores, labels = risk[chosen][known], labels[known]
    edges = np.linspace(0.0, 1.0, bins + 1)
    pos, _ = np.histogram(scores[labels == 1], bins=edges)
    neg, _ = np.histogram(scores[labels == 0], bins=edges)
    return [float(c) for c in pos], [float(c) for c in neg]
