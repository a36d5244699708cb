"""Centralized training on pooled exports: the upper bound every federated result is compared with.

Pools one or more institution exports, splits them (70/15/15, stratified, or K-fold), trains a
registered model with early stopping, fits the scikit-learn baselines on the same split, and
writes metrics, the model, a markdown comparison and plots to an output folder.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared_models.atomic import write_text_atomic
from shared_models.baselines import fit_baselines
from shared_models.data.cohort import CohortArrays, Normalizer
from shared_models.data.contract import FeatureSpec
from shared_models.data.splits import Split, kfold_splits, split_cohort
from shared_models.evaluation import evaluate, predict
from shared_models.metrics import regression_metrics
from shared_models.models.artifact import save_trained
from shared_models.models.registry import build_model, config_class
from shared_models.training import EpochRecord, FitConfig, fit, set_seed
from simulations import plots

log = logging.getLogger(__name__)

Target = Literal["risk", "grade", "both"]
_TASK = {"risk": "risk", "grade": "grade", "both": "multitask"}
_HEADS = {"risk": ("risk",), "grade": ("grade",), "both": ("risk", "grade")}


def model_overrides(
    name: str, target: Target, spec: FeatureSpec, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The model config for ``target``: its heads and, for CNN models, the activity map."""
    overrides: dict[str, Any] = {"targets": list(_HEADS[target])}
    if "activity_index" in config_class(name).model_fields:
        overrides["activity_index"] = list(spec.activity_index)
    return overrides | (extra or {})


def train_on_split(
    cohort: CohortArrays,
    split: Split,
    spec: FeatureSpec,
    out_dir: Path,
    *,
    model_name: str,
    target: Target,
    fit_config: FitConfig,
    overrides: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> dict[str, Any]:
    """Train, evaluate against baselines and write every output for one split."""
    task = _TASK[target]
    norm = Normalizer(spec.target.grade_min, spec.target.grade_max).fit(cohort.subset(split.train))
    train, val, test = (
        norm.transform(cohort.subset(ix)) for ix in (split.train, split.val, split.test)
    )
    set_seed(fit_config.seed)
    config = model_overrides(model_name, target, spec, overrides)
    model = build_model(model_name, spec.weeks, cohort.n_dynamic, cohort.n_static, config)
    result = fit(model, train, val if len(val) else None, task, fit_config, on_epoch=on_epoch)
    report = evaluate(model, test, task, class_weight=result.pos_weight)
    pred = predict(model, test)

    metrics: dict[str, Any] = {
        "model": model_name,
        "target": target,
        "task": task,
        "n": {"train": len(train), "val": len(val), "test": len(test)},
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "baselines": {},
    }
    test_grade = cohort.grade[split.test]
    if "risk" in _HEADS[target]:
        metrics["risk"] = report["risk"]
        base = fit_baselines(
            "risk", train.flat(), train.at_risk, test.flat(), test.at_risk, seed=fit_config.seed
        )
        for name, res in base.items():
            metrics["baselines"].setdefault(name, {})["risk"] = res.metrics
        plots.roc_curves(
            test.at_risk,
            {model_name: pred["risk"]} | {n: r.predictions for n, r in base.items()},
            out_dir / "roc.png",
            f"At-risk ROC: {model_name} vs baselines",
        )
    if "grade" in _HEADS[target]:
        scaled = norm.grade_to_scale(pred["grade"])
        metrics["grade"] = regression_metrics(test_grade, scaled)
        base = fit_baselines(
            "grade",
            train.flat(),
            cohort.grade[split.train],
            test.flat(),
            test_grade,
            seed=fit_config.seed,
        )
        for name, res in base.items():
            metrics["baselines"].setdefault(name, {})["grade"] = res.metrics
        plots.predicted_vs_actual(
            test_grade,
            scaled,
            out_dir / "grade_scatter.png",
            spec.target.grade_scale,
            f"{model_name}: predicted vs actual",
        )
    metrics["history"] = [vars(r) for r in result.history]
    plots.training_curves(
        [r.epoch for r in result.history],
        [r.train_loss for r in result.history],
        [r.val_loss for r in result.history],
        out_dir / "training_curves.png",
        result.best_epoch,
    )
    save_trained(
        out_dir,
        model,
        name=model_name,
        task=task,
        spec=spec,
        normalizer=norm,
        extra={"target": target, "trained_on": sorted(set(cohort.institution.tolist()))},
    )
    _write_json(out_dir / "metrics.json", metrics)
    write_text_atomic(out_dir / "results.md", results_table([metrics], target))
    return metrics


def run_centralized(
    cohort: CohortArrays,
    spec: FeatureSpec,
    out_dir: Path,
    *,
    model_name: str = "lstm",
    target: Target = "risk",
    split: Literal["random", "stratified", "kfold"] = "random",
    folds: int = 5,
    fit_config: FitConfig | None = None,
    overrides: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> list[dict[str, Any]]:
    """Single split (70/15/15) or K-fold; returns the metrics of each split."""
    cfg = fit_config or FitConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    if split == "kfold":
        runs = []
        for k, part in enumerate(kfold_splits(cohort, folds, seed=cfg.seed), start=1):
            log.info("fold %d of %d", k, folds)
            runs.append(
                train_on_split(
                    cohort,
                    part,
                    spec,
                    out_dir / f"fold_{k}",
                    model_name=model_name,
                    target=target,
                    fit_config=cfg,
                    overrides=overrides,
                    on_epoch=on_epoch,
                )
            )
        write_text_atomic(out_dir / "results.md", results_table(runs, target))
        _write_json(out_dir / "metrics.json", {"folds": runs})
        return runs
    part = split_cohort(cohort, mode=split, seed=cfg.seed)
    return [
        train_on_split(
            cohort,
            part,
            spec,
            out_dir,
            model_name=model_name,
            target=target,
            fit_config=cfg,
            overrides=overrides,
            on_epoch=on_epoch,
        )
    ]


_COLUMNS = {
    "risk": ("roc_auc", "accuracy", "precision", "recall", "f1", "brier"),
    "grade": ("mse", "rmse", "r2"),
}


def results_table(runs: list[dict[str, Any]], target: Target) -> str:
    """Markdown table of the model against every baseline (mean ± sd over folds)."""
    model = runs[0]["model"]
    lines = [
        f"# Centralized {model} ({target}), test split"
        + (f", {len(runs)} folds (mean ± sd)" if len(runs) > 1 else ""),
        "",
    ]
    for head in _HEADS[target]:
        cols = _COLUMNS[head]
        lines += [
            f"## {head}",
            "",
            "| model | " + " | ".join(cols) + " |",
            "|---|" + "---|" * len(cols),
        ]
        rows = {f"**{model}**": [r[head] for r in runs]}
        for name, heads in runs[0]["baselines"].items():
            if head in heads:
                rows[name] = [r["baselines"][name][head] for r in runs]
        for name, results in rows.items():
            cells = [_cell([res.get(c) for res in results]) for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(values: list[float | None]) -> str:
    nums = [v for v in values if v is not None]
    if not nums:
        return "n/a"
    return f"{np.mean(nums):.3f}" + (f" ± {np.std(nums):.3f}" if len(nums) > 1 else "")


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=float))
