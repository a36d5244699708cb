"""The plots of a reproduction: the primary metric by row and mode (or along the sweep), ROC
curves of the first repeat in each mode, and predicted against actual grades (matplotlib, PNG).
"""

from __future__ import annotations

import math
from pathlib import Path

from simulations import plots
from simulations.reproduce.config import HEADS, METRIC_LABELS, mode_label
from simulations.reproduce.pipeline import Reproduction
from simulations.reproduce.stats import Summary, ordered, series, summarize


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
    else:
        by_x = series(rep)
        levels = {}
        if cfg.sweep == "epsilon":
            for (_, mode, eps, row), outs in ordered(rep):
                s = summarize(o.scored.metrics.get(metric) for o in outs)
                if eps is None and s.mean is not None:
                    levels[f"{mode}, no DP: {row}"] = s.mean
        if by_x:
            xs = sorted({x for s in by_x.values() for x in s})
            lines = {name: _line(s, xs) for name, s in by_x.items()}
            xlabel = "cut-off week" if cfg.sweep == "week" else "epsilon per institution"
            made.append(
                plots.sweep_lines(
                    xs, lines, out / "sweep.png", xlabel, METRIC_LABELS[metric], cfg.title,
                    log_x=cfg.sweep == "epsilon", levels=levels,
                )
            )  # fmt: skip
    made += _score_plots(rep)
    return made


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
