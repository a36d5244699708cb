"""A node's labelled records as training sees them: split 70/15/15 and normalised.

The same arguments always give the same splits, so the node, a centralized baseline pooling the
institutions' splits, adoption of the global model and the membership auditor all see exactly
the students the node trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from shared_models.data.cohort import CohortArrays, ModelInputs, Normalizer
from shared_models.data.contract import FeatureSpec
from shared_models.data.loader import load_cohort
from shared_models.data.splits import split_cohort

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeData:
    """One institution's labelled records, split 70/15/15 and normalised with its own train split.

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


def prepare_node_data(
    data_path: Path | str, spec: FeatureSpec, *, seed: int = 0, institution: str | None = None
) -> NodeData:
    """`split_node`, normalised with statistics of the node's own train split only.

    Raises:
        DataContractError: the export does not satisfy the contract.
    """
    splits = split_node(data_path, spec, seed=seed, institution=institution)
    normalizer = Normalizer(spec.target.grade_min, spec.target.grade_max).fit(splits.train)
    logger.info(
        "%s: %d train, %d val, %d test records",
        splits.institution,
        len(splits.train),
        len(splits.val),
        len(splits.test),
    )
    return NodeData(
        institution=splits.institution,
        train=normalizer.transform(splits.train),
        val=normalizer.transform(splits.val),
        test=normalizer.transform(splits.test),
    )
