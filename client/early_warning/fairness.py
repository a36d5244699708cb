"""Fairness by group: how the risk model serves each group of a protected attribute.

For every static attribute the data contract marks ``protected = true`` (gender, disability,
socio-economic band, age band...), each group gets its size, at-risk base rate, ROC-AUC, recall
and false-positive rate at the tier thresholds, and calibration (mean predicted vs observed rate,
expected calibration error). ABROCA (Gardner, Brooks & Baker, LAK 2019) is the area between the
group's ROC curve and the ROC curve of **the rest of the students** (everyone not in the group;
for a two-group attribute that is the other group), on a common false-positive-rate grid. A
permutation test (group labels shuffled, seeded) says how often an ABROCA that large arises by
chance at these group sizes: ABROCA is skewed upwards for small groups (Borchers & Baker 2024),
so a raw value means little without the group's n and the p-value. Groups under `MIN_GROUP`
records, or without both outcomes, are flagged as too small to judge.

Computed on labelled held-out records only (an institution's test split; a reproduction's test
students): on training records every gap would be understated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from client.early_warning.calibration import expected_calibration_error
from shared_models.data.cohort import CohortArrays
from shared_models.data.contract import FeatureSpec
from shared_models.data.node import split_node
from shared_models.errors import EduflError

if TYPE_CHECKING:
    from client.early_warning.pipeline import EarlyWarning

logger = logging.getLogger(__name__)

#: Fewer records than this in a group (or in the rest) and its gaps are too noisy to judge.
MIN_GROUP = 30
#: The tier thresholds recall and FPR are reported at: "moderate or higher" and "high".
CUTS: tuple[tuple[str, float], ...] = (("moderate+", 0.40), ("high", 0.70))
#: Label of records whose value of the attribute is missing.
UNKNOWN = "unknown"
#: Common false-positive-rate grid ABROCA integrates over.
_GRID = np.linspace(0.0, 1.0, 1001)


@dataclass(frozen=True)
class GroupFairness:
    """One group of one protected attribute; None where a metric is undefined for the group.

    Attributes:
        recall, fpr: at each of `CUTS` (P(at risk) >= cut counts as flagged).
        ece: expected calibration error over 10 equal-width probability bins.
        abroca: area between this group's ROC curve and the rest's (0 = identical curves).
        abroca_p: permutation p-value of ``abroca`` (shuffled group labels).
        note: why the group is too small to judge, or "".
    """

    attribute: str
    group: str
    n: int
    positives: int
    base_rate: float | None
    roc_auc: float | None
    recall: dict[str, float | None]
    fpr: dict[str, float | None]
    mean_predicted: float | None
    ece: float | None
    abroca: float | None
    abroca_p: float | None
    note: str


@dataclass(frozen=True)
class AttributeFairness:
    """Every group of one protected attribute, and each group's ROC curve (for plots)."""

    attribute: str
    groups: tuple[GroupFairness, ...]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]  # group -> (fpr, tpr)

    def to_json(self) -> dict[str, Any]:
        return {"attribute": self.attribute, "groups": [asdict(g) for g in self.groups]}


def protected_attributes(spec: FeatureSpec) -> tuple[str, ...]:
    """Names of the static attributes the contract marks protected."""
    return tuple(a.name for a in spec.static if a.protected)


