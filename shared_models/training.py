"""Training and evaluation loops shared by centralized, federated and DP training.

`train_one_epoch` is the only place a model is updated. It works unchanged on a plain model and
optimizer, and on Opacus' ``GradSampleModule``/``DPOptimizer``/``DPDataLoader`` (detected by duck
typing: ``shared_models`` does not import the privacy engine). `fit` adds what centralized
training needs: seeding, class weighting, learning-rate decay, early stopping and a history.

Training runs where the model is: loaders yield CPU tensors and each batch is copied to the
model's device (`shared_models.devices`); `FitConfig.device` moves the model there first.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ExponentialLR
from torch.utils.data import DataLoader, TensorDataset

from shared_models.data.cohort import ModelInputs
from shared_models.devices import model_device, parse_device, resolve_device
from shared_models.early_stopping import EarlyStopping
from shared_models.evaluation import (
    Batch,
    auxiliary_targets,
    evaluate,
    forward_all,
    input_tensors,
    objective,
    predict,
)
from shared_models.losses import (
    DP_GRADE_LOSS,
    balanced_pos_weight,
    check_task,
    heads_for_task,
    task_loss,
)
from shared_models.models.base import ModelConfig
from shared_models.models.native import native_recurrent
from shared_models.models.weights import unwrap

logger = logging.getLogger(__name__)

__all__ = [  # predict/evaluate live in evaluation.py; re-exported for one training entry point
    "EpochRecord",
    "FitConfig",
    "FitResult",
    "backward_batch",
    "evaluate",
    "fit",
    "make_loader",
    "make_optimizer",
    "make_scheduler",
    "predict",
    "set_seed",
    "train_one_epoch",
]


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (weights, dropout, shuffling)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_loader(
    inputs: ModelInputs, batch_size: int, shuffle: bool = False, seed: int = 0
) -> DataLoader[tuple[Tensor, ...]]:
    """A loader of ``(dynamic, week_mask, static, grade, at_risk)`` batches.

    NaN grades stay in the tensors; the losses leave them out. Opacus' ``make_private``
    replaces the sampler with Poisson sampling at rate ``1 / len(loader)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        TensorDataset(*input_tensors(inputs)),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
    )


def make_optimizer(model: nn.Module, learning_rate: float = 1e-3) -> torch.optim.Adam:
    """Adam over the model's trainable parameters (the optimizer of every seed paper)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=learning_rate)


def make_scheduler(optimizer: Optimizer, lr_decay: float) -> ExponentialLR | None:
    """Per-epoch exponential decay ``lr = lr0 * exp(-lr_decay * epoch)``; None when 0."""
    if lr_decay < 0:
        raise ValueError(f"lr_decay must be non-negative, got {lr_decay}")
    return ExponentialLR(optimizer, gamma=math.exp(-lr_decay)) if lr_decay > 0 else None


def _is_dp_optimizer(optimizer: Optimizer) -> bool:
    return hasattr(optimizer, "pre_step") and hasattr(optimizer, "original_optimizer")


def _proximal_pairs(
    model: nn.Module, global_params: Mapping[str, Tensor | np.ndarray]
) -> list[tuple[nn.Parameter, Tensor]]:
    params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    given = {n.removeprefix("_module."): v for n, v in global_params.items()}
    missing = sorted(set(params) - set(given))
    if missing:
        raise ValueError(f"global_params lacks parameters {missing} (they are matched by name)")
    return [
        (p, torch.as_tensor(np.asarray(given[n])).to(dtype=p.dtype, device=p.device))
        for n, p in params.items()
    ]


def _add_proximal_gradient(pairs: list[tuple[nn.Parameter, Tensor]], mu: float) -> None:
    """Add the gradient of ``mu / 2 * ||w - w_global||^2`` to every parameter's ``.grad``."""
    with torch.no_grad():
        for param, anchor in pairs:
            grad = mu * (param - anchor)
            if param.grad is None:
                param.grad = grad
            else:
                param.grad.add_(grad)


