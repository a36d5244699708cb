"""A reproduction's outputs: ``results.md`` (tables with their command), ``results.json``, plots.

Every table states the command that produced it. Repeated results are ``mean ± sd`` (sample
standard deviation) over seeds or folds; the paper's own figures follow ours, with a sentence
saying whether our ordering of the rows agrees with the paper's.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from shared_models.atomic import write_text_atomic
from simulations.reproduce import fairness
from simulations.reproduce.config import (
    HEADS,
    LOWER_IS_BETTER,
    METRIC_LABELS,
    RISK_METRICS,
    ExperimentConfig,
    contract_weeks,
    mode_label,
    released_model,
)
from simulations.reproduce.data import choice
from simulations.reproduce.figures import draw_figures
from simulations.reproduce.pipeline import Reproduction
from simulations.reproduce.stats import (
    FrontierPoint,
    PairedResult,
    frontier,
    groups,
    ordered,
    paired_t_test,
    series,
    summarize,
)

RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"


def write_report(rep: Reproduction) -> Path:
    """Write ``results.md``, ``results.json`` and the plots into ``rep.out_dir``; the md path."""
    figures = draw_figures(rep)
    tests = paired_tests(rep)
    write_text_atomic(
        rep.out_dir / RESULTS_JSON, json.dumps(_json(rep, tests), indent=2, default=_default)
    )
    path = rep.out_dir / RESULTS_MD
    write_text_atomic(path, markdown(rep, tests, figures))
    return path


def paired_tests(rep: Reproduction) -> list[PairedResult]:
    """The config's paired test, per metric, over the centralized repeats of the whole term."""
    test = rep.config.paired_test
    if test is None:
        return []
    by_key = groups(o for o in rep.outcomes if o.mode == "centralized")
    weeks = sorted({k[0] for k in by_key}, key=lambda w: -1 if w is None else w)
    week = weeks[-1] if weeks else None  # the full term (or the last cut-off)
    reference = {o.repeat: o for o in by_key.get((week, "centralized", None, test.reference), [])}
    results = []
    for other in test.against:
        others = {o.repeat: o for o in by_key.get((week, "centralized", None, other), [])}
        repeats = sorted(set(reference) & set(others))
        ratio = float(
            np.mean([reference[r].scored.n_test / max(reference[r].scored.n_train, 1)
                     for r in repeats])
        ) if repeats else 0.0  # fmt: skip
        for metric in rep.config.metrics:
            results.append(
                paired_t_test(
                    [reference[r].scored.metrics.get(metric) for r in repeats],
                    [others[r].scored.metrics.get(metric) for r in repeats],
                    test_to_train=ratio,
                    names=(test.reference, other, metric),
                )
            )
    return results


def markdown(rep: Reproduction, tests: list[PairedResult], figures: list[Path]) -> str:
    """The whole ``results.md``."""
    cfg = rep.config
    lines = [f"# {cfg.title}", "", f"Reproduces: {cfg.paper}.", "", cfg.description.strip(), ""]
    if rep.quick:
        lines += ["**Quick smoke-test run** (2 repeats, 2 epochs, 1 round): not a result.", ""]
    if rep.error:
        lines += [
            f"**Incomplete run**: stopped after {rep.done} of {len(rep.jobs)} jobs ({rep.error}).",
            "",
        ]
    lines += [f"Command: `{rep.command}`", "", *_protocol(rep), ""]
    lines += ["## Results", "", *_main_table(rep), ""]
    if cfg.sweep == "epsilon":
        lines += [*_frontier_table(rep), ""]
    elif cfg.sweep is not None:
        lines += [*_sweep_table(rep), ""]
    federated = _federation_table(rep)
    if federated:
        lines += [*federated, ""]
    if cfg.confusion_matrix:
        lines += [*_confusion_table(rep), ""]
    if tests:
        lines += [*_tests_table(rep, tests), ""]
    if cfg.references_for(rep.dataset):
        lines += [*_reference_table(rep), ""]
    lines += fairness.markdown(rep.outcomes)
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{p.stem}]({p.name})" for p in figures] + [""]
    return "\n".join(lines)


