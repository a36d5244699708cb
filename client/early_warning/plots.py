"""The advisor report's figures, embedded in the page: PNG as base64 data URIs, sparklines as SVG.

Nothing is written to disk and nothing references a network asset, so the report stays one
self-contained file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import numpy as np
from matplotlib.figure import Figure

from client.early_warning.scoring import TIERS, RiskThresholds, assign_tiers

#: Tier colours (colour-blind safe: blue, orange, vermillion), shared by plots, table and CSS.
TIER_COLOURS: dict[str, str] = {"low": "#0072b2", "moderate": "#e69f00", "high": "#d55e00"}


def _data_uri(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def probability_histogram(probability: np.ndarray, thresholds: RiskThresholds) -> str:
    """Distribution of P(at risk), bars coloured by tier, threshold lines marked."""
    fig = Figure(figsize=(4.4, 2.8))
    ax = fig.subplots()
    edges = np.linspace(0.0, 1.0, 41)
    counts, _ = np.histogram(probability, bins=edges)
    centres = (edges[:-1] + edges[1:]) / 2
    colours = [TIER_COLOURS[t] for t in assign_tiers(centres, thresholds)]
    ax.bar(centres, counts, width=edges[1] - edges[0], color=colours, edgecolor="white", lw=0.4)
    for cut in (thresholds.moderate, thresholds.high):
        ax.axvline(cut, color="#333", ls="--", lw=0.8)
    ax.set(xlabel="P(at risk)", ylabel="students", xlim=(0, 1), title="Risk distribution")
    ax.spines[["top", "right"]].set_visible(False)
    return _data_uri(fig)


def tier_shares_by_group(groups: Mapping[str, Mapping[str, int]]) -> str:
    """Horizontal stacked bars: share of each tier within each group (e.g. program)."""
    names = list(groups)
    fig = Figure(figsize=(4.4, 0.3 * len(names) + 1.4))
    ax = fig.subplots()
    left = np.zeros(len(names))
    totals = np.array([max(sum(groups[g].values()), 1) for g in names], dtype=float)
    for tier in TIERS:
        share = np.array([groups[g].get(tier, 0) for g in names]) / totals
        ax.barh(names, share, left=left, color=TIER_COLOURS[tier], label=tier)
        left += share
    labels = [f"{g} (n={int(t)})" for g, t in zip(names, totals, strict=True)]
    ax.set_yticks(range(len(names)), labels)
    ax.invert_yaxis()
    ax.set(xlabel="share of students", xlim=(0, 1), title="Risk tiers by program")
    ax.legend(ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _data_uri(fig)


def tier_shares_by_week(
    trajectory: np.ndarray, thresholds: RiskThresholds, *, period: str = "week"
) -> str:
    """Stacked areas: share of the cohort in each tier as scored after each period so far."""
    weeks = np.arange(1, trajectory.shape[1] + 1)
    tiers = assign_tiers(trajectory, thresholds)
    shares = {tier: (tiers == tier).mean(axis=0) for tier in TIERS}
    fig = Figure(figsize=(4.4, 2.8))
    ax = fig.subplots()
    ax.stackplot(weeks, *shares.values(), labels=list(shares), colors=list(TIER_COLOURS.values()))
    ax.plot(weeks, trajectory.mean(axis=0), color="black", lw=1.5, label="mean P(at risk)")
    ax.set(xlabel=f"scored after {period}", ylabel="share of students", ylim=(0, 1))
    ax.set(xlim=(weeks[0], max(weeks[-1], weeks[0] + 1)), title=f"Risk by {period} of the term")
    ax.legend(ncols=2, loc="upper center", bbox_to_anchor=(0.5, -0.22), frameon=False, fontsize=8)
    return _data_uri(fig)


def sparkline(
    values: np.ndarray,
    *,
    low: float = 0.0,
    high: float = 1.0,
    colour: str = "#333",
    title: str = "",
    marks: tuple[float, ...] = (),
    width: int = 96,
    height: int = 22,
) -> str:
    """A tiny inline SVG line of ``values`` (one per week) on the scale [low, high].

    Missing weeks (NaN) are skipped; ``marks`` draws faint horizontal reference lines.
    """
    n = len(values)
    span = (high - low) or 1.0

    def y(v: float) -> float:
        return round(height - 2 - (height - 4) * (min(max(v, low), high) - low) / span, 1)

    def x(i: int) -> float:
        return round(2 + (width - 4) * (i / max(n - 1, 1)), 1)

    points = " ".join(f"{x(i)},{y(float(v))}" for i, v in enumerate(values) if not np.isnan(v))
    lines = "".join(
        f'<line x1="0" x2="{width}" y1="{y(m)}" y2="{y(m)}" stroke="#ccc" stroke-dasharray="2 2"/>'
        for m in marks
    )
    last = [(i, float(v)) for i, v in enumerate(values) if not np.isnan(v)][-1:]
    dot = "".join(f'<circle cx="{x(i)}" cy="{y(v)}" r="2" fill="{colour}"/>' for i, v in last)
    return (
        f'<svg class="spark" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>'
        f'{lines}<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>'
        f"{dot}</svg>"
    )


def reliability_diagram(raw: Mapping[str, Any], calibrated: Mapping[str, Any]) -> str:
    """Observed at-risk rate against mean predicted probability per bin, raw and calibrated.

    ``raw`` and ``calibrated`` are `calibration.Reliability` as stored in ``calibration.json``;
    marker area follows the bin's number of students.
    """
    fig = Figure(figsize=(4.4, 3.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=0.8, label="perfect calibration")
    styles = (("raw model", raw, "#999999", "s"), ("calibrated", calibrated, "#009e73", "o"))
    for label, rel, colour, marker in styles:
        sizes = 12 + 4 * np.asarray(rel["count"], dtype=float)
        ax.plot(rel["predicted"], rel["observed"], color=colour, lw=1)
        ax.scatter(
            rel["predicted"],
            rel["observed"],
            s=sizes,
            color=colour,
            marker=marker,
            label=f"{label} (ECE {rel['ece']:.3f})",
            zorder=3,
        )
    ax.set(xlabel="predicted P(at risk)", ylabel="observed at-risk rate", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"Reliability on the test split (n={int(calibrated['n'])})")
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _data_uri(fig)
