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


def grouped_points(
    values: Mapping[str, Mapping[str, tuple[float, float | None]]],
    path: Path,
    ylabel: str,
    title: str,
) -> Path:
    """``values[group][series] = (mean, sd)`` as points with sd error bars, side by side per group.

    Points rather than bars: the metrics of a comparison differ by a few hundredths, which bars
    drawn from zero hide; the y axis is fitted to the values.
    """
    groups = list(values)
    series = list(dict.fromkeys(s for g in groups for s in values[g]))
    step = 0.6 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.3 * len(groups) + 2), 4))
    x = np.arange(len(groups))
    for i, name in enumerate(series):
        cells = [values[g].get(name, (np.nan, None)) for g in groups]
        ax.errorbar(
            x + (i - (len(series) - 1) / 2) * step,
            [c[0] for c in cells],
            yerr=[c[1] or 0.0 for c in cells],
            fmt="o",
            capsize=3,
            label=name,
        )
    ax.set_xticks(x, groups, rotation=20, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set(ylabel=ylabel, title=title)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def sweep_lines(
    x: Sequence[float],
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str,
    *,
    log_x: bool = False,
    levels: Mapping[str, float] | None = None,
) -> Path:
    """One line per series of ``(means, sds)`` over ``x``; ``levels`` as dashed reference lines."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (means, sds) in series.items():
        ax.errorbar(x, means, yerr=sds, marker="o", capsize=3, label=name)
    for i, (name, level) in enumerate((levels or {}).items()):
        ax.axhline(level, ls="--", lw=1, c=f"C{len(series) + i}", label=name)
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks(list(x), [f"{v:g}" for v in x])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)
