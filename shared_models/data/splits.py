"""Reproducible train / validation / test splits of a cohort.

Every party splits its own records the same way (same seed, same rule), so a client's held-out
students never leak into its training set, and a centralized run splits the pooled data exactly
as its institutions would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

from shared_models.data.cohort import CohortArrays
from shared_models.errors import DataContractError

SplitMode = Literal["random", "stratified"]


@dataclass(frozen=True)
class Split:
    """Row indices of each part."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_cohort(
    cohort: CohortArrays,
    *,
    val: float = 0.15,
    test: float = 0.15,
    mode: SplitMode = "random",
    seed: int = 0,
) -> Split:
    """Split records 70/15/15 by default (the CNN-LSTM paper); ``stratified`` keeps risk rates.

    Only labelled records (known at-risk label) are split; unlabelled ones are for scoring.
    """
    if not (0 <= val < 1 and 0 < test < 1 and val + test < 1):
        raise ValueError(f"val ({val}) and test ({test}) must be fractions summing below 1")
    labelled = np.flatnonzero(~np.isnan(cohort.at_risk))
    if len(labelled) < 3:
        raise DataContractError(
            f"need at least 3 records with an outcome to train and test on, got "
            f"{len(labelled)}; an export without outcomes can be scored, not trained on"
        )
    labels = cohort.at_risk[labelled]
    stratify = labels if mode == "stratified" and _can_stratify(labels) else None
    rest, test_idx = train_test_split(
        labelled, test_size=test, random_state=seed, stratify=stratify
    )
    if val == 0:
        return Split(np.sort(rest), np.array([], dtype=int), np.sort(test_idx))
    rest_labels = cohort.at_risk[rest] if stratify is not None else None
    train_idx, val_idx = train_test_split(
        rest, test_size=val / (1 - test), random_state=seed + 1, stratify=rest_labels
    )
    return Split(np.sort(train_idx), np.sort(val_idx), np.sort(test_idx))


def kfold_splits(
    cohort: CohortArrays, k: int = 5, *, stratified: bool = True, seed: int = 0, val: float = 0.15
) -> list[Split]:
    """K folds: each fold's test part once, the rest split again into train and validation."""
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    labelled = np.flatnonzero(~np.isnan(cohort.at_risk))
    labels = cohort.at_risk[labelled]
    use_strata = stratified and _can_stratify(labels, k)
    splitter = (StratifiedKFold if use_strata else KFold)(
        n_splits=k, shuffle=True, random_state=seed
    )
    folds = []
    for fold, (rest_pos, test_pos) in enumerate(splitter.split(labelled, labels)):
        rest = labelled[rest_pos]
        strata = cohort.at_risk[rest] if use_strata else None
        train_idx, val_idx = train_test_split(
            rest, test_size=val, random_state=seed + fold, stratify=strata
        )
        folds.append(Split(np.sort(train_idx), np.sort(val_idx), np.sort(labelled[test_pos])))
    return folds


def _can_stratify(labels: np.ndarray, min_per_class: int = 2) -> bool:
    _, counts = np.unique(labels, return_counts=True)
    return len(counts) > 1 and counts.min() >= min_per_class
