"""Fairness by protected group in a reproduction: the first repeat of each model row and mode.

The first repeat (seed 0) is used because a holdout experiment then scores centralized,
federated and federated-DP rows on the very same test students, so their group tables compare
like with like; pooling repeats would count a student once per seed. The per-group metrics and
ABROCA come from `client.early_warning.fairness`, the institution report's own code.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from client.early_warning.fairness import (
    EXPLANATION,
    AttributeFairness,
    GroupFairness,
    fairness_by_group,
    protected_groups,
    table_columns,
    table_rows,
)
from shared_models.data.cohort import CohortArrays
from shared_models.data.contract import FeatureSpec
from simulations.reproduce.config import mode_label
from simulations.reproduce.runs import Outcome, Scored

logger = logging.getLogger(__name__)

DETAIL = "fairness"  # the key in `Scored.details` (and so in results.json)


def attach(scored: Scored, test: CohortArrays, spec: FeatureSpec, seed: int) -> None:
    """Add the fairness of ``scored``'s test predictions to its details.

    ``test`` holds the scored test records in the same order (their raw static attributes
    name the groups). Nothing is added without a risk head or protected attributes.
    """
    prob, at_risk = scored.scores.get("prob"), scored.scores.get("at_risk")
    groups = protected_groups(test, spec)
    if prob is None or at_risk is None or not groups:
        return
    same = len(test) == len(at_risk) and np.array_equal(
        np.nan_to_num(test.at_risk, nan=-1), np.nan_to_num(at_risk, nan=-1)
    )
    if not same:  # a guard, not a case: both come from the same seeded split
        logger.warning("fairness skipped: test records and predictions are not aligned")
        return
    results = fairness_by_group(at_risk, prob, groups, seed=seed)
    scored.details[DETAIL] = [r.to_json() for r in results]


def markdown(outcomes: list[Outcome]) -> list[str]:
    """One table per protected attribute: each group's row for each mode (first repeat)."""
    found = [o for o in outcomes if o.repeat == 0 and DETAIL in o.scored.details]
    if not found:
        return []
    last_week = max((o.week or 0) for o in found)
    found = [o for o in found if (o.week or 0) == last_week]
    by_attr: dict[str, list[tuple[Outcome, AttributeFairness]]] = {}
    for o in found:
        for item in o.scored.details[DETAIL]:
            result = _rebuild(item)
            by_attr.setdefault(result.attribute, []).append((o, result))
    cols = table_columns()
    lines = [
        "## Fairness by group",
        "",
        "First repeat (seed 0) of each model row: every mode is scored on the same test "
        f"students. {EXPLANATION} Each ABROCA is one group against all other test students; "
        "p from 1,000 permutations.",
        "",
    ]
    for attribute, entries in by_attr.items():
        lines += [f"**{attribute}**", ""]
        head = [cols[0], "model", "mode", *cols[1:]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows = []
        for o, result in entries:
            for cells in table_rows(result):
                rows.append((cells[0], [cells[0], o.label, mode_label(o.mode, o.epsilon),
                                        *cells[1:]]))  # fmt: skip
        order = {g.group: k for k, g in enumerate(entries[0][1].groups)}
        rows.sort(key=lambda r: order.get(r[0], len(order)))  # stable: modes stay in run order
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for _, r in rows]
        lines.append("")
    return lines


def _rebuild(item: dict[str, Any]) -> AttributeFairness:
    groups = tuple(GroupFairness(**g) for g in item["groups"])
    return AttributeFairness(item["attribute"], groups, {})