def _protocol(rep: Reproduction) -> list[str]:
    cfg = rep.config
    split = (
        f"{cfg.repeats}-fold cross-validation over the pooled records"
        if cfg.split == "kfold"
        else f"{cfg.repeats} seed(s), each institution's own 70/15/15 split pooled"
    )
    fed, dp = cfg.federated, cfg.dp
    lines = [
        f"- Data: {choice(rep.dataset).description}.",
        *(f"  {_when(d['week'])}: {d['summary']}." for d in rep.data),
        f"- Modes: {', '.join(rep.modes)}. Targets: {', '.join(HEADS[cfg.target])}.",
        *_grade_cutoff(rep),
        f"- Centralized: {split}; early stopping on validation loss (patience "
        f"{cfg.training.patience}, at most {cfg.training.max_epochs} epochs, batch "
        f"{cfg.training.batch_size}). Baselines are fitted centrally on the same splits.",
    ]
    if any(m != "centralized" for m in rep.modes):
        lines.append(
            f"- Federated: {fed.strategy}, {fed.rounds} round(s) x {fed.local_epochs} local "
            f"epoch(s), batch {fed.batch_size}, Adam {fed.learning_rate:g}, {fed.repeats} "
            f"seed(s); one virtual node per institution ({_engine(rep)}), the final global model "
            "scored on every institution's test split (its own normalisation), predictions "
            "pooled."
        )
    if "federated-dp" in rep.modes:
        eps = ", ".join(f"{e:g}" for e in (cfg.epsilons or [dp.epsilon]))
        lines.append(
            f"- Federated + DP: DP-SGD at every institution, epsilon {eps} per institution for "
            f"the whole run, delta {dp.delta:g}, clipping {dp.max_grad_norm:g}, Adam "
            f"{dp.learning_rate or fed.learning_rate:g}, batch {dp.batch_size or fed.batch_size}, "
            f"{dp.local_epochs or fed.local_epochs} local epoch(s) per round, "
            f"{dp.rounds or fed.rounds} round(s), {released_model(dp, fed.rounds, cfg.target)} "
            "(`server.averaging`)."
        )
        lines += cfg.dp_row_notes()  # rows with DP settings of their own
    lines.append(
        f"- Ran {rep.started}, {rep.seconds:.0f} s in all (edufl {_version('edufl')}, torch "
        f"{_version('torch')}, flwr {_version('flwr')}, opacus {_version('opacus')})."
    )
    return lines


def _main_table(rep: Reproduction) -> list[str]:
    cfg = rep.config
    first = ["cut-off week"] if cfg.sweep == "week" else []
    cols = [*first, "model", "mode", "n test", *(METRIC_LABELS[m] for m in cfg.metrics)]
    lines = _header(cols)
    for (week, mode, eps, row), outs in ordered(rep):
        cells = [str(week)] if cfg.sweep == "week" else []
        cells += [_row_name(cfg, row), mode_label(mode, eps), str(outs[0].scored.n_test)]
        cells += [summarize(o.scored.metrics.get(m) for o in outs).cell() for m in cfg.metrics]
        lines.append("| " + " | ".join(cells) + " |")
    n: dict[str, int] = {}
    for o in rep.outcomes:
        n[o.mode] = max(n.get(o.mode, 0), o.repeat + 1)
    unit = {m: "seed(s)" for m in n} | ({"centralized": "folds"} if cfg.split == "kfold" else {})
    shown = ", ".join(f"{v} {unit[k]} {k}" for k, v in n.items())
    lines += ["", f"Mean ± sd (sample) over {shown}; n test: pooled test records per repeat."]
    week = cfg.grade_week_for(rep.dataset)
    if week is not None:
        lines += [f"Grade cut-off week {week}: every row saw weeks 1-{week} only."]
    return lines


