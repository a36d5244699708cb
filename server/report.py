"""A run directory's human-readable results: ``summary.md`` and ``rounds.png``.

Both are derived from ``metrics.jsonl`` only, so they can be regenerated at any time (after a
resumed run they cover every round, whichever invocation ran it). A DP run's log holds released
figures only (`server.release`): its summary shows those, says that they are noised and by how
much (the noise std of the counts each comes from), and where in the ledger they come from.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from server.checkpoints import CheckpointError, CheckpointStore
from server.release import value_of
from shared_models.atomic import write_atomic, write_text_atomic
from shared_models.protocol import (
    LOSS,
    NUM_EXAMPLES,
    RISK_ACCURACY,
    RISK_F1,
    RISK_HIST_POS,
    RISK_RECALL,
    RISK_ROC_AUC,
    TRAIN_LOSS,
    VAL_RISK_ROC_AUC,
)

logger = logging.getLogger(__name__)

SUMMARY = "summary.md"
PLOT = "rounds.png"

#: (column title, phase, metric key) of the per-round table.
_ROUND_COLUMNS = (
    ("train loss", "train", TRAIN_LOSS),
    ("val ROC-AUC", "train", VAL_RISK_ROC_AUC),
    ("test loss", "evaluate", LOSS),
    ("test ROC-AUC", "evaluate", RISK_ROC_AUC),
    ("test accuracy", "evaluate", RISK_ACCURACY),
    ("test F1", "evaluate", RISK_F1),
)
_INSTITUTION_COLUMNS = (
    ("test n", NUM_EXAMPLES),
    ("ROC-AUC", RISK_ROC_AUC),
    ("accuracy", RISK_ACCURACY),
    ("F1", RISK_F1),
    ("recall", RISK_RECALL),
    ("loss", LOSS),
)


#: The DP log's columns: (title, metric key), every figure computed from noised histograms.
_DP_COLUMNS = (
    ("test n", "risk/n"),
    ("ROC-AUC", RISK_ROC_AUC),
    ("accuracy", RISK_ACCURACY),
    ("F1", RISK_F1),
    ("recall", RISK_RECALL),
    ("recall@0.40", "risk/recall@0.40"),
    ("ECE", "risk/ece"),
)


def _fmt(value: Any, digits: int = 4) -> str:
    value = value_of(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and value.is_integer() and abs(value) > 1:  # a count
        return str(int(value))
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _institutions(records: list[dict[str, Any]]) -> list[str]:
    names = {e["institution"] or f"node {e['node_id']}" for r in records for e in r["institutions"]}
    return sorted(names)


def _per_institution(record: dict[str, Any], phase: str, key: str) -> dict[str, Any]:
    return {
        e["institution"] or f"node {e['node_id']}": e.get(phase, {}).get(key)
        for e in record["institutions"]
    }


def _dp_fmt(figures: dict[str, Any], key: str) -> str:
    # A noised count is fractional; its decimals mean nothing next to its noise.
    return _fmt(figures.get(key), 0 if key == "risk/n" else 4)


def _noise(figures: dict[str, Any], key: str) -> str:
    found = figures.get(key)
    return f"{found['noise_std']:.2f}" if isinstance(found, dict) else "-"


def _ledger(figures: dict[str, Any], key: str) -> str:
    found = figures.get(key)
    refs = found.get("ledger", []) if isinstance(found, dict) else []
    return ", ".join(f"{name}#{seq}" for name, seq in refs) or "-"


def render_dp_summary(records: list[dict[str, Any]]) -> str:
    """The markdown summary of a DP run: released figures only, each said to be noised."""
    last = records[-1]
    lines = [
        f"# Federated run with differential privacy: {last['strategy']}, {len(records)} round(s)",
        "",
        "Every figure below is computed from the institutions' **noised** releases only (no "
        "exact value about their students left a node): their noised student counts and "
        "noised histograms of predicted risk on their test students (one count per student). "
        "*count noise std* is the standard deviation of the Gaussian noise on each count a "
        "figure comes from (the consortium's: the institutions' summed, sqrt(sum of their "
        "variances)); negative noised counts are clipped to 0. Each figure's ledger entries "
        "(institution#seq in `ledger.jsonl`) are in `metrics.jsonl`.",
        "",
        f"Final federated test ROC-AUC (noised): **{_fmt(last['evaluate'].get(RISK_ROC_AUC))}** "
        f"(count noise std {_noise(last['evaluate'], RISK_ROC_AUC)}; ledger entries "
        f"{_ledger(last['evaluate'], RISK_ROC_AUC)})",
        "",
        "## Per round (the consortium's summed releases)",
        "",
    ]
    rows = []
    for r in records:
        row = [str(r["round"]), f"{r['seconds']:.1f}", _fmt(r["train"].get(NUM_EXAMPLES))]
        row += [_noise(r["train"], NUM_EXAMPLES)]
        row += [_dp_fmt(r["evaluate"], key) for _, key in _DP_COLUMNS]
        row += [_noise(r["evaluate"], RISK_HIST_POS), _fmt(r.get("epsilon_max"))]
        row += [str(len(r["rejected"])), str(len(r["failures"]))]
        rows.append(row)
    header = ["round", "seconds", "train n (noised)", "its noise std"]
    header += [c[0] for c in _DP_COLUMNS]
    header += ["count noise std", "epsilon max", "rejected", "failed"]
    lines += _table(header, rows)

    lines += ["", f"## Per institution after round {last['round']} (its own releases)", ""]
    rows = []
    for entry in sorted(last["institutions"], key=lambda e: e["institution"] or ""):
        figures = entry.get("evaluate", {})
        name = entry["institution"] or f"node {entry['node_id']}"
        row = [name, *(_dp_fmt(figures, key) for _, key in _DP_COLUMNS)]
        row += [_noise(figures, RISK_HIST_POS), _fmt(entry.get("epsilon"))]
        rows.append(row)
    header = ["institution", *(c[0] for c in _DP_COLUMNS), "count noise std", "epsilon"]
    lines += _table(header, rows)
    without_dp = sorted({n for r in records for n in r.get("trained_without_dp", [])})
    if without_dp:
        lines += ["", f"Trained WITHOUT DP (exact metrics): {', '.join(without_dp)}"]
    return "\n".join(lines + _rejected(records)) + "\n"


def _rejected(records: list[dict[str, Any]]) -> list[str]:
    rejected = [(r["round"], x) for r in records for x in r["rejected"]]
    if not rejected:
        return []
    rows = [
        [str(rnd), str(x["node_id"]), x["institution"] or "-", x["reason"]] for rnd, x in rejected
    ]
    header = ["round", "node", "institution", "reason"]
    return ["", "## Rejected updates", "", *_table(header, rows)]


def render_summary(records: list[dict[str, Any]]) -> str:
    """The markdown summary of a run's metrics log."""
    if not records:
        return "# Federated run\n\nNo round has completed yet.\n"
    if any(r.get("release") == "dp" for r in records):
        return render_dp_summary(records)
    last = records[-1]
    lines = [
        f"# Federated run: {last['strategy']}, {len(records)} round(s)",
        "",
        f"Final federated test ROC-AUC (weighted by test records): "
        f"**{_fmt(last['evaluate'].get(RISK_ROC_AUC))}**",
        "",
        "## Per round (aggregated over institutions)",
        "",
    ]
    rows = []
    for r in records:
        row = [str(r["round"]), f"{r['seconds']:.1f}"]
        row += [_fmt(r[phase].get(key)) for _, phase, key in _ROUND_COLUMNS]
        row += [str(len(r["rejected"])), str(len(r["failures"]))]
        rows.append(row)
    header = ["round", "seconds", *(c[0] for c in _ROUND_COLUMNS), "rejected", "failed"]
    lines += _table(header, rows)

    names = _institutions(records)
    lines += ["", f"## Per institution after round {last['round']} (test split)", ""]
    rows = []
    for entry in sorted(last["institutions"], key=lambda e: e["institution"]):
        metrics = entry.get("evaluate", {})
        name = entry["institution"] or f"node {entry['node_id']}"
        rows.append([name, *(_fmt(metrics.get(key)) for _, key in _INSTITUTION_COLUMNS)])
    lines += _table(["institution", *(c[0] for c in _INSTITUTION_COLUMNS)], rows)

    lines += ["", "## Test ROC-AUC per institution and round", ""]
    rows = []
    for r in records:
        values = _per_institution(r, "evaluate", RISK_ROC_AUC)
        rows.append([str(r["round"]), *(_fmt(values.get(n)) for n in names)])
    lines += _table(["round", *names], rows)
    return "\n".join(lines + _rejected(records)) + "\n"


