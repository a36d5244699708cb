"""Training objectives of the three edufl tasks, shaped for Opacus per-sample gradients.

- ``"risk"``: binary cross-entropy on the at-risk logit (optionally ``pos_weight``-ed);
- ``"grade"``: squared error on the [0, 1]-scaled grade, ungraded (NaN) students left out;
- ``"multitask"``: a weighted sum over every head the model has (risk, grade, engagement).

Each head's loss is a *sum over the batch divided by the batch size*, with students who have no
target for that head contributing zero. That is the mean Opacus assumes (``loss_reduction=
"mean"``): a student's per-sample gradient is exactly the gradient of their own loss, so
clipping bounds each student's influence whatever the mix of graded and ungraded students. It
also gives a well-defined zero loss on the empty batches of Poisson sampling.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

logger = logging.getLogger(__name__)

Task = Literal["risk", "grade", "multitask"]
TASKS: tuple[str, ...] = get_args(Task)


def check_task(task: str) -> None:
    """Raise a `ValueError` naming the valid tasks unless ``task`` is one of them."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks are: {', '.join(TASKS)}")


def heads_for_task(task: str, available: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The model outputs that ``task`` trains, given the outputs the model has.

    Raises:
        ValueError: the model lacks the head the task needs (the message says how to fix it).
    """
    check_task(task)
    if task == "multitask":
        return tuple(available)
    if task not in available:
        raise ValueError(
            f"task {task!r} needs a model with a {task!r} head, this model outputs "
            f"{tuple(available)}; build it with config targets including {task!r}"
        )
    return (task,)


def balanced_pos_weight(at_risk: Any) -> float:
    """``n_negative / n_positive``: weights positives so both classes weigh the same in BCE.

    Raises:
        ValueError: there is no positive or no negative label.
    """
    labels = np.asarray(at_risk, dtype=np.float64)
    labels = labels[np.isfinite(labels)]
    positives = float((labels == 1).sum())
    negatives = float((labels == 0).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(
            f"class weighting needs both classes, got {int(positives)} at-risk and "
            f"{int(negatives)} not at-risk students"
        )
    return negatives / positives


def _masked(per_sample: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, per_sample, torch.zeros_like(per_sample)).sum()


def task_loss(
    outputs: Mapping[str, Tensor],
    grade: Tensor,
    at_risk: Tensor,
    task: str,
    *,
    auxiliary_targets: Mapping[str, Tensor] | None = None,
    pos_weight: float | None = None,
    loss_weights: Mapping[str, float] | None = None,
) -> Tensor:
    """The scalar objective of ``task`` for one batch.

    Args:
        outputs: a model's forward output (``risk`` as a logit).
        grade: (B,) scaled grades, NaN when ungraded.
        at_risk: (B,) 0/1 labels (NaN rows are left out too).
        task: one of `TASKS`.
        auxiliary_targets: targets of self-supervised heads (``engagement``), NaN = none.
        pos_weight: BCE weight of the positive class (see `balanced_pos_weight`).
        loss_weights: per-head weights of the multitask sum; heads not named weigh 1.

    Returns:
        A scalar tensor; every output of the model is in its graph (unused heads with weight 0)
        so Opacus finds a per-sample gradient for every parameter.
    """
    heads = heads_for_task(task, list(outputs))
    weights = dict(loss_weights or {})
    unknown = set(weights) - set(outputs)
    if unknown:
        raise ValueError(f"loss_weights names {sorted(unknown)}, not outputs of this model")
    targets = {"risk": at_risk, "grade": grade, **dict(auxiliary_targets or {})}
    batch = max(int(at_risk.shape[0]), 1)
    total = torch.zeros((), dtype=torch.float32, device=at_risk.device)
    for head in heads:
        if head not in targets:
            raise ValueError(f"no target for head {head!r}; pass it in auxiliary_targets")
        pred, target = outputs[head], targets[head].to(outputs[head].dtype)
        valid = torch.isfinite(target)
        filled = torch.where(valid, target, torch.zeros_like(target))  # NaN-free gradients
        if head == "risk":
            pw = None if pos_weight is None else torch.tensor(pos_weight, device=pred.device)
            per_sample = F.binary_cross_entropy_with_logits(
                pred, filled, pos_weight=pw, reduction="none"
            )
        else:
            per_sample = (pred - filled) ** 2
        total = total + weights.get(head, 1.0) * _masked(per_sample, valid) / batch
    for head, value in outputs.items():
        if head not in heads:
            # Opacus raises on a trainable parameter without a per-sample gradient.
            total = total + 0.0 * value.sum()
    return total