def _sweep_table(rep: Reproduction) -> list[str]:
    """The primary metric with one column per mode and row: the table behind the sweep plot."""
    cfg = rep.config
    metric = cfg.primary_metric
    by_x = series(rep)
    xs = sorted({x for s in by_x.values() for x in s})
    name = "cut-off week" if cfg.sweep == "week" else "epsilon"
    lines = [f"{METRIC_LABELS[metric]} by {name}:", "", *_header([name, *by_x])]
    for x in xs:
        cells = [f"{x:g}"] + [s[x].cell() if x in s else "" for s in by_x.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _frontier_table(rep: Reproduction) -> list[str]:
    """The privacy-utility frontier: each DP row by epsilon, and its ratio to centralized."""
    cfg = rep.config
    label = METRIC_LABELS[cfg.primary_metric]
    front = frontier(rep)
    rows = list(dict.fromkeys(p.row for p in front.points))
    if not rows:
        return []
    lines = [f"{label} by epsilon, mean ± sd over the federated-dp seeds:", ""]
    for row in rows:
        ref = front.reference_for(row)
        if ref is not None:
            lines.append(
                f"- {row} is measured against centralized {ref[0]} without DP: "
                f"{ref[1].cell()} ({ref[1].n} seed(s))."
            )
    for row, summary in front.federated.items():
        lines.append(f"- Federated {row} without DP: {summary.cell()} ({summary.n} seed(s)).")
    cols = ["epsilon"]
    for row in rows:
        cols += [row, f"{row} / centralized"]
    lines += ["", *_header(cols)]
    at = {(p.row, p.epsilon): p for p in front.points}
    for eps in sorted({p.epsilon for p in front.points}):
        cells = [f"{eps:g}"]
        for row in rows:
            point = at.get((row, eps))
            cells += ["", ""] if point is None else _frontier_cells(point)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "The ratio is the DP mean over the centralized non-DP mean (the seeds differ in their "
        "splits, so it carries both rows' spread: read it with the two sds).",
    ]
    partial = _partial_participation(rep)
    if partial:
        lines.append(
            "Rounds some institutions sat out (declined, or failed) while others trained: "
            + "; ".join(partial)
            + ". Those models saw part of the federation for part of the run."
        )
    if any(p.declined for p in front.points):
        lines.append(
            "Declined: every institution refused round 1 because the noise its budget left "
            "calls for is above its ceiling (dp-max-noise, `privacy.budget`); nothing was trained "
            "or spent, so that seed has no score."
        )
    return lines


def _partial_participation(rep: Reproduction) -> list[str]:
    """``row at ε: failed / planned node-rounds`` for every DP group where a node sat out."""
    out = []
    for (_, mode, eps, row), outs in ordered(rep):
        failed = sum(o.scored.details.get("node_rounds_failed", 0) for o in outs)
        if mode != "federated-dp" or not failed:
            continue
        total = sum(o.scored.details.get("node_rounds", 0) for o in outs)
        out.append(f"{row} at ε = {eps:g}: {failed} of {total} node-rounds")
    return out


def _frontier_cells(point: FrontierPoint) -> list[str]:
    """The mean ± sd and the ratio of one frontier point, with its declined seeds."""
    if point.summary.mean is None:
        return [f"declined ({point.declined} seed(s))" if point.declined else "n/a", "n/a"]
    cell = point.summary.cell()
    if point.declined:
        cell += f" ({point.summary.n} seed(s); {point.declined} declined)"
    return [cell, "n/a" if point.ratio is None else f"{point.ratio:.3f}"]