def plot_rounds(records: list[dict[str, Any]], path: Path) -> None:
    """Test ROC-AUC and test loss per round, one line per institution plus the federation's.

    A DP run has no test loss: its second panel is the expected calibration error, and the
    titles say that the figures are computed from noised histograms.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in records]
    names = _institutions(records)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels: tuple[tuple[str, str], ...] = ((RISK_ROC_AUC, "test ROC-AUC"), (LOSS, "test loss"))
    if any(r.get("release") == "dp" for r in records):
        panels = ((RISK_ROC_AUC, "test ROC-AUC (noised)"), ("risk/ece", "test ECE (noised)"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name in names:
            values = [value_of(_per_institution(r, "evaluate", key).get(name)) for r in records]
            ax.plot(rounds, [math.nan if v is None else v for v in values], marker="o", label=name)
        federated = [value_of(r["evaluate"].get(key)) for r in records]
        ax.plot(
            rounds,
            [math.nan if v is None else v for v in federated],
            color="black",
            linewidth=2.5,
            marker="s",
            label="federated (weighted)",
        )
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)


def _recorded(store: CheckpointStore, key: str) -> object:
    """``key`` of the last checkpoint's manifest (None without a readable checkpoint)."""
    try:
        last = store.latest()
    except CheckpointError:
        return None
    return last.manifest.get(key) if last is not None else None