def backward_batch(
    model: nn.Module,
    batch: Batch,
    optimizer: Optimizer,
    task: str,
    class_weight: float | None = None,
    loss_weights: Mapping[str, float] | None = None,
    grade_loss: str = "squared",
) -> float:
    """Forward and backward of one batch (``task``'s loss, with the self-supervised heads'
    targets); returns its loss. The update is the caller's."""
    optimizer.zero_grad()
    outputs = model(batch[0], batch[1], batch[2])
    loss = task_loss(
        outputs,
        batch[3],
        batch[4],
        task,
        auxiliary_targets=auxiliary_targets(model, batch, task),
        pos_weight=class_weight,
        loss_weights=loss_weights,
        grade_loss=grade_loss,
    )
    loss.backward()  # type: ignore[no-untyped-call]
    return float(loss.detach())


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: Optimizer,
    task: str,
    *,
    proximal_mu: float = 0.0,
    global_params: Mapping[str, Tensor | np.ndarray] | None = None,
    class_weight: float | None = None,
    loss_weights: Mapping[str, float] | None = None,
) -> float:
    """One pass over ``loader``; returns the mean task loss per student seen.

    Under DP (a ``DPOptimizer``) an empty Poisson batch still takes a noisy step, as the
    accountant assumes one step per batch; without DP empty batches are skipped. The FedProx
    term ``mu / 2 * ||w - w_global||^2`` does not depend on any student, so its gradient is
    added *after* Opacus clips and noises the data gradient (added to the loss, Opacus would
    silently drop it: only per-sample gradients survive ``DPOptimizer``). It is not part of the
    returned loss. Under DP the grade head's loss is `shared_models.losses.DP_GRADE_LOSS` (the
    Bernoulli quasi-likelihood; the squared error without DP), and so is the returned loss.

    Args:
        model: a model from `build_model`, possibly wrapped in a ``GradSampleModule``.
        loader: batches of ``(dynamic, week_mask, static, grade, at_risk)``.
        optimizer: any torch optimizer, or an Opacus ``DPOptimizer``.
        task: one of ``"risk"``, ``"grade"``, ``"multitask"``.
        proximal_mu: FedProx coefficient; 0 is plain FedAvg local training.
        global_params: the round's global weights by parameter name (needed when mu > 0).
        class_weight: BCE ``pos_weight`` for the at-risk head.
        loss_weights: per-head weights of the multitask loss.

    Returns:
        Mean loss over the students seen, NaN if every batch was empty.
    """
    check_task(task)
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be non-negative, got {proximal_mu}")
    if proximal_mu > 0 and global_params is None:
        raise ValueError("proximal_mu > 0 needs global_params (the round's global weights)")
    pairs = _proximal_pairs(model, global_params) if proximal_mu > 0 and global_params else []
    dp = _is_dp_optimizer(optimizer)
    device = model_device(model)
    model.train()
    total, seen = 0.0, 0
    with warnings.catch_warnings():
        # Opacus' backward hooks on a first layer whose inputs need no gradient make torch warn
        # on every batch; per-sample gradients are still exact, so the warning is only noise.
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        for raw in loader:
            batch: Batch = tuple(t.to(device) for t in raw)  # a no-op on the CPU
            n = int(batch[4].shape[0])
            if n == 0 and not dp:
                continue
            # Under DP the grade head trains on the Bernoulli quasi-likelihood: its gradient has
            # the risk head's scale, so clipping does not drown it (`shared_models.losses`).
            loss = backward_batch(
                model,
                batch,
                optimizer,
                task,
                class_weight,
                loss_weights,
                DP_GRADE_LOSS if dp else "squared",
            )
            if dp:
                # DPOptimizer.step() is pre_step() (clip, noise, account) + the wrapped step.
                if optimizer.pre_step():  # type: ignore[attr-defined]
                    _add_proximal_gradient(pairs, proximal_mu)
                    optimizer.original_optimizer.step()  # type: ignore[attr-defined]
            else:
                _add_proximal_gradient(pairs, proximal_mu)
                optimizer.step()
            total += loss * n
            seen += n
    return total / seen if seen else math.nan


