"""A node's local work in a federation round: its data splits, local training, evaluation.

Plain functions with no Flower types, so they are easy to test and so the privacy layer can wrap
training: `local_train` builds the optimizer and the loader, then hands both with the model to
an optional `Privatizer` (Opacus' ``make_private``) before the first step. Only aggregate
metrics leave these functions; per-student predictions never do.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from shared_models.data.cohort import ModelInputs
from shared_models.evaluation import evaluate
from shared_models.models.registry import build_model
from shared_models.protocol import (
    HEAD_METRICS,
    LOSS,
    TRAIN_LOSS,
    TRAIN_SECONDS,
    TRAIN_STEPS,
    VAL_PREFIX,
    RoundSettings,
)
from shared_models.training import make_loader, make_optimizer, set_seed, train_one_epoch

logger = logging.getLogger(__name__)

__all__ = ["HEAD_METRICS", "Privatizer", "build_local_model", "local_evaluate", "local_train"]


def build_local_model(settings: RoundSettings, shapes: tuple[int, int, int]) -> nn.Module:
    """The federation's architecture for this node's contract shapes (weights are overwritten)."""
    return build_model(settings.model, *shapes, settings.model_settings())


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