def _started_from(store: CheckpointStore) -> str:
    """The public prior the run started from, as its checkpoints record it ("" if none)."""
    prior = _recorded(store, "init_from")
    if not isinstance(prior, dict):
        return ""
    return (
        f"\n## Initial weights\n\nStarted from the public prior `{prior.get('path')}` "
        f"({prior.get('kind')}; weights `{prior.get('weights')}`, SHA-256 "
        f"`{prior.get('weights_sha256')}`), not from seeded random weights. DP covers the "
        "institutions' records only if the prior saw none of them.\n"
    )


def _averaged(store: CheckpointStore) -> str:
    """Which rounds' global models the released model averages ("" if only the last's)."""
    rounds = _recorded(store, "averaged_rounds")
    if not (isinstance(rounds, list) and len(rounds) == 2):
        return ""
    first, final = rounds
    span = f"round {first}" if first == final else f"rounds {first}-{final}"
    return (
        f"\n## Released model\n\nThe model this run released (its last checkpoint, what the "
        f"nodes evaluated and adopt) is the mean of the global models of {span}, not the last "
        "round's alone: each round's model carries that round's DP noise, and the mean averages "
        "it down. The nodes trained on from the un-averaged models. Averaging models the nodes "
        "already received costs no privacy budget.\n"
    )


def write_report(run_dir: Path | str) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``rounds.png`` from the run's metrics log; returns both paths."""
    run_dir = Path(run_dir)
    store = CheckpointStore(run_dir)
    records = store.read_metrics()
    summary = run_dir / SUMMARY
    write_text_atomic(summary, render_summary(records) + _started_from(store) + _averaged(store))
    plot = run_dir / PLOT
    plot_rounds(records, plot)
    logger.info("wrote %s and %s", summary, plot)
    return summary, plot