class FitConfig(BaseModel):
    """Centralized training settings; the learning rate and its decay come from the model config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_epochs: int = Field(default=100, ge=1)  # the LSTM-GRU paper trains 100 epochs
    batch_size: int = Field(default=64, ge=1)  # the EdNet LSTM paper uses 32 or 64
    patience: int = Field(default=10, ge=1)  # epochs without val improvement (CNN-LSTM paper)
    min_delta: float = Field(default=0.0, ge=0.0)  # smallest decrease that counts as improvement
    class_weighting: bool = False  # BCE pos_weight = n_negative / n_positive of the train split
    loss_weights: dict[str, float] = Field(default_factory=dict)  # multitask head weights
    seed: int = 0  # dropout and shuffling (seed before build_model for the initial weights)
    #: auto, cpu, cuda or cuda:N (`shared_models.devices`); None trains where the model is.
    device: str | None = None

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        return None if value is None else parse_device(value)


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of `fit`: passed to the ``on_epoch`` callback and kept in the history."""

    epoch: int  # 1-based
    train_loss: float
    val_loss: float | None
    learning_rate: float


@dataclass
class FitResult:
    """What `fit` did; the model itself holds the restored best weights."""

    history: list[EpochRecord] = field(default_factory=list)
    best_epoch: int | None = None  # None without a validation set
    best_val_loss: float | None = None
    stopped_early: bool = False
    pos_weight: float | None = None


def fit(
    model: nn.Module,
    train: ModelInputs,
    val: ModelInputs | None,
    task: str,
    config: FitConfig | None = None,
    *,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FitResult:
    """Centralized training with Adam, optional LR decay, and early stopping on ``val``.

    The learning rate and exponential decay are the model config's (``learning_rate``,
    ``lr_decay``). With a validation set, training stops ``patience`` epochs after the best
    validation loss and the best weights are restored; without one it runs ``max_epochs``.

    Args:
        model: a model from `build_model` (its ``config`` supplies the optimizer settings).
        train: training split.
        val: validation split for early stopping, or None.
        task: ``"risk"``, ``"grade"`` or ``"multitask"``.
        config: training settings; defaults follow the seed papers. With ``config.device`` the
            model is moved there first, and stays there.
        on_epoch: called after every epoch (e.g. to advance a progress bar).

    Raises:
        DeviceError: ``config.device`` names a device torch cannot see here.
    """
    cfg = config or FitConfig()
    check_task(task)
    if cfg.device is not None:
        model.to(resolve_device(cfg.device, option="FitConfig.device"))
    model_cfg = getattr(unwrap(model), "config", None)
    lr = model_cfg.learning_rate if isinstance(model_cfg, ModelConfig) else 1e-3
    decay = model_cfg.lr_decay if isinstance(model_cfg, ModelConfig) else 0.0
    set_seed(cfg.seed)
    if val is not None and len(val) == 0:
        raise ValueError("the validation split is empty; pass val=None to train without one")
    names = getattr(unwrap(model), "output_names", None)
    heads = heads_for_task(task, list(names or forward_all(model, train)))  # fail before training
    pos_weight = (
        balanced_pos_weight(train.at_risk) if cfg.class_weighting and "risk" in heads else None
    )
    loader = make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed)
    optimizer = make_optimizer(model, lr)
    scheduler = make_scheduler(optimizer, decay)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)
    result = FitResult(pos_weight=pos_weight)
    with native_recurrent(model):  # no per-student gradients here: torch's own RNN kernels
        for epoch in range(1, cfg.max_epochs + 1):
            current_lr = float(optimizer.param_groups[0]["lr"])
            train_loss = train_one_epoch(
                model,
                loader,
                optimizer,
                task,
                class_weight=pos_weight,
                loss_weights=cfg.loss_weights,
            )
            val_loss = (
                None
                if val is None
                else objective(
                    model, val, task, class_weight=pos_weight, loss_weights=cfg.loss_weights
                )
            )
            record = EpochRecord(epoch, train_loss, val_loss, current_lr)
            result.history.append(record)
            logger.debug(
                "epoch %d: train %.5g val %s lr %.3g", epoch, train_loss, val_loss, current_lr
            )
            if on_epoch is not None:
                on_epoch(record)
            if scheduler is not None:
                scheduler.step()
            if val_loss is not None and stopper.step(val_loss, model, epoch):
                result.stopped_early = True
                break
    if val is not None and stopper.restore(model):
        result.best_epoch = stopper.best_epoch
        result.best_val_loss = stopper.best_loss
    return result
