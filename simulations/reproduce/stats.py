"""Summaries and paired tests of a reproduction's repeated results, grouped by row and mode.

The CNN-LSTM paper compares its hybrid with the baselines by a paired t-test. Here the pairs are
the repeats (seeds or folds) of centralized training: every row of one repeat is scored on the
same test students, so the per-repeat differences are paired. Random splits of one dataset
overlap, which makes the plain paired t-test too optimistic (Dietterich 1998); the table also
gives Nadeau and Bengio's (2003) corrected resampled t-test, which inflates the variance by
``1 / J + n_test / n_train`` for ``J`` repeats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats

from simulations.reproduce.runs import Outcome

if TYPE_CHECKING:
    from simulations.reproduce.pipeline import Reproduction


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation of a metric over repeats."""

    mean: float | None
    sd: float | None  # None for a single value
    n: int

    def cell(self, digits: int = 3) -> str:
        """``0.812 ± 0.021``, ``0.812`` for one value, ``n/a`` for none."""
        if self.mean is None:
            return "n/a"
        text = f"{self.mean:.{digits}f}"
        return text if self.sd is None else f"{text} ± {self.sd:.{digits}f}"


def summarize(values: Iterable[float | None]) -> Summary:
    """The summary of the defined values (``None`` and NaN are left out)."""
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not kept:
        return Summary(None, None, 0)
    sd = float(np.std(kept, ddof=1)) if len(kept) > 1 else None
    return Summary(float(np.mean(kept)), sd, len(kept))


@dataclass(frozen=True)
class PairedResult:
    """One paired comparison of ``reference`` against ``other`` on one metric."""

    reference: str
    other: str
    metric: str
    n: int  # pairs (repeats where both values are defined)
    mean_difference: float | None  # reference minus other
    t: float | None
    p: float | None  # two-sided paired t-test
    p_corrected: float | None  # two-sided, Nadeau-Bengio corrected resampled t-test


def paired_t_test(
    reference: Sequence[float | None],
    other: Sequence[float | None],
    *,
    test_to_train: float,
    names: tuple[str, str, str] = ("reference", "other", "metric"),
) -> PairedResult:
    """Paired two-sided t-tests of ``reference - other`` over repeats.

    Args:
        reference, other: the metric of each repeat, aligned; pairs with a None are dropped.
        test_to_train: test records over training records of one repeat (the correction term).
        names: reference and other row names and the metric name, for the result.
    """
    pairs = [
        (float(a), float(b))
        for a, b in zip(reference, other, strict=True)
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
    ]
    n = len(pairs)
    if n == 0:
        return PairedResult(*names, 0, None, None, None, None)
    diff = np.array([a - b for a, b in pairs])
    mean = float(diff.mean())
    if n < 2:
        return PairedResult(*names, n, mean, None, None, None)
    var = float(diff.var(ddof=1))
    if var <= 1e-12 * max(1.0, mean * mean):  # identical differences (up to rounding): no test
        return PairedResult(*names, n, mean, None, None, None)
    t = mean / math.sqrt(var / n)
    p = float(2 * stats.t.sf(abs(t), df=n - 1))
    t_corrected = mean / math.sqrt(var * (1.0 / n + test_to_train))
    p_corrected = float(2 * stats.t.sf(abs(t_corrected), df=n - 1))
    return PairedResult(*names, n, mean, t, p, p_corrected)


Key = tuple[int | None, str, float | None, str]  # week, mode, epsilon, row


def groups(outcomes: Iterable[Outcome]) -> dict[Key, list[Outcome]]:
    """Outcomes by (week, mode, epsilon, row), in the order they ran."""
    out: dict[Key, list[Outcome]] = {}
    for o in outcomes:
        out.setdefault((o.week, o.mode, o.epsilon, o.label), []).append(o)
    return out


def ordered(rep: Reproduction) -> list[tuple[Key, list[Outcome]]]:
    """Groups sorted by week, mode (as run), epsilon and the config's row order."""
    order = {r: i for i, r in enumerate(rep.config.row_labels)}
    modes = {m: i for i, m in enumerate(rep.modes)}

    def key(item: tuple[Key, list[Outcome]]) -> tuple[int, int, float, int]:
        week, mode, eps, row = item[0]
        return week or 0, modes.get(mode, 9), math.inf if eps is None else eps, order.get(row, 99)

    return sorted(groups(rep.outcomes).items(), key=key)


def series(rep: Reproduction) -> dict[str, dict[float, Summary]]:
    """Primary metric by sweep value, one series per mode and row."""
    cfg = rep.config
    out: dict[str, dict[float, Summary]] = {}
    for (week, mode, eps, row), outs in ordered(rep):
        x = week if cfg.sweep == "week" else eps
        if x is None:
            continue
        name = f"{mode}: {row}"
        out.setdefault(name, {})[float(x)] = summarize(
            o.scored.metrics.get(cfg.primary_metric) for o in outs
        )
    return out


@dataclass(frozen=True)
class FrontierPoint:
    """One DP row at one epsilon, against the centralized model without DP."""

    row: str
    epsilon: float
    summary: Summary  # the primary metric over the federated-dp seeds that trained
    ratio: float | None  # summary.mean / reference.mean; None without a reference or mean
    declined: int = 0  # seeds whose every institution declined round 1 (nothing trained)


@dataclass(frozen=True)
class Frontier:
    """The privacy-utility frontier of an epsilon sweep: every DP row at every epsilon.

    The reference is the centralized model without DP: ``row``'s own centralized row when it
    has one, else the first centralized model row (``reference_row``), the model a consortium
    could train if it pooled its data without privacy.
    """

    reference_row: str | None
    references: dict[str, Summary]  # centralized, no DP, by row
    federated: dict[str, Summary]  # federated, no DP, by row
    points: list[FrontierPoint]

    def reference_for(self, row: str) -> tuple[str, Summary] | None:
        """The centralized non-DP row ``row`` is measured against, and its summary."""
        if row in self.references:
            return row, self.references[row]
        if self.reference_row is not None:
            return self.reference_row, self.references[self.reference_row]
        return None


def frontier(rep: Reproduction) -> Frontier:
    """The frontier of the last (or only) cut-off week, by the config's row order."""
    cfg = rep.config
    metric = cfg.primary_metric
    found = ordered(rep)
    weeks = [k[0] for k, _ in found]
    week = max(weeks, key=lambda w: -1 if w is None else w) if weeks else None
    references: dict[str, Summary] = {}
    federated: dict[str, Summary] = {}
    dp: list[tuple[str, float, Summary, int]] = []
    for (w, mode, eps, row), outs in found:
        if w != week:
            continue
        summary = summarize(o.scored.metrics.get(metric) for o in outs)
        if mode == "federated-dp" and eps is not None:
            declined = sum("declined" in o.scored.details for o in outs)
            dp.append((row, float(eps), summary, declined))
        elif summary.mean is None:
            continue
        elif mode == "centralized" and eps is None:
            references[row] = summary
        elif mode == "federated" and eps is None:
            federated[row] = summary
    models = [m.label for m in cfg.models if m.label in references]
    reference_row = models[0] if models else None
    if cfg.paired_test is not None and cfg.paired_test.reference in references:
        reference_row = cfg.paired_test.reference
    out = Frontier(reference_row, references, federated, [])
    for row, eps, summary, declined in dp:
        ref = out.reference_for(row)
        ratio = None
        if ref is not None and ref[1].mean and summary.mean is not None:
            ratio = summary.mean / ref[1].mean
        out.points.append(FrontierPoint(row, eps, summary, ratio, declined))
    return out
