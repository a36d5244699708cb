"""Empirical privacy: a membership-inference attack on a trained model.

The attack is the loss-threshold test (Yeom et al., 2018): a student whose loss is low is guessed
to have been in the training set. It needs no shadow models, only the model and two groups of
students: members (its training split) and non-members (held out). Reported next to the claimed
epsilon:

- attack AUC and advantage ``max_t (TPR - FPR)``; (epsilon, delta)-DP caps the advantage at
  ``(e^eps - 1 + 2 delta) / (e^eps + 1)``;
- an empirical lower bound on epsilon (Jagielski et al., 2020): the threshold is chosen on one
  half of the students and ``log((TPR - delta) / FPR)`` is evaluated on the other half with
  95 % Clopper-Pearson bounds, so the bound is statistically valid, if loose on small cohorts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.nn import functional as F

from privacy.budget import DEFAULT_DELTA
from shared_models.data.cohort import CohortArrays, ModelInputs, Normalizer
from shared_models.data.contract import FeatureSpec
from shared_models.data.splits import split_cohort
from shared_models.errors import DataContractError
from shared_models.evaluation import forward_all
from shared_models.models.artifact import load_trained

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttackResult:
    """What the membership-inference test found (aggregates only, no per-student score)."""

    n_members: int
    n_non_members: int
    auc: float  # 0.5: the attacker cannot tell members from non-members
    advantage: float  # max over thresholds of TPR - FPR
    epsilon_lower_bound: float  # 95 % confidence; 0 when no leak is demonstrated
    delta: float
    claimed_epsilon: float | None = None

    @property
    def advantage_bound(self) -> float | None:
        """The largest advantage the claimed (epsilon, delta) allows."""
        if self.claimed_epsilon is None:
            return None
        e = math.exp(self.claimed_epsilon)
        return min(1.0, (e - 1 + 2 * self.delta) / (e + 1))


def per_student_loss(model: nn.Module, inputs: ModelInputs) -> np.ndarray:
    """Each student's loss: BCE of the at-risk head, else squared error of the grade head."""
    outputs = forward_all(model, inputs)
    if "risk" in outputs:
        target = torch.from_numpy(inputs.at_risk)
        losses = F.binary_cross_entropy_with_logits(outputs["risk"], target, reduction="none")
    elif "grade" in outputs:
        losses = (outputs["grade"] - torch.from_numpy(inputs.grade)) ** 2
    else:
        raise ValueError(f"the model has no risk or grade head (outputs {sorted(outputs)})")
    values = losses.numpy().astype(np.float64)
    return values[np.isfinite(values)]


def membership_inference(
    model: nn.Module,
    members: ModelInputs,
    non_members: ModelInputs,
    *,
    delta: float = DEFAULT_DELTA,
    claimed_epsilon: float | None = None,
    seed: int = 0,
) -> AttackResult:
    """Run the loss-threshold attack on ``model`` (see the module docstring)."""
    member_scores = -per_student_loss(model, members)  # higher score: more likely a member
    other_scores = -per_student_loss(model, non_members)
    if len(member_scores) < 2 or len(other_scores) < 2:
        raise ValueError("need at least two labelled members and two non-members")
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(other_scores))]
    scores = np.r_[member_scores, other_scores]
    fpr, tpr, _ = roc_curve(labels, scores)
    rng = np.random.default_rng(seed)
    choose = rng.random(len(labels)) < 0.5
    return AttackResult(
        n_members=len(member_scores),
        n_non_members=len(other_scores),
        auc=float(roc_auc_score(labels, scores)),
        advantage=float(np.max(tpr - fpr)),
        epsilon_lower_bound=_epsilon_lower_bound(
            labels[choose], scores[choose], labels[~choose], scores[~choose], delta
        ),
        delta=delta,
        claimed_epsilon=claimed_epsilon,
    )


def _epsilon_lower_bound(
    fit_labels: np.ndarray,
    fit_scores: np.ndarray,
    test_labels: np.ndarray,
    test_scores: np.ndarray,
    delta: float,
) -> float:
    """Threshold and direction picked on the ``fit`` half, bound evaluated on ``test``."""
    if len(np.unique(fit_labels)) < 2 or len(np.unique(test_labels)) < 2:
        return 0.0
    best, choice = 0.0, None
    for t in np.unique(fit_scores):
        for above in (True, False):
            bound = _cp_epsilon(fit_labels, fit_scores, t, above, delta)
            if bound > best:
                best, choice = bound, (t, above)
    if choice is None:
        return 0.0
    return _cp_epsilon(test_labels, test_scores, *choice, delta)