def protected_groups(cohort: CohortArrays, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Each record's group for every protected attribute (`UNKNOWN` where missing).

    A categorical attribute's group is its category; a numeric one's is its value (e.g. age 17).
    """
    out: dict[str, np.ndarray] = {}
    names = list(cohort.static_names)
    for attr in spec.static:
        if not attr.protected:
            continue
        if attr.kind == "categorical":
            cols = [names.index(n) for n in attr.encoded_names if n in names]
            onehot = np.nan_to_num(cohort.static[:, cols])
            cats = np.array([names[j].split("=", 1)[1] for j in cols], dtype=object)
            seen = onehot.max(axis=1) > 0 if cols else np.zeros(len(cohort), dtype=bool)
            labels = cats[onehot.argmax(axis=1)] if cols else np.full(len(cohort), UNKNOWN)
            out[attr.name] = np.where(seen, labels, UNKNOWN).astype(object)
        elif attr.name in names:
            values = cohort.static[:, names.index(attr.name)]
            out[attr.name] = np.array(
                [UNKNOWN if np.isnan(v) else f"{v:g}" for v in values], dtype=object
            )
    return out


def fairness_by_group(
    at_risk: np.ndarray,
    probability: np.ndarray,
    groups: Mapping[str, np.ndarray],
    *,
    cuts: Sequence[tuple[str, float]] = CUTS,
    n_permutations: int = 1000,
    seed: int = 0,
) -> list[AttributeFairness]:
    """Per-group metrics of every attribute in ``groups`` (labels aligned with ``at_risk``).

    Records with an unknown outcome (NaN ``at_risk``) are left out.
    """
    y_all = np.asarray(at_risk, dtype=np.float64)
    keep = ~np.isnan(y_all)
    y = y_all[keep].astype(bool)
    p = np.asarray(probability, dtype=np.float64)[keep]
    rng = np.random.default_rng(seed)
    results = []
    for attribute, labels in groups.items():
        labels = np.asarray(labels, dtype=object)[keep]
        rows, curves = [], {}
        names = sorted(set(labels.tolist()), key=lambda g: (g == UNKNOWN, _natural(g)))
        done: dict[frozenset[str], tuple[float | None, float | None]] = {}
        for group in names:
            member = labels == group
            rows.append(_group(attribute, group, y, p, member, cuts))
            if _both_classes(y[member]):
                curves[group] = roc_curve(y[member], p[member])[:2]
            rest = set(names) - {group}
            # With two groups, "A vs the rest" and "B vs the rest" are the same comparison.
            key = frozenset({group}) if len(rest) != 1 else frozenset(names)
            if key not in done:
                done[key] = _abroca_test(y, p, member, n_permutations, rng)
            score, pvalue = done[key]
            rows[-1] = _replace(rows[-1], abroca=score, abroca_p=pvalue)
        results.append(AttributeFairness(attribute, tuple(rows), curves))
    return results


def abroca(y: np.ndarray, probability: np.ndarray, member: np.ndarray) -> float | None:
    """ABROCA of the records in ``member`` against the rest (None without both outcomes)."""
    y, member = np.asarray(y, dtype=bool), np.asarray(member, dtype=bool)
    if not (_both_classes(y[member]) and _both_classes(y[~member])):
        return None
    fpr_a, tpr_a, _ = roc_curve(y[member], probability[member])
    fpr_b, tpr_b, _ = roc_curve(y[~member], probability[~member])
    gap = np.abs(np.interp(_GRID, fpr_a, tpr_a) - np.interp(_GRID, fpr_b, tpr_b))
    return float(np.trapezoid(gap, _GRID))


def _group(
    attribute: str,
    group: str,
    y: np.ndarray,
    p: np.ndarray,
    member: np.ndarray,
    cuts: Sequence[tuple[str, float]],
) -> GroupFairness:
    yg, pg = y[member], p[member]
    n, pos = int(member.sum()), int(yg.sum())
    neg = n - pos
    notes = []
    if n < MIN_GROUP:
        notes.append(f"n < {MIN_GROUP}")
    if len(y) - n < MIN_GROUP:  # ABROCA compares with the rest, so its size matters too
        notes.append(f"other students n < {MIN_GROUP}")
    if pos == 0 or neg == 0:
        notes.append("no at-risk students" if pos == 0 else "no students not at risk")
    flagged = {name: pg >= cut for name, cut in cuts}
    return GroupFairness(
        attribute=attribute,
        group=str(group),
        n=n,
        positives=pos,
        base_rate=pos / n if n else None,
        roc_auc=float(roc_auc_score(yg, pg)) if _both_classes(yg) else None,
        recall={k: float((f & yg).sum() / pos) if pos else None for k, f in flagged.items()},
        fpr={k: float((f & ~yg).sum() / neg) if neg else None for k, f in flagged.items()},
        mean_predicted=float(pg.mean()) if n else None,
        ece=expected_calibration_error(pg, yg.astype(np.float64)).ece if n else None,
        abroca=None,
        abroca_p=None,
        note="too small to judge: " + ", ".join(notes) if notes else "",
    )


def _abroca_test(
    y: np.ndarray, p: np.ndarray, member: np.ndarray, n_permutations: int, rng: np.random.Generator
) -> tuple[float | None, float | None]:
    observed = abroca(y, p, member)
    if observed is None or n_permutations < 1:
        return observed, None
    null = _permuted_abrocas(y, p, member, n_permutations, rng)
    # +1 in both: the observed labelling is one of the permutations (Phipson & Smyth 2010).
    return observed, float((1 + np.sum(null >= observed - 1e-12)) / (1 + n_permutations))


def _permuted_abrocas(
    y: np.ndarray, p: np.ndarray, member: np.ndarray, n_permutations: int, rng: np.random.Generator
) -> np.ndarray:
    """ABROCA under shuffled group labels, the same statistic as `abroca`.

    Vectorised rather than calling ``roc_curve`` 2 x n_permutations times: records are sorted
    by score once, and each shuffled group's ROC points are cumulative counts at the distinct
    scores, which are exactly the points ``roc_curve(drop_intermediate=False)`` returns (the
    test suite checks this).
    """
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y[order], p[order]
    ends = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1]  # last index of each distinct score
    perms = np.stack([rng.permutation(member[order]) for _ in range(n_permutations)])
    out = np.empty(n_permutations)
    for k, m in enumerate(perms):
        curves = []
        for side in (m, ~m):
            tp = np.cumsum(ys & side)[ends]
            fp = np.cumsum(~ys & side)[ends]
            if tp[-1] == 0 or fp[-1] == 0:  # a side without both outcomes: no curve
                curves = []
                break
            fpr, tpr = np.r_[0.0, fp / fp[-1]], np.r_[0.0, tp / tp[-1]]
            curves.append(np.interp(_GRID, fpr, tpr))
        out[k] = np.trapezoid(np.abs(curves[0] - curves[1]), _GRID) if curves else 0.0
    return out


def _both_classes(y: np.ndarray) -> bool:
    return bool(len(y) and y.any() and not y.all())


def _replace(row: GroupFairness, **changes: Any) -> GroupFairness:
    return GroupFairness(**(asdict(row) | changes))


def _natural(group: str) -> tuple[float, str]:
    """Sort "0-10%" before "10-20%" and "17" before "9"... numerically where a number leads."""
    head = group.lstrip("<>= ").split("-")[0].rstrip("%<>=+ ")
    try:
        return float(head), group
    except ValueError:
        return float("inf"), group


def table_rows(result: AttributeFairness) -> list[list[str]]:
    """One row of display cells per group, in `TABLE_COLUMNS` order."""

    def num(v: float | None, spec: str = ".2f") -> str:
        return "-" if v is None else format(v, spec)

    rows = []
    for g in result.groups:
        abroca_cell = "-" if g.abroca is None else f"{g.abroca:.3f}"
        if g.abroca_p is not None:
            abroca_cell += f" (p={g.abroca_p:.3f})"
        rows.append(
            [
                g.group,
                str(g.n),
                num(g.base_rate, ".0%"),
                num(g.roc_auc),
                *(f"{num(g.recall[k])} / {num(g.fpr[k])}" for k in g.recall),
                f"{num(g.mean_predicted)} / {num(g.base_rate)}",
                num(g.ece, ".3f"),
                abroca_cell,
                g.note,
            ]
        )
    return rows


def table_columns(cuts: Sequence[tuple[str, float]] = CUTS) -> list[str]:
    """Headers of `table_rows`' cells."""
    return [
        "group",
        "n",
        "at risk",
        "ROC-AUC",
        *(f"recall / FPR at {cut:.2f} ({name})" for name, cut in cuts),
        "mean predicted / observed",
        "ECE",
        "ABROCA vs rest (p)",
        "note",
    ]


#: One sentence on reading the table, shared by the advisor report and reproductions.
EXPLANATION = (
    "Per group of each protected attribute: recall and false-positive rate count a student as "
    "flagged when P(at risk) reaches the tier threshold. ABROCA is the area between the "
    "group's ROC curve and that of all other students (0 = the model ranks both alike); p is "
    "a permutation test (group labels shuffled) and small groups inflate ABROCA (Borchers & "
    f"Baker 2024), so read it with n. Groups under {MIN_GROUP} students or without both "
    "outcomes are too small to judge."
)


def fairness_markdown(results: Sequence[AttributeFairness]) -> list[str]:
    """Markdown tables, one per attribute."""
    lines: list[str] = []
    cols = table_columns()
    for result in results:
        lines += [f"**{result.attribute}**", ""]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |"
                  for row in table_rows(result)]  # fmt: skip
        lines.append("")
    return lines


