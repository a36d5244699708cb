"""A node's labelled records as training sees them: split 70/15/15 by student and normalised.

The same arguments always give the same splits, so the node, a centralized baseline pooling the
institutions' splits, adoption of the global model and the membership auditor all see exactly
the students the node trained on. Normalisation comes from the contract's constants by default,
so preprocessing depends on no student's data (see `Normalizer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared_models.data.cohort import CohortArrays, ModelInputs, Normalizer
from shared_models.data.contract import FeatureSpec
from shared_models.data.loader import load_cohort
from shared_models.data.splits import split_cohort
from shared_models.data.stamp import export_stamp

logger = logging.getLogger(__name__)

#: ``contract``: clamps and scales from the contract (inside the privacy guarantee, the default);
#: ``train-zscore``: z-scores of the node's own train split (the former behaviour, for comparison).
Normalization = Literal["contract", "train-zscore"]


@dataclass(frozen=True)
class NodeData:
    """One institution's labelled records, split 70/15/15 by student and normalised.

    Attributes:
        institution: the export's institution name (its folder name by default).
        train, val, test: model inputs of each split.
    """

    institution: str
    train: ModelInputs
    val: ModelInputs
    test: ModelInputs

    @property
    def shapes(self) -> tuple[int, int, int]:
        """``(n_weeks, n_dynamic, n_static)`` fixed by the data contract."""
        _, weeks, n_dynamic = self.train.dynamic.shape
        return int(weeks), int(n_dynamic), int(self.train.static.shape[1])


@dataclass(frozen=True)
class NodeSplits:
    """One export's labelled records split 70/15/15, still raw (unnormalised)."""

    institution: str
    train: CohortArrays
    val: CohortArrays
    test: CohortArrays


def split_node(
    data_path: Path | str, spec: FeatureSpec, *, seed: int = 0, institution: str | None = None
) -> NodeSplits:
    """Load one export and split it; the same arguments always give the same splits.

    A centralized baseline pools exactly these splits, so it is compared on the same students.

    Raises:
        DataContractError: the export does not satisfy the contract.
    """
    cohort = cached_cohort(data_path, spec, institution=institution)
    split = split_cohort(cohort, seed=seed)
    name = str(cohort.institution[0]) if len(cohort.institution) else Path(data_path).name
    return NodeSplits(
        name, cohort.subset(split.train), cohort.subset(split.val), cohort.subset(split.test)
    )


#: Validated exports by (folder, spec fingerprint, institution), each with the stamp of the
#: files it was read from (`stamp.export_stamp`). Splitting is per seed, reading is not: a
#: reproduction's jobs (3-5 seeds, several models) and a simulation's nodes read each export once.
_cohorts: dict[tuple[str, str, str | None], tuple[tuple[Any, ...], CohortArrays]] = {}
_KEEP_COHORTS = 4


def cached_cohort(
    data_path: Path | str, spec: FeatureSpec, *, institution: str | None = None
) -> CohortArrays:
    """`load_cohort` of the export at ``data_path``, read again only when one of its files changed.

    The cohort returned is shared between callers, so its arrays are read-only (`split_node`
    takes copies of its rows); a caller that writes to one gets numpy's "read-only" error.

    Raises:
        DataContractError: the export does not satisfy the contract.
    """
    folder = Path(data_path)
    key = (str(folder.resolve()), spec.fingerprint, institution)
    stamp = export_stamp(folder)  # taken before reading: a file changed meanwhile is read again
    cached = _cohorts.get(key)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    cohort = load_cohort(folder, spec, institution=institution)
    for f in fields(cohort):
        value = getattr(cohort, f.name)
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    _cohorts.pop(key, None)
    _cohorts[key] = (stamp, cohort)
    while len(_cohorts) > _KEEP_COHORTS:
        del _cohorts[next(iter(_cohorts))]
    return cohort


def clear_cohorts() -> None:
    """Forget the cached exports (`cached_cohort`)."""
    _cohorts.clear()


def node_normalizer(
    spec: FeatureSpec, train: CohortArrays, normalization: Normalization = "contract"
) -> Normalizer:
    """The normaliser a node uses: the contract's, or z-scores of its ``train`` split.

    Raises:
        DataContractError: ``contract`` and a feature lacks a range in the contract.
    """
    if normalization == "contract":
        return Normalizer.from_contract(spec)
    if normalization == "train-zscore":
        return Normalizer(spec.target.grade_min, spec.target.grade_max).fit(train)
    raise ValueError(f"normalization must be 'contract' or 'train-zscore', not {normalization!r}")


def prepare_node_data(
    data_path: Path | str,
    spec: FeatureSpec,
    *,
    seed: int = 0,
    institution: str | None = None,
    normalization: Normalization = "contract",
) -> NodeData:
    """`split_node`, normalised as `node_normalizer` says.

    Raises:
        DataContractError: the export does not satisfy the contract, or the contract lacks a
            range that ``contract`` normalisation needs.
    """
    splits = split_node(data_path, spec, seed=seed, institution=institution)
    normalizer = node_normalizer(spec, splits.train, normalization)
    logger.info(
        "%s: %d train, %d val, %d test records (%s normalisation)",
        splits.institution,
        len(splits.train),
        len(splits.val),
        len(splits.test),
        normalization,
    )
    return NodeData(
        institution=splits.institution,
        train=normalizer.transform(splits.train),
        val=normalizer.transform(splits.val),
        test=normalizer.transform(splits.test),
    )
