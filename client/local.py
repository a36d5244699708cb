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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from client.loader import load_cohort
from client.settings import RoundSettings
from shared_models.cohort import CohortArrays, ModelInputs, Normalizer
from shared_models.contract import FeatureSpec
from shared_models.evaluation import evaluate
from shared_models.registry import build_model
from shared_models.splits import split_cohort
from shared_models.training import make_loader, make_optimizer, set_seed, train_one_epoch

logger = logging.getLogger(__name__)

#: Aggregate metrics of each head, always sent (NaN when undefined) so every reply of a round
#: carries the same keys, which Flower's strategies require before they aggregate.
HEAD_METRICS: dict[str, tuple[str, ...]] = {
    "risk": ("roc_auc", "accuracy", "precision", "recall", "f1", "average_precision", "brier"),
    "grade": ("mse", "rmse", "mae", "r2"),
    "engagement": ("mse", "rmse", "mae", "r2"),
}


@dataclass(frozen=True)
class NodeData:
    """One institution's labelled records, split 70/15/15 and normalised with its own train split.

    Attributes:
        institution: the export's institution name (its folder name by default).
        train, val, test: model inputs of each split.
    """

    institution: str
    train: ModelInputs
    val: ModelInputs
    test: ModelInputs

    @property
    def shapes(self) -> tuple[int, int, int]:
        """``(n_weeks, n_dynamic, n_static)`` fixed by the data contract."""
        _, weeks, n_dynamic = self.train.dynamic.shape
        return int(weeks), int(n_dynamic), int(self.train.static.shape[1])


@dataclass(frozen=True)
class NodeSplits:
    """One export's labelled records split 70/15/15, still raw (unnormalised)."""

    institution: str
    train: CohortArrays
    val: CohortArrays
    test: CohortArrays


def split_node(
    data_path: Path | str, spec: FeatureSpec, *, seed: int = 0, institution: str | None = None
) -> NodeSplits:
    """Load one export and split it; the same arguments always give the same splits.

    A centralized baseline pools exactly these splits, so it is compared on the same students.

    Raises:
        DataContractError: the export does not satisfy the contract.
    """
    cohort = load_cohort(data_path, spec, institution=institution)
    split = split_cohort(cohort, seed=seed)
    name = str(cohort.institution[0]) if len(cohort.institution) else Path(data_path).name
    return NodeSplits(
        name, cohort.subset(split.train), cohort.subset(split.val), cohort.subset(split.test)
    )


def prepare_node_data(
    data_path: Path | str, spec: FeatureSpec, *, seed: int = 0, institution: str | None = None
) -> NodeData:
    """`split_node`, normalised with statistics of the node's own train split only.

    Raises:
        DataContractError: the export does not satisfy the contract.
    """
    splits = split_node(data_path, spec, seed=seed, institution=institution)
    normalizer = Normalizer(spec.target.grade_min, spec.target.grade_max).fit(splits.train)
    logger.info(
        "%s: %d train, %d val, %d test records",
        splits.institution,
        len(splits.train),
        len(splits.val),
        len(splits.test),
    )
    return NodeData(
        institution=splits.institution,
        train=normalizer.transform(splits.train),
        val=normalizer.transform(splits.val),
        test=normalizer.transform(splits.test),
    )


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
        "train/loss": float(loss),
        # Local work only (the deployment benchmark subtracts it from a round's wall time).
        "train/seconds": time.perf_counter() - started,
        "train/steps": float(settings.local_epochs * len(loader)),
    }
    if validation is not None:
        metrics |= local_evaluate(model, validation, settings, prefix="val/")
    return metrics


def local_evaluate(
    model: nn.Module, inputs: ModelInputs, settings: RoundSettings, *, prefix: str = ""
) -> dict[str, float]:
    """Aggregate metrics of ``model`` on ``inputs``: the task loss and each trained head's.

    Every key of `HEAD_METRICS` for the task's heads is present; undefined values (ROC-AUC on a
    split with one class) are NaN.
    """
    report = evaluate(model, inputs, settings.task)
    metrics = {f"{prefix}loss": float(report["loss"])}
    for head, names in HEAD_METRICS.items():
        if head not in report:
            continue
        for name in names:
            value = report[head].get(name)
            metrics[f"{prefix}{head}/{name}"] = math.nan if value is None else float(value)
    return metrics