def _cp_epsilon(
    labels: np.ndarray, scores: np.ndarray, threshold: float, above: bool, delta: float
) -> float:
    """``log((TPR_low - delta) / FPR_high)`` with 95 % Clopper-Pearson bounds, at least 0.

    ``above``: guess "member" when the score is at or above ``threshold``; otherwise guess
    "non-member" there, the complementary test, which DP bounds in the same way.
    """
    guess = scores >= threshold
    positive = labels == 1 if above else labels == 0
    if not above:
        guess = ~guess
    hits, n_pos = int(guess[positive].sum()), int(positive.sum())
    false, n_neg = int(guess[~positive].sum()), int((~positive).sum())
    alpha = 0.05
    tpr_low = beta.ppf(alpha / 2, hits, n_pos - hits + 1) if hits > 0 else 0.0
    fpr_high = beta.ppf(1 - alpha / 2, false + 1, n_neg - false) if false < n_neg else 1.0
    if tpr_low <= delta:
        return 0.0
    return max(0.0, float(math.log((tpr_low - delta) / fpr_high)))


def attack_trained_model(
    model_dir: Path,
    cohort: CohortArrays,
    spec: FeatureSpec,
    *,
    split: str | None = None,
    seed: int | None = None,
    delta: float | None = None,
    claimed_epsilon: float | None = None,
) -> AttackResult:
    """Attack a model folder (``model.pt`` + ``model.json``) trained on ``cohort``'s records.

    Members are the model's training split, rebuilt with the same split rule and seed as
    training (``split``/``seed``, or the card's ``extra["split"]``, else ``random``/0 as
    ``edufl train``); the split is confirmed by refitting the normaliser the card stores.
    Claimed epsilon and delta default to the card's ``extra["dp"]``.

    Raises:
        DataContractError: the model cannot be read, or its split cannot be rebuilt.
    """
    model, normalizer, card = load_trained(model_dir, spec)
    recorded: dict[str, Any] = card.extra.get("split") or {}
    mode = split or str(recorded.get("mode", "random"))
    seed = int(recorded.get("seed", 0)) if seed is None else seed
    if mode not in ("random", "stratified"):
        raise DataContractError(f"--split must be random or stratified, not {mode!r}")
    part = split_cohort(cohort, mode=mode, seed=seed)  # type: ignore[arg-type]
    # A normaliser fitted on the training split fingerprints it; the contract's constants (the
    # default since they keep preprocessing inside the guarantee, and every adopted model's)
    # say nothing about it, so then the split rests on the recorded seed alone.
    if normalizer.method == "contract":
        logger.info("%s: contract normalisation; the split is the recorded seed's", model_dir)
    elif not _same_normalizer(
        Normalizer(normalizer.grade_min, normalizer.grade_max).fit(cohort.subset(part.train)),
        normalizer,
    ):
        raise DataContractError(
            f"{model_dir}: its training split is not the {mode} split (seed {seed}) of these "
            "exports; pass the exports, --split and --seed the model was trained with"
        )
    dp: dict[str, Any] = card.extra.get("dp") or {}
    claimed = claimed_epsilon if claimed_epsilon is not None else dp.get("epsilon")
    return membership_inference(
        model,
        normalizer.transform(cohort.subset(part.train)),
        normalizer.transform(cohort.subset(part.test)),
        delta=float(delta if delta is not None else dp.get("delta", DEFAULT_DELTA)),
        claimed_epsilon=None if claimed is None else float(claimed),
        seed=seed,
    )


def _same_normalizer(a: Normalizer, b: Normalizer) -> bool:
    pairs = [(a.dyn_mean, b.dyn_mean), (a.dyn_std, b.dyn_std), (a.static_mean, b.static_mean)]
    return all(
        x is not None and y is not None and x.shape == y.shape and np.allclose(x, y, atol=1e-6)
        for x, y in pairs
    )


def render_attack(result: AttackResult) -> str:
    """The attack's findings as a few human-readable lines."""
    lines = [
        f"membership inference (loss threshold): {result.n_members} members vs "
        f"{result.n_non_members} held-out students",
        f"  attack AUC            {result.auc:.3f}   (0.5 = chance)",
        f"  attack advantage      {result.advantage:.3f}   (max TPR - FPR)",
        f"  empirical epsilon     >= {result.epsilon_lower_bound:.3f}   "
        f"(95 % lower bound, delta {result.delta:g})",
    ]
    if result.claimed_epsilon is None:
        lines.append("  claimed epsilon       none (trained without DP, or not recorded)")
    else:
        lines.append(
            f"  claimed epsilon       {result.claimed_epsilon:.3f}   (allows advantage up to "
            f"{result.advantage_bound:.3f})"
        )
        if result.epsilon_lower_bound > result.claimed_epsilon:
            lines.append("  => the attack REFUTES the claimed epsilon")
    return "\n".join(lines)
