"""Figures people would rather look at than tables (matplotlib, written as PNG files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

from shared_models.atomic import write_atomic

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def roc_curves(
    y_true: np.ndarray, scores: Mapping[str, np.ndarray], path: Path, title: str = "ROC"
) -> Path:
    """One ROC curve per scorer on the same labels; the first scorer is drawn boldest."""
    keep = ~np.isnan(y_true)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for i, (name, score) in enumerate(scores.items()):
        y, s = y_true[keep], np.asarray(score)[keep]
        if np.unique(y).size < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(
            fpr, tpr, lw=2.5 if i == 0 else 1.2, label=f"{name} (AUC {roc_auc_score(y, s):.3f})"
        )
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def predicted_vs_actual(
    actual: np.ndarray, predicted: np.ndarray, path: Path, scale: str, title: str
) -> Path:
    """Scatter of predicted against actual grades with the identity line."""
    keep = ~np.isnan(actual)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(actual[keep], predicted[keep], s=10, alpha=0.5)
    lo = float(min(actual[keep].min(initial=0), predicted[keep].min(initial=0)))
    hi = float(max(actual[keep].max(initial=1), predicted[keep].max(initial=1)))
    ax.plot([lo, hi], [lo, hi], ls="--", c="grey", lw=0.8)
    ax.set(xlabel=f"actual grade ({scale})", ylabel="predicted grade", title=title)
    return _save(fig, path)


def training_curves(
    epochs: Sequence[int],
    train_loss: Sequence[float],
    val_loss: Sequence[float | None],
    path: Path,
    best_epoch: int | None = None,
) -> Path:
    """Train and validation loss per epoch, with the restored best epoch marked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, train_loss, label="train")
    if any(v is not None for v in val_loss):
        ax.plot(epochs, [np.nan if v is None else v for v in val_loss], label="validation")
    if best_epoch is not None:
        ax.axvline(best_epoch, ls=":", c="grey", label=f"best epoch {best_epoch}")
    ax.set(xlabel="epoch", ylabel="loss", title="Training curves")
    ax.legend()
    return _save(fig, path)
