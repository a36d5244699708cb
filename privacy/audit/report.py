"""The auditor's budget report as markdown, JSON and a plot of epsilon over rounds."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from privacy.audit.budget import TOLERANCE, BudgetReport
from shared_models.atomic import write_atomic, write_atomic_many

REPORT_MD = "budget.md"
REPORT_JSON = "budget.json"
PLOT = "epsilon.png"


def _eps(value: float | None) -> str:
    if value is None or math.isinf(value):
        return "unbounded"
    return f"{value:.4f}"


def budget_markdown(report: BudgetReport) -> str:
    """Per-institution summary, then every round: claimed vs recomputed epsilon."""
    lines = [
        "# Privacy budget audit",
        "",
        "Epsilon recomputed with Google's dp-accounting (RDP claims: its RDP accountant; PRV "
        f"claims: its PLD accountant) from the recorded parameters; tolerance {TOLERANCE:.0%}.",
        "",
        "| institution | rounds | budget | claimed | recomputed | remaining | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in report.summaries:
        remaining = "-" if s.remaining is None else _eps(max(s.remaining, 0.0))
        lines.append(
            f"| {s.institution} | {s.rounds} | {_eps(s.budget)} | {_eps(s.claimed)} | "
            f"{_eps(s.recomputed)} | {remaining} | {'ok' if s.ok else 'FAILED'} |"
        )
    lines += [
        "",
        "| institution | run | round | seq | acct | sigma | q | steps | delta | claimed | "
        "recomputed | diff | budget | status |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report.rows:
        diff = (
            f"{(r.claimed - r.recomputed) / r.recomputed:+.2%}"
            if r.claimed is not None and 0 < r.recomputed < math.inf
            else "-"
        )
        delta = "-" if r.delta is None else f"{r.delta:.2g}"
        lines.append(
            f"| {r.institution} | {r.run_id} | {r.round} | {r.seq} | {r.accountant} | "
            f"{r.noise_multiplier:.4f} | {r.sample_rate:.4g} | {r.steps} | {delta} | "
            f"{_eps(r.claimed)} | {_eps(r.recomputed)} | {diff} | {_eps(r.budget)} | "
            f"{r.status} |"
        )
    return "\n".join(lines) + "\n"


def plot_epsilon(report: BudgetReport, path: Path) -> Path:
    """Claimed (line) and recomputed (crosses) epsilon per institution, budgets dashed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: _draw_epsilon(report, tmp))
    return path


def _draw_epsilon(report: BudgetReport, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    try:
        for k, summary in enumerate(report.summaries):
            rows = [
                r
                for r in report.rows
                if r.institution == summary.institution and r.claimed is not None
            ]
            if not rows:
                continue
            color = f"C{k % 10}"
            x = [r.seq + 1 for r in rows]
            claimed = [r.claimed for r in rows if r.claimed is not None]
            ax.plot(x, claimed, "o-", color=color, label=summary.institution)
            ax.plot(x, [r.recomputed for r in rows], "x", color=color, markersize=9)
            if summary.budget is not None:
                ax.axhline(summary.budget, color=color, linestyle="--", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("rounds trained by the institution")
        ax.set_ylabel("cumulative epsilon")
        ax.set_title("Privacy spent: claimed (o-) vs recomputed (x); budgets dashed")
        ax.set_ylim(bottom=0)
        if report.summaries:
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def write_budget_report(report: BudgetReport, out_dir: Path) -> dict[str, Path]:
    """Write ``budget.md``, ``budget.json`` and ``epsilon.png`` into ``out_dir``.

    The three are written to temporary names and renamed into place only when all are
    complete, so a failure (a plot that cannot be drawn, a full disk) leaves the previous
    report whole.
    """
    markdown = budget_markdown(report)
    data = {
        "ok": report.ok,
        "tolerance": TOLERANCE,
        "institutions": [_finite(asdict(s)) for s in report.summaries],
        "rounds": [_finite(asdict(r)) for r in report.rows],
    }
    text = json.dumps(data, indent=2, allow_nan=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js, plot = out_dir / REPORT_MD, out_dir / REPORT_JSON, out_dir / PLOT
    write_atomic_many(
        {
            plot: lambda tmp: _draw_epsilon(report, tmp),
            js: lambda tmp: tmp.write_text(text, "utf-8"),
            md: lambda tmp: tmp.write_text(markdown, "utf-8"),
        }
    )
    return {"markdown": md, "json": js, "plot": plot}


def _finite(row: dict[str, object]) -> dict[str, object]:
    """JSON has no infinity: an unbounded epsilon is written as null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }
