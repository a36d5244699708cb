"""At-risk ROC-AUC of every round's global model in a reproduction's federated runs (and the
grade R² of the released model and the last round's, where the model predicts the grade).

``python -m simulations.reproduce.by_round OUT [--mode federated-dp] [--row lstm]``

A reproduction scores the model each federated run released (`server.averaging`: under DP
the mean of the last half of the rounds' global models). This reads the runs' checkpoints
under ``OUT/runs/MODE/`` and scores, on the same pooled test splits, each round's global model
as aggregated (the *iterate*: the checkpoint's own weights, or the iterate its state keeps
where the checkpoint holds a mean) and the released model, so that a run whose last rounds
lost ground, or what the averaging bought, shows. Each run is matched with the exports under
``OUT/data/`` of its contract; the split is the run's seed (its checkpoints record it).
Nothing is trained; it prints Markdown.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from server.averaging import saved_iterate
from server.checkpoints import CheckpointStore
from shared_models.data.cohort import ModelInputs
from shared_models.data.contract import FeatureSpec, default_spec, load_spec
from shared_models.data.node import prepare_node_data
from shared_models.evaluation import predict
from shared_models.metrics import regression_metrics
from shared_models.models.checkpoints import checkpoint_model, checkpoint_seed
from shared_models.models.weights import assign_weights, load_tensors


@dataclass(frozen=True)
class RunScores:
    """One federated run: its released model's at-risk ROC-AUC and each round's iterate's, and
    the grade R² of both where the model has a grade head (None where it has none)."""

    row: str
    run: str
    released: float
    iterates: list[float]
    released_r2: float | None = None
    last_r2: float | None = None


def _exports(out: Path) -> dict[str, tuple[FeatureSpec, list[Path]]]:
    """The reproduction's exports by contract fingerprint."""
    found = {}
    for folder in sorted(p for p in (out / "data").glob("*") if p.is_dir()):
        # A generated consortium (synthetic) is written for the default contract.
        own = folder / "spec.toml"
        spec = load_spec(own) if own.is_file() else default_spec()
        found[spec.fingerprint] = (spec, sorted(p for p in folder.iterdir() if p.is_dir()))
    return found


def _scores(model: torch.nn.Module, test: ModelInputs) -> tuple[float, float | None]:
    """At-risk ROC-AUC, and grade R² (on the scaled grade: R² is the same on any affine scale)."""
    pred = predict(model, test)
    auc = float(roc_auc_score(test.at_risk, pred["risk"]))
    r2 = regression_metrics(test.grade, pred["grade"])["r2"] if "grade" in pred else None
    return auc, r2


def score_run(
    run_dir: Path, exports: dict[str, tuple[FeatureSpec, list[Path]]]
) -> RunScores | None:
    """Score one run's released model and every round's iterate; None if it committed none
    (every institution declined its budget).

    Raises:
        ValueError: no export of the run's contract under the reproduction's data/.
    """
    checkpoints = CheckpointStore(run_dir).checkpoints()
    if not checkpoints:
        return None
    fingerprint = checkpoints[-1].manifest.get("spec_fingerprint")
    if fingerprint not in exports:
        raise ValueError(f"{run_dir}: no export of its contract under the reproduction's data/")
    spec, paths = exports[str(fingerprint)]
    seed = checkpoint_seed(checkpoints[-1])
    test = ModelInputs.concatenate([prepare_node_data(p, spec, seed=seed).test for p in paths])
    released, released_r2 = _scores(checkpoint_model(checkpoints[-1], spec), test)
    iterates, last_r2 = [], None
    for checkpoint in checkpoints:
        model = checkpoint_model(checkpoint, spec)
        if checkpoint.state_path is not None:
            state = load_tensors(checkpoint.state_path)
            kept = saved_iterate(state)
            if kept:  # by the federation's weight names (`named_weights`)
                assign_weights(model, {k: v.numpy() for k, v in kept.items()})
        auc, last_r2 = _scores(model, test)
        iterates.append(auc)
    return RunScores(run_dir.parent.name, run_dir.name, released, iterates, released_r2, last_r2)


def score_reproduction(out: Path, mode: str = "federated-dp", row: str = "*") -> list[RunScores]:
    """`score_run` for every run of ``mode`` (rows matching the glob ``row``) under ``out``,
    but those that committed no round."""
    exports = _exports(out)
    runs = sorted(p for p in (out / "runs" / mode).glob(f"{row}/*") if p.is_dir())
    return [s for s in (score_run(run, exports) for run in runs) if s is not None]


def render(scores: list[RunScores]) -> str:
    """Markdown: one line per run, then the mean ± sd per row and setting over its seeds."""
    lines = [
        "| row | run | released | last round's iterate | iterate by round |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[RunScores]] = {}
    for s in scores:
        rounds = " ".join(f"{a:.3f}" for a in s.iterates)
        lines.append(f"| {s.row} | {s.run} | {s.released:.3f} | {s.iterates[-1]:.3f} | {rounds} |")
        groups.setdefault((s.row, re.sub(r"-?seed\d+", "", s.run)), []).append(s)
    lines += [
        "",
        "| row | setting | runs | released | last round's iterate "
        "| grade R², released | grade R², last iterate |",
        "|---|---|---|---|---|---|---|",
    ]
    for (row, setting), group in groups.items():
        cells = [
            _mean_sd([s.released for s in group]),
            _mean_sd([s.iterates[-1] for s in group]),
            _mean_sd([s.released_r2 for s in group]),
            _mean_sd([s.last_r2 for s in group]),
        ]
        lines.append(f"| {row} | {setting or '-'} | {len(group)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _mean_sd(values: list[float | None]) -> str:
    if any(v is None for v in values):
        return "-"
    array = np.asarray(values, dtype=np.float64)
    sd = f" ± {array.std(ddof=1):.3f}" if len(array) > 1 else ""
    return f"{array.mean():.3f}{sd}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a reproduction's output folder (--out)")
    parser.add_argument("--mode", default="federated-dp", help="federated or federated-dp")
    parser.add_argument("--row", default="*", help="a row's folder name, or a glob (lstm, cnn-*)")
    args = parser.parse_args(argv)
    try:
        scores = score_reproduction(args.out, args.mode, args.row)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not scores:
        print(f"no {args.mode} run under {args.out / 'runs'}", file=sys.stderr)
        return 1
    print(render(scores))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
