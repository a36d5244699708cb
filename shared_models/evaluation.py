"""Scoring a trained model: predictions, the task loss and the papers' metrics.

Everything here runs in evaluation mode (no dropout) without gradients, and works on a plain
model or an Opacus ``GradSampleModule`` alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from shared_models.data.cohort import ModelInputs
from shared_models.devices import model_device
from shared_models.losses import check_task, heads_for_task, task_loss
from shared_models.metrics import classification_metrics, regression_metrics
from shared_models.models.native import native_recurrent
from shared_models.models.weights import unwrap

logger = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # dynamic, week_mask, static, grade, at_risk


def input_tensors(inputs: ModelInputs) -> Batch:
    """``(dynamic, week_mask, static, grade, at_risk)`` as float32 tensors (NaN grades kept)."""

    def as_tensor(array: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    return (
        as_tensor(inputs.dynamic),
        as_tensor(inputs.week_mask),
        as_tensor(inputs.static),
        as_tensor(inputs.grade),
        as_tensor(inputs.at_risk),
    )


def auxiliary_targets(model: nn.Module, batch: Batch, task: str) -> dict[str, Tensor]:
    """Targets of the model's self-supervised heads (multitask engagement), else empty."""
    produce = getattr(unwrap(model), "auxiliary_targets", None)
    if task != "multitask" or produce is None:
        return {}
    targets: dict[str, Tensor] = produce(batch[0], batch[1], batch[2])
    return targets


@torch.no_grad()
def forward_all(model: nn.Module, inputs: ModelInputs, batch_size: int = 1024) -> dict[str, Tensor]:
    """Raw model outputs (``risk`` as logits) for every student, in evaluation mode.

    Inputs go to the model's device a batch at a time; outputs come back as CPU tensors. The
    model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    dynamic, week_mask, static, _, _ = input_tensors(inputs)
    device = model_device(model)
    chunks: dict[str, list[Tensor]] = {}
    try:
        with native_recurrent(model):  # inference needs no per-student gradient
            for start in range(0, max(len(inputs), 1), batch_size):
                end = start + batch_size
                batch = (t[start:end].to(device) for t in (dynamic, week_mask, static))
                outputs = model(*batch)
                for name, value in outputs.items():
                    chunks.setdefault(name, []).append(value.cpu())
    finally:
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def predict(model: nn.Module, inputs: ModelInputs, batch_size: int = 1024) -> dict[str, np.ndarray]:
    """Per-student predictions as float32 arrays of shape (n,).

    ``risk`` is a probability (the sigmoid of the model's logit); ``grade`` is on the [0, 1]
    scale (``Normalizer.grade_to_scale`` maps it back); ``engagement`` as the model gives it.
    """
    outputs = forward_all(model, inputs, batch_size)
    if "risk" in outputs:
        outputs["risk"] = torch.sigmoid(outputs["risk"])
    return {name: value.numpy().astype(np.float32) for name, value in outputs.items()}


def objective(
    model: nn.Module,
    inputs: ModelInputs,
    task: str,
    *,
    class_weight: float | None = None,
    loss_weights: Mapping[str, float] | None = None,
    batch_size: int = 1024,
) -> float:
    """The training loss of ``task`` over all of ``inputs`` (what early stopping watches)."""
    outputs = forward_all(model, inputs, batch_size)
    tensors = input_tensors(inputs)
    loss = task_loss(
        outputs,
        tensors[3],
        tensors[4],
        task,
        auxiliary_targets=auxiliary_targets(model, tensors, task),
        pos_weight=class_weight,
        loss_weights=loss_weights,
    )
    return float(loss)


def evaluate(
    model: nn.Module,
    inputs: ModelInputs,
    task: str,
    *,
    threshold: float = 0.5,
    class_weight: float | None = None,
    loss_weights: Mapping[str, float] | None = None,
    batch_size: int = 1024,
) -> dict[str, Any]:
    """The task loss and the metrics of every head the task trains (JSON-serialisable).

    Returns:
        ``{"n", "loss", "risk": classification metrics at ``threshold``, "grade": regression
        metrics on the [0, 1] scale, "engagement": regression metrics}`` for the heads the task
        trains. `metrics.flatten_metrics` turns it into Flower metrics.
    """
    check_task(task)
    outputs = forward_all(model, inputs, batch_size)
    tensors = input_tensors(inputs)
    auxiliary = auxiliary_targets(model, tensors, task)
    loss = task_loss(
        outputs,
        tensors[3],
        tensors[4],
        task,
        auxiliary_targets=auxiliary,
        pos_weight=class_weight,
        loss_weights=loss_weights,
    )
    report: dict[str, Any] = {"n": len(inputs), "loss": float(loss)}
    for head in heads_for_task(task, list(outputs)):
        pred = outputs[head].numpy()
        if head == "risk":
            prob = torch.sigmoid(outputs[head]).numpy()
            report["risk"] = classification_metrics(inputs.at_risk, prob, threshold)
        elif head == "grade":
            report["grade"] = regression_metrics(inputs.grade, pred)
        else:
            report[head] = regression_metrics(auxiliary[head].numpy(), pred)
    return report