def fairness_html(results: Sequence[AttributeFairness], context: str) -> str:
    """The advisor report's fairness section; ``context`` says which students and scores."""
    import html

    esc = html.escape
    if not results:
        return f'<h2 id="fairness">Fairness by group</h2><p class="meta">{esc(context)}</p>'
    head = "".join(f"<th>{esc(c)}</th>" for c in table_columns())
    parts = [
        '<h2 id="fairness">Fairness by group</h2>',
        f'<p class="meta">{esc(context)} {esc(EXPLANATION)}</p>',
    ]
    for result in results:
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
            for row in table_rows(result)
        )
        figure = roc_figure(result)
        img = f'<img alt="ROC curves by {esc(result.attribute)}" src="{figure}">' if figure else ""
        parts.append(
            f'<h3>{esc(result.attribute)}</h3><div class="figs">{img}</div>'
            f'<table class="fairness" data-attribute="{esc(result.attribute)}">'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )
    return "\n".join(parts)


def roc_figure(result: AttributeFairness, max_groups: int = 12) -> str | None:
    """Each group's ROC curve on one plot, as a PNG data URI (None without curves)."""
    if not result.curves or len(result.curves) > max_groups:
        return None
    import base64
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0, 3.4))
    ax = fig.subplots()
    n = {g.group: g.n for g in result.groups}
    for group, (fpr, tpr) in result.curves.items():
        ax.plot(fpr, tpr, lw=1.2, label=f"{group} (n={n[group]})", drawstyle="default")
    ax.plot([0, 1], [0, 1], color="#999", ls=":", lw=0.8)
    ax.set(
        xlabel="false-positive rate",
        ylabel="recall (true-positive rate)",
        xlim=(0, 1),
        ylim=(0, 1),
        title=f"ROC by {result.attribute}",
    )
    ax.legend(fontsize=7, loc="lower right")
    ax.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def held_out_fairness(
    warning: EarlyWarning, *, seed: int = 0, n_permutations: int = 1000
) -> tuple[list[AttributeFairness], str]:
    """Fairness of a scoring run on the institution's labelled test split, and what was used.

    The test split is the one training held out (`shared_models.data.node.split_node`, same
    seed), matched to the scored records by (student_id, term); the probabilities are those the
    run scored (calibrated when the model carries a calibration). Returns no results, and a
    sentence saying why, when the contract marks nothing protected or no test student is labelled.
    """
    spec = warning.spec
    if not protected_attributes(spec):
        return [], f"Contract {spec.name!r} marks no attribute protected (protected = true)."
    try:
        test = split_node(Path(warning.info.data_dir), spec, seed=seed).test
    except (EduflError, OSError) as exc:
        logger.info("no fairness section: %s", exc)
        return [], f"No labelled test split to judge fairness on ({exc})."
    held_out = set(zip(test.student_ids.tolist(), test.terms.tolist(), strict=True))
    scores, cohort = warning.scores, warning.cohort
    keys = zip(scores.student_ids.tolist(), scores.terms.tolist(), strict=True)
    index = np.array([k in held_out for k in keys], dtype=bool)
    index &= ~np.isnan(cohort.at_risk)
    if not index.any():
        return [], "No scored student of the test split has a known outcome yet."
    sub = cohort.subset(np.flatnonzero(index))
    results = fairness_by_group(
        sub.at_risk,
        scores.probability[index],
        protected_groups(sub, spec),
        n_permutations=n_permutations,
        seed=seed,
    )
    context = (
        f"{int(index.sum())} labelled students of this institution's test split (held out "
        f"from training, split seed {seed}), scored after week {scores.observed_weeks} with "
        "the probabilities this report shows."
    )
    return results, context


def report_section(warning: EarlyWarning) -> str:
    """The advisor report's fairness section (HTML), from `held_out_fairness`.

    The split seed is the one the model's calibration recorded (the split training used),
    else 0, the federation's default.
    """
    calibration = getattr(warning, "calibration", None) or {}
    seed = int(calibration.get("fitted_on", {}).get("seed", 0))
    results, context = held_out_fairness(warning, seed=seed)
    return fairness_html(results, context)
