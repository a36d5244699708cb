"""What a run's outputs may say about the nodes' data: exact figures without DP, releases under DP.

Under DP a node's reply holds only DP releases (`shared_models.protocol`): in a train reply its
noised student count (``num-examples``, with ``noise/count-std``), in an evaluate reply noised
histograms of predicted risk (``risk/hist-pos``, ``risk/hist-neg``, with ``noise/hist-std``),
each release accounted in a signed ledger entry. The server writes nothing else about the data:
every figure in ``metrics.jsonl``, ``summary.md``, the checkpoints' manifests and the progress
lines is either such a release or computed from releases only (post-processing, no further
privacy cost), and is written as a *released figure*::

    {"value": 0.7312, "noised": true, "noise_std": 3.46, "ledger": [["institution_01", 4], ...]}

- ``value``: the figure (a number, None where undefined, or a list for the histograms);
- ``noise_std``: the standard deviation of the Gaussian noise on each *count* the figure is
  computed from. For the consortium's figures, the counts are the institutions' histograms
  summed, so their noise std is ``sqrt(sum(sigma_i²))`` (``sigma·sqrt(k)`` for ``k`` institutions
  with the same ``sigma``). A derived figure (ROC-AUC, accuracy, ...) inherits the noise of its
  counts: it is reliable when the counts are large next to ``noise_std``;
- ``ledger``: the ledger entries (``[institution, seq]`` in the run's ``ledger.jsonl``) of the
  releases the figure is computed from: the histogram entries of the round for evaluation
  figures, the count entries of the run for ``num-examples``.

A round's line in ``metrics.jsonl`` says ``"release": "dp"`` when its figures are released
figures, ``"exact"`` when they are today's plain numbers (a run without DP, ``--no-dp``). Under
DP:

- ``train`` holds ``num-examples`` only (the sum of the nodes' noised counts): no training loss,
  time, steps or validation metric leaves a node;
- ``evaluate`` holds the figures of `evaluation_figures` computed from the summed histograms
  (``risk/n``, ``risk/n_positive``, ``risk/roc_auc``, ``risk/average_precision``, ``risk/brier``,
  ``risk/ece``, accuracy, precision, recall and F1 at 0.5 and at the advisor's tier thresholds
  0.40 and 0.70 as ``risk/recall@0.40`` ...), and the summed histograms themselves;
- each institution's ``train`` and ``evaluate`` hold the same, computed from *its own* releases
  only (its noised count; its noised histograms, with its own ``sigma``);
- a value a DP reply carries beyond its releases is not written (and is logged as withheld).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from shared_models.metrics import histogram_metrics
from shared_models.protocol import (
    NOISE_COUNT_STD,
    NOISE_HIST_STD,
    NUM_EXAMPLES,
    RISK_HIST_NEG,
    RISK_HIST_POS,
)

logger = logging.getLogger(__name__)

#: A ledger entry's place in the run's ``ledger.jsonl``: ``(institution, seq)``.
LedgerRef = tuple[str, int]

#: The figures `evaluation_figures` computes, besides the thresholded ones.
_FIGURES = ("n", "n_positive", "roc_auc", "average_precision", "brier", "ece")
_AT_THRESHOLD = ("accuracy", "precision", "recall", "f1")


def is_dp_train(metrics: Mapping[str, Any]) -> bool:
    """Whether train metrics (a reply's or an aggregate) are the DP release schema's."""
    return NOISE_COUNT_STD in metrics


def is_dp_evaluate(metrics: Mapping[str, Any]) -> bool:
    """Whether evaluation metrics (a reply's or an aggregate) are noised histograms."""
    return RISK_HIST_POS in metrics or RISK_HIST_NEG in metrics


def histogram_release(metrics: Mapping[str, Any]) -> tuple[list[float], list[float], float]:
    """``(positive, negative, noise_std)`` of a DP evaluate reply's (or aggregate's) metrics.

    Raises:
        ValueError: a histogram or the noise std is missing or not numbers.
    """
    try:
        pos = [float(v) for v in metrics[RISK_HIST_POS]]
        neg = [float(v) for v in metrics[RISK_HIST_NEG]]
        std = float(metrics[NOISE_HIST_STD])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"a DP evaluation needs {RISK_HIST_POS}, {RISK_HIST_NEG} (lists of counts) and "
            f"{NOISE_HIST_STD} (a number); {exc!r}"
        ) from None
    return pos, neg, std


def evaluation_figures(
    hist_pos: Sequence[float], hist_neg: Sequence[float], noise_std: float
) -> dict[str, float | None]:
    """The flat figures of `shared_models.metrics.histogram_metrics` under ``risk/`` keys."""
    found = histogram_metrics(hist_pos, hist_neg, noise_std=noise_std)
    flat: dict[str, float | None] = {f"risk/{k}": found[k] for k in (*_FIGURES, *_AT_THRESHOLD)}
    for threshold, values in found["at"].items():
        flat |= {f"risk/{k}@{threshold}": values[k] for k in _AT_THRESHOLD}
    if found["clipped"]:
        logger.info(
            "%d negative noised count(s) clipped to 0 before computing the figures",
            found["clipped"],
        )
    return flat


def figure(value: Any, noise_std: float, ledger: Iterable[LedgerRef]) -> dict[str, Any]:
    """A released figure (see the module docstring); NaN becomes None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        value = None
    return {
        "value": value,
        "noised": True,
        "noise_std": float(noise_std),
        "ledger": [[name, int(seq)] for name, seq in sorted(set(ledger))],
    }


def value_of(item: Any) -> Any:
    """The number of a plain figure or of a released one."""
    return item.get("value") if isinstance(item, Mapping) else item


def released_train(
    metrics: Mapping[str, Any], ledger: Iterable[LedgerRef], *, who: str = "the consortium"
) -> dict[str, Any]:
    """The released figures of DP train metrics: the noised count only."""
    _withhold(metrics, {NUM_EXAMPLES, NOISE_COUNT_STD}, who, "train")
    if NUM_EXAMPLES not in metrics:
        return {}
    return {
        NUM_EXAMPLES: figure(float(metrics[NUM_EXAMPLES]), float(metrics[NOISE_COUNT_STD]), ledger)
    }


def released_evaluation(
    metrics: Mapping[str, Any], ledger: Iterable[LedgerRef], *, who: str = "the consortium"
) -> dict[str, Any]:
    """The released figures of a DP evaluation: its histograms and the figures they give.

    ``metrics`` is one node's evaluate reply or the aggregate `server.strategies` makes (the
    summed histograms, their noise std and, already computed, their figures).
    """
    ledger = list(ledger)
    releases = {NUM_EXAMPLES, RISK_HIST_POS, RISK_HIST_NEG, NOISE_HIST_STD}
    _withhold(metrics, releases, who, "evaluate")
    pos, neg, std = histogram_release(metrics)
    out = {
        RISK_HIST_POS: figure(pos, std, ledger),
        RISK_HIST_NEG: figure(neg, std, ledger),
    }
    out |= {key: figure(v, std, ledger) for key, v in evaluation_figures(pos, neg, std).items()}
    return out


def _withhold(metrics: Mapping[str, Any], allowed: set[str], who: str, phase: str) -> None:
    # Only the releases are read; the aggregate's figures computed from them are recomputed
    # (so nothing else in it is copied), and a node's extra values are named in the log.
    extra = sorted(k for k in metrics if k not in allowed)
    if extra and who != "the consortium":
        logger.warning(
            "withheld %s's %s value(s) %s from the run's outputs: not DP releases",
            who,
            phase,
            extra,
        )
