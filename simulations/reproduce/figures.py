"""The plots of a reproduction: the primary metric by row and mode (or along the sweep), ROC
curves of the first repeat in each mode, and predicted against actual grades (matplotlib, PNG).

An epsilon sweep draws the privacy-utility frontier (``frontier.png``): each DP row's mean over
its seeds with a band of ± one sd, the centralized rows without DP as horizontal bands (mean ±
sd) and the federated ones without DP as dotted lines.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from simulations import plots  # sets matplotlib's file-only backend before pyplot loads
from simulations.reproduce.config import HEADS, METRIC_LABELS, mode_label
from simulations.reproduce.pipeline import Reproduction
from simulations.reproduce.stats import Summary, frontier, ordered, series, summarize


def draw_figures(rep: Reproduction) -> list[Path]:
    """Write every figure into ``rep.out_dir``; their paths, in the order to show them."""
    cfg, out = rep.config, rep.out_dir
    metric = cfg.primary_metric
    made: list[Path] = []
    if cfg.sweep is None:
        bars: dict[str, dict[str, tuple[float, float | None]]] = {}
        for (_, mode, eps, row), outs in ordered(rep):
            s = summarize(o.scored.metrics.get(metric) for o in outs)
            if s.mean is not None:
                bars.setdefault(row, {})[mode_label(mode, eps)] = (s.mean, s.sd)
        if bars:
            made.append(
                plots.grouped_points(bars, out / "metrics.png", METRIC_LABELS[metric], cfg.title)
            )
    elif cfg.sweep == "epsilon":
        drawn = draw_frontier(rep, out / "frontier.png")
        made += [drawn] if drawn is not None else []
    else:
        by_x = series(rep)
        if by_x:
            xs = sorted({x for s in by_x.values() for x in s})
            lines = {name: _line(s, xs) for name, s in by_x.items()}
            made.append(
                plots.sweep_lines(
                    xs, lines, out / "sweep.png", "cut-off week", METRIC_LABELS[metric], cfg.title
                )
            )
    made += _score_plots(rep)
    return made


def draw_frontier(rep: Reproduction, path: Path) -> Path | None:
    """The privacy-utility frontier of ``rep`` into ``path``; None without a DP point."""
    import matplotlib.pyplot as plt

    from shared_models.atomic import write_atomic

    front = frontier(rep)
    if not front.points:
        return None
    xs = sorted({p.epsilon for p in front.points})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colour = 0
    for row in dict.fromkeys(p.row for p in front.points):
        points = sorted(
            (p for p in front.points if p.row == row and p.summary.mean is not None),
            key=lambda p: p.epsilon,
        )
        if not points:
            continue
        x = [p.epsilon for p in points]
        mean = np.array([p.summary.mean for p in points], dtype=float)
        sd = np.array([p.summary.sd or 0.0 for p in points], dtype=float)
        c = f"C{colour}"
        colour += 1
        n = max(p.summary.n for p in points)
        ax.plot(x, mean, marker="o", c=c, label=f"federated + DP: {row} ({n} seeds)")
        ax.fill_between(x, mean - sd, mean + sd, color=c, alpha=0.2, lw=0)
    for row, ref in front.references.items():
        assert ref.mean is not None
        c = f"C{colour}"
        colour += 1
        ax.axhline(ref.mean, c=c, ls="--", lw=1, label=f"centralized, no DP: {row} ({ref.n} seeds)")
        ax.axhspan(ref.mean - (ref.sd or 0.0), ref.mean + (ref.sd or 0.0), color=c, alpha=0.12)
    for row, fed in front.federated.items():
        assert fed.mean is not None
        ax.axhline(fed.mean, c=f"C{colour}", ls=":", lw=1.2,
                   label=f"federated, no DP: {row} ({fed.n} seeds)")  # fmt: skip
        colour += 1
    declined = sorted({p.epsilon for p in front.points if p.summary.mean is None and p.declined})
    for eps in declined:  # no score to draw: say why the point is missing
        ax.axvline(eps, c="0.6", ls="-.", lw=0.8)
        ax.text(eps, 0.5, " every institution declined", rotation=90, fontsize=7, color="0.4",
                va="center", ha="right", transform=ax.get_xaxis_transform())  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.minorticks_off()
    ax.set(
        xlabel="epsilon per institution (whole run, delta fixed)",
        ylabel=METRIC_LABELS[rep.config.primary_metric],
        title=f"Privacy-utility, --dataset {rep.dataset}: mean ± sd over seeds",
    )
    ax.legend(fontsize=7, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def _line(series: dict[float, Summary], xs: list[float]) -> tuple[list[float], list[float]]:
    """Means (NaN where missing) and sds (0 where missing) of ``series`` at ``xs``."""
    means = [(series[x].mean if x in series else None) for x in xs]
    sds = [(series[x].sd if x in series else None) for x in xs]
    return [math.nan if m is None else m for m in means], [s or 0.0 for s in sds]


def _score_plots(rep: Reproduction) -> list[Path]:
    """ROC curves per mode and a predicted-vs-actual scatter, from the first repeat."""
    cfg, made = rep.config, []
    last_week = max((o.week or 0 for o in rep.outcomes), default=0) or None
    first = [o for o in rep.outcomes if o.repeat == 0 and o.week == last_week]
    if "risk" in HEADS[cfg.target]:
        for mode in rep.modes:
            outs = [o for o in first if o.mode == mode and "prob" in o.scored.scores]
            eps = max((o.epsilon for o in outs if o.epsilon is not None), default=None)
            outs = [o for o in outs if o.epsilon in (None, eps)]
            if not outs:
                continue
            y = outs[0].scored.scores["at_risk"]
            scores = {o.label: o.scored.scores["prob"] for o in outs
                      if len(o.scored.scores["prob"]) == len(y)}  # fmt: skip
            title = f"At-risk ROC, {mode_label(mode, eps)}, repeat 1"
            made.append(plots.roc_curves(y, scores, rep.out_dir / f"roc_{mode}.png", title))
    if "grade" in HEADS[cfg.target]:
        ref = cfg.paired_test.reference if cfg.paired_test else cfg.models[0].label
        for o in first:
            if o.mode == "centralized" and o.label == ref and "grade_pred" in o.scored.scores:
                made.append(
                    plots.predicted_vs_actual(
                        o.scored.scores["grade"], o.scored.scores["grade_pred"],
                        rep.out_dir / "grade_scatter.png", "contract scale",
                        f"{ref}, centralized, repeat 1",
                    )
                )  # fmt: skip
                break
    return made
