"""A node's labelled records as training sees them: split 70/15/15 by student and normalised.

The same arguments always give the same splits, so the node, a centralized baseline pooling the
institutions' splits, adoption of the global model and the membership auditor all see exactly
the students the node trained on. Normalisation comes from the contract's constants by default,
so preprocessing depends on no student's data (see `Normalizer`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared_models.data.cohort import CohortArrays, ModelInputs, Normalizer
from shared_models.data.contract import FeatureSpec
from shared_models.data.loader import load_cohort
from shared_models.data.splits import split_cohort

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
    cohort = load_cohort(data_path, spec, institution=institution)
    split = split_cohort(cohort, seed=seed)
    name = str(cohort.institution[0]) if len(cohort.institution) else Path(data_path).name
    return NodeSplits(
        name, cohort.subset(split.train), cohort.subset(split.val), cohort.subset(split.test)
    )


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
