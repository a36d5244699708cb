"""Training objectives of the three edufl tasks, shaped for Opacus per-sample gradients.

- ``"risk"``: binary cross-entropy on the at-risk logit (optionally ``pos_weight``-ed);
- ``"grade"``: squared error on the [0, 1]-scaled grade, ungraded (NaN) students left out
  (under DP-SGD the Bernoulli quasi-likelihood instead, `DP_GRADE_LOSS`);
- ``"multitask"``: a weighted sum over every head the model has (risk, grade, engagement).

Each head's loss is a *sum over the batch divided by the batch size*, with students who have no
target for that head contributing zero. That is the mean Opacus assumes (``loss_reduction=
"mean"``): a student's per-sample gradient is exactly the gradient of their own loss, so
clipping bounds each student's influence whatever the mix of graded and ungraded students. It
also gives a well-defined zero loss on the empty batches of Poisson sampling.

Why the grade loss changes under DP. The grade head is ``sigmoid(z)``; the squared error's
gradient on ``z`` is ``2 (p - y) p (1 - p)``, at most half the residual and vanishing where the
sigmoid saturates, while the at-risk BCE's is ``p - y``. DP-SGD clips each student's *joint*
gradient to one norm and adds noise of that norm's scale, so a term with a small gradient is
drowned: measured on UCI Portuguese (``edufl reproduce cortez-silva``, epsilon 8), the grade term
carried 8-12% of a student's gradient at initialisation and the DP grade R² stayed near 0.1.
The Bernoulli quasi-likelihood ``y log(y / p) + (1 - y) log((1 - y) / (1 - p))`` (Papke &
Wooldridge 1996, the fractional-response model) has gradient ``p - y`` on ``z``: the same form
and scale as the risk head's, so the two heads share the clipped gradient evenly. Both losses
are minimised by the conditional mean grade, so the model still predicts the same quantity; and
the choice depends on no record, so the privacy guarantee is unchanged. Without DP the squared
error stays (the papers' MSE objective).
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

GradeLoss = Literal["squared", "bernoulli"]
GRADE_LOSSES: tuple[str, ...] = get_args(GradeLoss)
#: The grade loss of DP-SGD training (`shared_models.training.train_one_epoch` under a
#: ``DPOptimizer``); see the module docstring.
DP_GRADE_LOSS: GradeLoss = "bernoulli"
#: Bernoulli quasi-likelihood: predictions are clamped this far inside (0, 1) (no log(0)).
_EPS = 1e-6


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


def bernoulli_deviance(pred: Tensor, target: Tensor) -> Tensor:
    """Per-student ``y log(y / p) + (1 - y) log((1 - y) / (1 - p))`` for ``y``, ``p`` in [0, 1].

    The binary cross-entropy less the target's own entropy: zero at ``p == y``, minimised by the
    conditional mean, and with gradient ``p - y`` on the logit of ``p``. ``pred`` is clamped to
    ``[1e-6, 1 - 1e-6]``.
    """
    p = pred.clamp(_EPS, 1.0 - _EPS)
    cross_entropy = -(target * torch.log(p) + (1.0 - target) * torch.log1p(-p))
    # The target's entropy, 0 log 0 = 0 included; a constant, so it takes no gradient (xlogy's
    # own gradient is NaN at a grade of exactly 0 or the maximum).
    with torch.no_grad():
        entropy = -(torch.xlogy(target, target) + torch.xlogy(1.0 - target, 1.0 - target))
    return cross_entropy - entropy


def task_loss(
    outputs: Mapping[str, Tensor],
    grade: Tensor,
    at_risk: Tensor,
    task: str,
    *,
    auxiliary_targets: Mapping[str, Tensor] | None = None,
    pos_weight: float | None = None,
    loss_weights: Mapping[str, float] | None = None,
    grade_loss: str = "squared",
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
        grade_loss: ``"squared"`` error, or ``"bernoulli"`` quasi-likelihood (`DP_GRADE_LOSS`:
            see the module docstring) of the grade head.

    Returns:
        A scalar tensor; every output of the model is in its graph (unused heads with weight 0)
        so Opacus finds a per-sample gradient for every parameter.
    """
    heads = heads_for_task(task, list(outputs))
    if grade_loss not in GRADE_LOSSES:
        raise ValueError(
            f"unknown grade_loss {grade_loss!r}; valid grade losses are: {', '.join(GRADE_LOSSES)}"
        )
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
        elif head == "grade" and grade_loss == "bernoulli":
            per_sample = bernoulli_deviance(pred, filled)
        else:
            per_sample = (pred - filled) ** 2
        total = total + weights.get(head, 1.0) * _masked(per_sample, valid) / batch
    for head, value in outputs.items():
        if head not in heads:
            # Opacus raises on a trainable parameter without a per-sample gradient.
            total = total + 0.0 * value.sum()
    return total