def _federation_table(rep: Reproduction) -> list[str]:
    """The federation's own evaluation: per-institution metrics averaged, not pooled."""
    metric = rep.config.primary_metric
    head = "risk" if metric in RISK_METRICS else "grade"
    rows = [(k, v) for k, v in ordered(rep) if k[1] != "centralized"]
    if not rows:
        return []
    by_week = rep.config.sweep == "week"
    label = METRIC_LABELS[metric]
    lines = [
        f"As the federation itself reports it: each institution's own test {label}, averaged "
        "weighted by test records (the tables above pool the institutions' test predictions "
        "instead; a ranking metric such as ROC-AUC can differ between the two when the "
        f"institutions' scores are calibrated differently)"
        f"{'' if head == 'risk' else '; grades on the 0-1 scale'}:",
        "",
        *_header(
            [*(["cut-off week"] if by_week else []), "model", "mode", f"reported {label}",
             "epsilon spent (max)"]
        ),
    ]  # fmt: skip
    for (week, mode, eps, row), outs in rows:
        reported = summarize(
            o.scored.details.get("federation_reported", {}).get(f"{head}/{metric}") for o in outs
        )
        spent = summarize(o.scored.details.get("epsilon_spent") for o in outs)
        first = f"| {week} " if by_week else ""
        lines.append(
            f"{first}| {row} | {mode_label(mode, eps)} | {reported.cell()} | "
            f"{spent.cell() if spent.n else '-'} |"
        )
    return lines


def _confusion_table(rep: Reproduction) -> list[str]:
    lines = [
        "Confusion matrices at threshold 0.5, summed over repeats (at risk = positive):",
        "",
        *_header(["model", "mode", "TN", "FP", "FN", "TP"]),
    ]
    for (_, mode, eps, row), outs in ordered(rep):
        mats = [o.scored.confusion_matrix for o in outs if o.scored.confusion_matrix]
        if not mats:
            continue
        (tn, fp), (fn, tp) = np.sum(np.array(mats), axis=0).tolist()
        lines.append(f"| {_row_name(rep.config, row)} | {mode_label(mode, eps)} | {tn} | {fp} | "
                     f"{fn} | {tp} |")  # fmt: skip
    return lines


def _tests_table(rep: Reproduction, tests: list[PairedResult]) -> list[str]:
    ref = tests[0].reference
    lines = [
        f"Paired two-sided t-tests of {ref} against each row, over the centralized repeats "
        "(difference = reference - other). The corrected p is Nadeau & Bengio's resampled "
        "t-test, which accounts for the overlap of the training sets across repeats; trust it "
        "over the plain one.",
        "",
        *_header(["against", "metric", "pairs", "mean difference", "t", "p", "p (corrected)"]),
    ]

    def fmt(v: float | None, spec: str = ".3f") -> str:
        return "n/a" if v is None else format(v, spec)

    for t in tests:
        lines.append(
            f"| {_row_name(rep.config, t.other)} | {METRIC_LABELS[t.metric]} | {t.n} | "
            f"{fmt(t.mean_difference, '+.3f')} | {fmt(t.t, '.2f')} | {fmt(t.p, '.3g')} | "
            f"{fmt(t.p_corrected, '.3g')} |"
        )
    return lines


def _reference_table(rep: Reproduction) -> list[str]:
    refs = rep.config.references_for(rep.dataset)
    metrics = list(dict.fromkeys(m for r in refs for m in r.values))
    lines = [
        "Figures the paper and the literature report (their data, not ours):",
        "",
        *_header(["row (as published)", "source", "data", *(METRIC_LABELS[m] for m in metrics)]),
    ]
    for r in refs:
        cells = [f"{r.values[m]:g}" if m in r.values else "" for m in metrics]
        lines.append(f"| {r.label} | {r.source} | {r.data} | " + " | ".join(cells) + " |")
    lines += ["", *_ordering(rep)]
    return lines


