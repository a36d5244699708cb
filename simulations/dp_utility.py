"""The utility cost of differential privacy: ROC-AUC of the LSTM at epsilon 1, 3, 8 and without DP.

Trained CENTRALLY on the pooled synthetic consortium (4 institutions, 1200 students, seed 0) with
the DP-SGD wiring every client uses (`privacy.dp.DPSession`: Poisson sampling, per-student
clipping, noise calibrated up front for every planned step, RDP accounting). A federated run
spreads the same steps over rounds and institutions, each with its own budget. Every row uses
the same splits (70/15/15, one per seed), architecture, batch size and learning rate; the
non-private row keeps its usual early stopping on the validation split.

Run:

    python -m simulations.dp_utility --out runs/dp_utility
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from shared_models.atomic import write_text_atomic
from shared_models.data.cohort import CohortArrays, ModelInputs, Normalizer
from shared_models.data.contract import FeatureSpec, default_spec
from shared_models.data.loader import load_cohort
from shared_models.data.splits import split_cohort
from shared_models.evaluation import evaluate
from shared_models.models.artifact import save_trained
from shared_models.models.registry import build_model
from shared_models.training import (
    FitConfig,
    fit,
    make_loader,
    make_optimizer,
    set_seed,
    train_one_epoch,
)
from simulations.synthetic import write_consortium

logger = logging.getLogger(__name__)

EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5  # below 1/n for the ~840 pooled training students
RESULT_FILE = "dp_utility.md"


def train_private(
    train: ModelInputs, shapes: tuple[int, int, int], epsilon: float, args: argparse.Namespace
) -> tuple[Any, dict[str, Any]]:
    """One LSTM trained with DP-SGD at ``epsilon`` for ``args.epochs`` epochs."""
    model = build_model("lstm", *shapes, {"learning_rate": args.lr})
    budget = PrivacyBudget(epsilon=epsilon, delta=DELTA, max_grad_norm=args.clip)
    plan = DPPlan.for_training(len(train), args.batch_size, args.epochs, planned_rounds=1)
    loader = make_loader(train, args.batch_size, shuffle=True, seed=args.seed)
    with tempfile.TemporaryDirectory() as state:
        session = DPSession.open(state, budget, plan, institution="pooled")
        private, optimizer, loader = session.make_private(
            model, make_optimizer(model, args.lr), loader
        )
        for _ in range(args.epochs):
            train_one_epoch(private, loader, optimizer, "risk")
        return model, session.spend_round("dp-utility", 1, "central")


def run(args: argparse.Namespace) -> str:
    """Train every row for every seed, write ``OUT/dp_utility.md`` and return the table."""
    spec = default_spec()
    data = args.out / "consortium"
    if not (data / "consortium.toml").exists():
        write_consortium(data, seed=0)
    cohort = CohortArrays.concatenate(
        [load_cohort(d, spec) for d in sorted(data.glob("institution_*"))]
    )
    shapes = (spec.weeks, cohort.n_dynamic, cohort.n_static)
    aucs: dict[str, list[float]] = {}
    notes: dict[str, str] = {}
    started = time.perf_counter()
    for seed in range(args.seed, args.seed + args.seeds):
        split = split_cohort(cohort, seed=seed)
        norm = Normalizer(spec.target.grade_min, spec.target.grade_max)
        norm.fit(cohort.subset(split.train))
        train, val, test = (
            norm.transform(cohort.subset(i)) for i in (split.train, split.val, split.test)
        )
        set_seed(seed)
        model = build_model("lstm", *shapes, {"learning_rate": args.lr})
        cfg = FitConfig(max_epochs=50, batch_size=args.batch_size, patience=5, seed=seed)
        history = fit(model, train, val, "risk", cfg).history
        aucs.setdefault("no DP", []).append(evaluate(model, test, "risk")["risk"]["roc_auc"])
        if seed == args.seed:
            notes["no DP"] = f"early stopping after {len(history)} epochs"
            _save(args.out / "model_no_dp", model, spec, norm, seed, None)
        for epsilon in EPSILONS:
            set_seed(seed)
            model, entry = train_private(train, shapes, epsilon, args)
            row = f"DP epsilon {epsilon:g}"
            aucs.setdefault(row, []).append(evaluate(model, test, "risk")["risk"]["roc_auc"])
            if seed == args.seed:
                sigma, spent = entry["noise_multiplier"], entry["epsilon_after"]
                notes[row] = f"noise multiplier {sigma:.3f}, epsilon spent {spent:.3f}"
                _save(args.out / f"model_dp_eps{epsilon:g}", model, spec, norm, seed, entry)
    table = _table(aucs, notes, len(train), len(test), args, time.perf_counter() - started)
    write_text_atomic(args.out / RESULT_FILE, table)
    return table


def _save(
    out: Path,
    model: Any,
    spec: FeatureSpec,
    norm: Normalizer,
    seed: int,
    entry: dict[str, Any] | None,
) -> None:
    """A model folder `edufl audit attack` can attack (split and DP claim on its card)."""
    extra: dict[str, Any] = {"split": {"mode": "random", "seed": seed}, "centralized": True}
    if entry is not None:
        extra["dp"] = {"epsilon": entry["epsilon_after"], "delta": entry["delta"]}
    save_trained(out, model, name="lstm", task="risk", spec=spec, normalizer=norm, extra=extra)


def _table(
    aucs: dict[str, list[float]],
    notes: dict[str, str],
    n_train: int,
    n_test: int,
    args: argparse.Namespace,
    seconds: float,
) -> str:
    lines = [
        "# Utility cost of DP-SGD: LSTM at-risk ROC-AUC on the held-out test split",
        "",
        f"CENTRALIZED DP-SGD on the pooled synthetic consortium (4 institutions, 1200 students, "
        f"seed 0): {n_train} training and {n_test} test students per split, {args.seeds} "
        f"split/initialisation seed(s) from {args.seed}. DP rows: {args.epochs} epochs, Poisson "
        f"batches of {args.batch_size} expected, Adam lr {args.lr:g}, clipping {args.clip:g}, "
        f"delta {DELTA:g}, RDP accountant. {seconds:.0f} s in all.",
        "",
        "Command: `python -m simulations.dp_utility --out DIR`",
        "",
        "| training | ROC-AUC (mean ± sd) | notes (first seed) |",
        "|---|---:|---|",
    ]
    for row, values in aucs.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {row} | {statistics.mean(values):.3f} ± {sd:.3f} | {notes[row]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--epochs", type=int, default=15, help="DP training epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="expected batch size")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    parser.add_argument("--clip", type=float, default=1.0, help="per-student clipping norm")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # small LSTMs: more threads only contend
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    print(run(args))


if __name__ == "__main__":
    main()
