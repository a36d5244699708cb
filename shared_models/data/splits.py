"""Reproducible train / validation / test splits of a cohort, by student.

The unit of privacy is a student, so a student's records (all terms) land in the same part, and
the part is a function of the student's pseudonymous id alone: HMAC-SHA256 of the id under a key
derived from the federation seed. Hence

- a node, a centralized baseline pooling the nodes' splits, the adoption of the global model and
  the membership auditor all derive the same split from (seed, id);
- adding or removing one student moves no other student between parts, so two neighbouring
  datasets (one student more or less) differ in that student's records only, in every part.

The key can be the seed, which is no secret: the ids are keyed pseudonyms that never leave the
institution (the server never sees them), so knowing the key tells nobody which student is where,
and the split is not a privacy mechanism, only a rule every party must apply identically.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from shared_models.data.cohort import CohortArrays
from shared_models.errors import DataContractError

#: ``stratified`` is accepted for compatibility and splits exactly as ``random``: see split_cohort.
SplitMode = Literal["random", "stratified"]

_KEY_INFO = b"edufl/split/v1"


@dataclass(frozen=True)
class Split:
    """Row indices of each part."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split_key(seed: int) -> bytes:
    """The 32-byte HMAC key of the split for a federation seed (HKDF-SHA256)."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_INFO)
    return hkdf.derive(str(int(seed)).encode())


def student_positions(student_ids: np.ndarray, seed: int) -> np.ndarray:
    """Each record's student as a uniform number in [0, 1): HMAC-SHA256(key(seed), id).

    Records of the same student get the same number, whatever else is in the cohort.
    """
    key = split_key(seed)
    unique, inverse = np.unique(np.asarray(student_ids).astype(str), return_inverse=True)
    pos = np.array(
        [
            int.from_bytes(hmac.digest(key, sid.encode(), "sha256")[:8], "big") / 2.0**64
            for sid in unique
        ],
        dtype=np.float64,
    )
    return pos[inverse.reshape(-1)]


def split_cohort(
    cohort: CohortArrays,
    *,
    val: float = 0.15,
    test: float = 0.15,
    mode: SplitMode = "random",
    seed: int = 0,
) -> Split:
    """Split students 70/15/15 in expectation (the CNN-LSTM paper's proportions).

    A student whose keyed hash falls in [0, test) is a test student, in [test, test + val) a
    validation student, else a training student. The hash does not depend on the label, so every
    label's share is the same in each part in expectation; ``stratified`` therefore splits as
    ``random`` does. Exact per-label proportions would need ranks, and a rank moves when any other
    student joins, which is what the keyed split exists to prevent.

    Only labelled records (known at-risk label) are split; unlabelled ones are for scoring. In a
    tiny cohort where a part would be empty, the student nearest to that part's interval moves
    into it (the only case in which one student's presence can move another).
    """
    if mode not in ("random", "stratified"):
        raise ValueError(f"mode must be 'random' or 'stratified', not {mode!r}")
    if not (0 <= val < 1 and 0 < test < 1 and val + test < 1):
        raise ValueError(f"val ({val}) and test ({test}) must be fractions summing below 1")
    labelled = np.flatnonzero(~np.isnan(cohort.at_risk))
    if len(labelled) < 3:
        raise DataContractError(
            f"need at least 3 records with an outcome to train and test on, got "
            f"{len(labelled)}; an export without outcomes can be scored, not trained on"
        )
    pos = student_positions(cohort.student_ids[labelled], seed)
    bounds = [(0.0, test), (test, test + val), (test + val, 1.0)]  # test, val, train
    part = np.searchsorted([test, test + val], pos, side="right")
    needed = [0, 2] + ([1] if val > 0 else [])
    _fill_empty_parts(part, pos, bounds, needed)
    return Split(
        np.sort(labelled[part == 2]), np.sort(labelled[part == 1]), np.sort(labelled[part == 0])
    )


def kfold_splits(
    cohort: CohortArrays, k: int = 5, *, stratified: bool = True, seed: int = 0, val: float = 0.15
) -> list[Split]:
    """K folds by student: each fold's test students once, the rest split by the keyed hash.

    ``stratified`` balances the at-risk rate across folds (scikit-learn's StratifiedGroupKFold);
    both ways a student's records stay in one fold.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    labelled = np.flatnonzero(~np.isnan(cohort.at_risk))
    labels = cohort.at_risk[labelled]
    groups = np.asarray(cohort.student_ids[labelled]).astype(str)
    n_students = len(np.unique(groups))
    if n_students < k:
        raise DataContractError(
            f"{k}-fold cross-validation needs at least {k} students with an outcome, got "
            f"{n_students}; lower the number of folds"
        )
    splitter: GroupKFold | StratifiedGroupKFold
    if stratified and _can_stratify(labels, k):
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    pos = student_positions(groups, seed)
    folds = []
    for rest_pos, test_pos in splitter.split(labelled, labels, groups):
        in_val = pos[rest_pos] < val
        _fill_empty_parts(
            in_val.astype(int),
            pos[rest_pos],
            [(val, 1.0), (0.0, val)],
            [0, 1] if val > 0 else [0],
            out=in_val,
        )
        folds.append(
            Split(
                np.sort(labelled[rest_pos[~in_val]]),
                np.sort(labelled[rest_pos[in_val]]),
                np.sort(labelled[test_pos]),
            )
        )
    return folds


def _fill_empty_parts(
    part: np.ndarray,
    pos: np.ndarray,
    bounds: list[tuple[float, float]],
    needed: list[int],
    out: np.ndarray | None = None,
) -> None:
    """Move into each empty needed part the student nearest its interval, from a part of 2+.

    Writes ``part`` in place (or ``out`` as a boolean "is part 1" mask). Deterministic: it
    depends on the positions only.
    """
    for target in needed:
        if (part == target).any():
            continue
        counts = {p: len(np.unique(pos[part == p])) for p in np.unique(part)}
        donors = np.flatnonzero(np.isin(part, [p for p, c in counts.items() if c > 1]))
        if not len(donors):
            continue  # fewer students than parts: nothing can be done, callers see an empty part
        lo, hi = bounds[target]
        distance = np.maximum(lo - pos[donors], 0) + np.maximum(pos[donors] - hi, 0)
        chosen = pos[donors[np.argmin(distance)]]
        part[pos == chosen] = target
    if out is not None:
        out[:] = part == 1


def _can_stratify(labels: np.ndarray, min_per_class: int = 2) -> bool:
    _, counts = np.unique(labels, return_counts=True)
    return len(counts) > 1 and counts.min() >= min_per_class