def _ordering(rep: Reproduction) -> list[str]:
    """Whether our centralized ordering of the mapped rows agrees with the paper's, per metric."""
    cfg = rep.config
    mapped = [r for r in cfg.references_for(rep.dataset) if r.row]
    week = cfg.grade_week_for(rep.dataset)  # None: the whole term
    by_key = groups(o for o in rep.outcomes if o.week == week)
    out = []
    for metric in cfg.metrics:
        refs = [r for r in mapped if metric in r.values]
        if len(refs) < 2:
            continue
        ours = {}
        for r in refs:
            found = by_key.get((week, "centralized", None, r.row), [])
            value = summarize(o.scored.metrics.get(metric) for o in found).mean
            if value is not None:
                ours[r.row] = value
        if len(ours) < 2:
            continue
        paper = _rank({r.row: r.values[metric] for r in refs if r.row in ours}, metric)
        mine = _rank(ours, metric)
        verdict = "agrees with" if paper == mine else "DIFFERS from"
        out.append(
            f"- {METRIC_LABELS[metric]}: ours (centralized) {' > '.join(mine)} {verdict} the "
            f"paper's {' > '.join(paper)} (> means better)."
        )
    return out


def _rank(values: dict[str, float], metric: str) -> list[str]:
    return sorted(values, key=lambda k: values[k], reverse=metric not in LOWER_IS_BETTER)


def _grade_cutoff(rep: Reproduction) -> list[str]:
    """The protocol line of an experiment whose models see only the first weeks (or none)."""
    week = rep.config.grade_week_for(rep.dataset)
    if week is None:
        return []
    return [
        f"- Grade cut-off: week {week} of {contract_weeks(rep.dataset)}. Every model, baseline "
        f"and mode sees weeks 1-{week} only and predicts the final grade, so a grade computed "
        "from later assessments is predicted, not read off the inputs (`grade_cutoff_week`)."
    ]


def _engine(rep: Reproduction) -> str:
    if rep.engine == "inline":
        return "inline engine: the nodes in turn in one process"
    return "Ray engine" + (f", cluster {rep.ray_address}" if rep.ray_address else "")


def _when(week: object) -> str:
    return f"Cut-off week {week}" if week else "Whole term"


def _row_name(cfg: ExperimentConfig, row: str) -> str:
    return f"**{row}**" if cfg.paired_test and row == cfg.paired_test.reference else row


def _header(cols: list[str]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _json(rep: Reproduction, tests: list[PairedResult]) -> dict[str, Any]:
    summary = [
        {
            "week": week, "mode": mode, "epsilon": eps, "row": row, "repeats": len(outs),
            "metrics": {m: vars(summarize(o.scored.metrics.get(m) for o in outs))
                        for m in rep.config.metrics},
        }
        for (week, mode, eps, row), outs in ordered(rep)
    ]  # fmt: skip
    return {
        "experiment": rep.config.model_dump(mode="json"),
        "dataset": rep.dataset,
        "command": rep.command,
        "modes": rep.modes,
        "quick": rep.quick,
        "started": rep.started,
        "seconds": rep.seconds,
        "engine": rep.engine,
        "jobs": {"planned": len(rep.jobs), "done": rep.done, "error": rep.error},
        "versions": {p: _version(p) for p in ("edufl", "torch", "flwr", "opacus")},
        "data": rep.data,
        "summary": summary,
        "paired_tests": [vars(t) for t in tests],
        "frontier": _frontier_json(rep),
        "outcomes": [o.to_json() for o in rep.outcomes],
    }


def _frontier_json(rep: Reproduction) -> list[dict[str, Any]]:
    """The frontier's points with their reference, for docs (empty without an epsilon sweep)."""
    if rep.config.sweep != "epsilon":
        return []
    front = frontier(rep)
    out = []
    for p in front.points:
        ref = front.reference_for(p.row)
        out.append(
            {
                "row": p.row, "epsilon": p.epsilon, **vars(p.summary), "ratio": p.ratio,
                "declined": p.declined,
                "reference_row": ref[0] if ref else None,
                "reference": vars(ref[1]) if ref else None,
                "federated_no_dp": vars(s) if (s := front.federated.get(p.row)) else None,
            }
        )  # fmt: skip
    return out


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
