"""DP training settings, swept: fed+DP at-risk ROC-AUC over centralized non-DP, several seeds.

The figures behind the DP-aware defaults (`server.config.DP_DEFAULTS`, issue 19): a coordinate
search from one starting point, each setting's federated DP runs at every epsilon and seed next
to the centralized non-private reference on the same splits and seeds.

- Federated DP: the real ServerApp and ClientApp on the inline engine
  (`simulations.runner.simulate(..., engine="inline")`: every node in this process, no Ray
  start-up), FedAvg, one virtual institution per export, DP-SGD at every institution with the
  setting's batch size, learning rate, local epochs, rounds and clipping norm, every field given
  explicitly (so the figures do not move when the shipped defaults do).
- Scored as ``edufl reproduce`` scores a federated row (`simulations.reproduce.runs`): the final
  global model on every institution's own seeded test split, normalised as that node would, the
  predictions pooled; exact ROC-AUC (a benchmark on public data, not a release).
- Reference: the centralized non-DP LSTM (the model's own defaults) trained on the same
  institutions' train splits pooled, with early stopping (`reproduce.runs.train_centralized`),
  scored on the same pooled test students. The ratio is fed+DP / centralized, seed by seed.

Data: the synthetic consortium (generated; ``--sizes`` students per institution), UCI
Portuguese (``uci-por``: one institution per school) or OULAD AAA (``oulad``: one per module
presentation) read from ``--data`` or ``../shared/datasets``; a public dataset that is not
there is skipped with a note.

    python -m bench.dp_sweep --dataset synthetic --sizes 1500,1500,1500,1500 --epsilons 8,1
    python -m bench.dp_sweep --dataset synthetic --sizes 6000,7000,8000,9000 \\
        --settings start,logistic --epsilons 8,3,1     # the demo's consortium
    python -m bench.dp_sweep --dataset uci-por --epsilons 8,1
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import RESULTS, Report, Row, Stats, log, markdown, parser

#: Every dataset the sweep knows; the public ones are read, never downloaded.
DATASETS = ("synthetic", "uci-por", "oulad")


@dataclass(frozen=True)
class Setting:
    """One DP training setting: what a federation's nodes run under DP-SGD."""

    name: str
    model: str = "lstm"  # lstm (hidden_size below) or logistic (engineered weekly features)
    hidden_size: int = 64  # lstm only
    batch_size: int = 256  # expected Poisson batch per node
    learning_rate: float = 0.01  # the nodes' Adam
    local_epochs: int = 1  # per round
    rounds: int = 5
    max_grad_norm: float = 1.0  # per-student clipping bound

    @property
    def overrides(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size} if self.model == "lstm" else {}

    def describe(self) -> str:
        width = f" h{self.hidden_size}" if self.model == "lstm" else ""
        return (
            f"{self.model}{width}, batch {self.batch_size}, lr {self.learning_rate:g}, "
            f"{self.local_epochs} epoch(s) x {self.rounds} rounds, clip {self.max_grad_norm:g}"
        )


#: The starting point: the demo's hand-chosen DP settings before issue 19 (LSTM(64), batch 256,
#: Adam 0.01, one local epoch per round, 5 rounds, clipping 1).
START = Setting("start")

#: A coordinate search: one lever moved at a time from `START`, each in the direction the DP
#: literature suggests might help and one the other way (larger batches and fewer steps for the
#: same epsilon, fewer parameters, the step size, the clipping bound), plus a linear model on
#: engineered features (Tramèr & Boneh 2021); then a few combinations (second stage).
GRID: tuple[Setting, ...] = (
    START,
    replace(START, name="batch128", batch_size=128),
    replace(START, name="batch512", batch_size=512),
    replace(START, name="lr0.003", learning_rate=0.003),
    replace(START, name="lr0.03", learning_rate=0.03),
    replace(START, name="epochs2", local_epochs=2),
    replace(START, name="rounds3", rounds=3),
    replace(START, name="rounds10", rounds=10),
    replace(START, name="clip0.5", max_grad_norm=0.5),
    replace(START, name="clip2", max_grad_norm=2.0),
    replace(START, name="hidden32", hidden_size=32),
    replace(START, name="hidden16", hidden_size=16),
    replace(START, name="logistic", model="logistic", learning_rate=0.05),
    # Second stage, for small institutions (UCI: a few hundred students, where batch 256 means
    # one or two steps a round): the levers that helped there, combined; the linear model with
    # more steps, and at the recurrent models' DP step size.
    replace(START, name="more-steps", batch_size=128, learning_rate=0.03, rounds=10),
    replace(START, name="logistic-b64", model="logistic", learning_rate=0.05, batch_size=64),
    replace(START, name="logistic-lr0.01", model="logistic", learning_rate=0.01),
)
SETTINGS = {s.name: s for s in GRID}


class SweepError(ValueError):
    """A sweep option that cannot be run (an unknown setting or dataset, a bad size)."""


def pick(names: str) -> list[Setting]:
    """The settings ``names`` (comma-separated) lists; ``all``: the whole grid."""
    if names.strip() == "all":
        return list(GRID)
    chosen = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name not in SETTINGS:
            raise SweepError(f"unknown setting {name!r}; choose from: all, {', '.join(SETTINGS)}")
        chosen.append(SETTINGS[name])
    if not chosen:
        raise SweepError("--settings names none; give e.g. start,logistic or all")
    return chosen


def load(dataset: str, source: Path | None, sizes: Sequence[int], work: Path) -> Any:
    """`simulations.reproduce.data.PreparedData` for ``dataset``; None when it is not here."""
    from shared_models.data.contract import default_spec
    from simulations.reproduce.config import ReproductionError
    from simulations.reproduce.data import PreparedData, prepare, resolve_source
    from simulations.synthetic import write_consortium

    if dataset == "synthetic":
        if any(n < 20 for n in sizes):
            raise SweepError(f"--sizes {sizes}: every institution needs at least 20 students")
        folder = work / ("synthetic-" + "-".join(str(n) for n in sizes))
        spec = default_spec()
        exports = write_consortium(folder, sizes=tuple(sizes), institutions=len(sizes), spec=spec)
        return PreparedData("synthetic", tuple(exports), spec, None, None, {})
    try:
        found = resolve_source(dataset, source)
    except ReproductionError as exc:
        log(f"skipping {dataset}: {exc}")
        return None
    return prepare(dataset, found, work)


def federated_dp_auc(
    data: Any, setting: Setting, epsilon: float, seed: int, run_dir: Path
) -> float:
    """One federated DP run on the inline engine; its final model's pooled test ROC-AUC."""
    from server.checkpoints import CheckpointStore
    from server.config import FederationConfig
    from shared_models.data.cohort import ModelInputs
    from shared_models.data.node import prepare_node_data
    from shared_models.evaluation import predict
    from shared_models.metrics import classification_metrics
    from shared_models.models.checkpoints import checkpoint_model
    from simulations.runner import simulate

    options = {
        "model": setting.model,
        "model_overrides": setting.overrides,
        "task": "risk",
        "strategy": "fedavg",
        "rounds": setting.rounds,
        "local_epochs": setting.local_epochs,
        "batch_size": setting.batch_size,
        "learning_rate": setting.learning_rate,
        "min_nodes": len(data.exports),
        "seed": seed,
        "out_dir": run_dir,
        "spec_path": data.spec_path,
        "dp_epsilon": epsilon,
        "dp_max_grad_norm": setting.max_grad_norm,
    }
    config = FederationConfig.from_options(None, options, source=f"setting {setting.name}")
    simulate(config, data.exports, engine="inline")
    last = CheckpointStore(run_dir).latest()
    if last is None:
        raise RuntimeError(f"{run_dir}: the federation committed no round")
    # As `simulations.reproduce.runs.train_federated` scores its final global model.
    model = checkpoint_model(last, data.spec)
    nodes = [prepare_node_data(p, data.spec, seed=seed) for p in data.exports]
    test = ModelInputs.concatenate([n.test for n in nodes])
    prob = predict(model, test)["risk"]
    return float(classification_metrics(test.at_risk, prob)["roc_auc"])


def centralized_auc(data: Any, seed: int, batch_size: int, patience: int) -> float:
    """The non-DP LSTM trained centrally on the same institutions' pooled train splits."""
    from simulations.reproduce.config import ModelEntry, Training
    from simulations.reproduce.runs import SplitCache, train_centralized

    split = SplitCache(data).holdout(seed)
    entry = ModelEntry(label="LSTM (centralized, no DP)", model="lstm")
    training = Training(batch_size=batch_size, patience=patience)
    scored = train_centralized(entry, "risk", data.spec, split, training, seed)
    return float(scored.metrics["roc_auc"])  # type: ignore[arg-type]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def cell(values: Sequence[float], digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def sweep(
    data: Any,
    settings: Sequence[Setting],
    epsilons: Sequence[float],
    seeds: Sequence[int],
    work: Path,
    *,
    central_batch_size: int = 32,
    central_patience: int = 10,
    reference: Sequence[float] = (),
) -> dict[str, Any]:
    """Every setting at every epsilon and seed, with the centralized reference per seed.

    ``reference``: the centralized ROC-AUC of each seed, in order, from an earlier sweep on the
    same data and seeds (it is deterministic per seed); empty trains it here.

    Returns ``{"central": {seed: auc}, "runs": [{setting, epsilon, seed, auc, ratio, seconds}]}``.
    """
    central: dict[int, float] = dict(zip(seeds, reference, strict=False))
    for seed in seeds:
        if seed in central:
            continue
        started = time.monotonic()
        central[seed] = centralized_auc(data, seed, central_batch_size, central_patience)
        log(f"{data.dataset} seed {seed}: centralized non-DP ROC-AUC {central[seed]:.4f} "
            f"({time.monotonic() - started:.0f} s)")  # fmt: skip
    runs = []
    for setting in settings:
        for epsilon in epsilons:
            for seed in seeds:
                started = time.monotonic()
                with tempfile.TemporaryDirectory(dir=work, prefix="run-") as tmp:
                    auc = federated_dp_auc(data, setting, epsilon, seed, Path(tmp) / "run")
                seconds = time.monotonic() - started
                runs.append(
                    {
                        "setting": setting.name,
                        "epsilon": epsilon,
                        "seed": seed,
                        "auc": auc,
                        "ratio": auc / central[seed],
                        "seconds": round(seconds, 1),
                    }
                )
                log(f"{data.dataset} {setting.name} eps {epsilon:g} seed {seed}: ROC-AUC "
                    f"{auc:.4f}, ratio {auc / central[seed]:.3f} ({seconds:.0f} s)")  # fmt: skip
    return {"central": central, "runs": runs}


def table_rows(
    dataset: str, result: dict[str, Any], settings: Sequence[Setting]
) -> list[list[str]]:
    """One Markdown row per (setting, epsilon): fed+DP and centralized mean ± sd, ratio."""
    central = list(result["central"].values())
    rows = []
    for setting in settings:
        for epsilon in sorted({r["epsilon"] for r in result["runs"]}, reverse=True):
            mine = [
                r
                for r in result["runs"]
                if r["setting"] == setting.name and r["epsilon"] == epsilon
            ]
            if not mine:
                continue
            rows.append(
                [
                    dataset,
                    setting.name,
                    setting.describe(),
                    f"{epsilon:g}",
                    cell([r["auc"] for r in mine]),
                    cell(central),
                    cell([r["ratio"] for r in mine]),
                    f"{statistics.median(r['seconds'] for r in mine):.0f}",
                ]
            )
    return rows


HEADER = [
    "dataset",
    "setting",
    "what",
    "ε",
    "fed+DP ROC-AUC",
    "centralized non-DP",
    "ratio",
    "s/run",
]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("dp_sweep", __doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset",
        action="append",
        choices=DATASETS,
        help="synthetic, uci-por or oulad; repeat for several (default: synthetic)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the public download for uci-por/oulad; default ../shared/datasets if present",
    )
    p.add_argument(
        "--sizes",
        type=_ints,
        default=[1500, 1500, 1500, 1500],
        help="synthetic: students per institution, comma-separated (default 1500 x 4)",
    )
    p.add_argument(
        "--epsilons", type=_floats, default=[8.0, 1.0], help="per institution (default 8,1)"
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument(
        "--settings",
        default="all",
        help=f"comma-separated names from the grid, or all: {', '.join(SETTINGS)}",
    )
    p.add_argument(
        "--central-batch-size", type=int, default=32, help="centralized reference's batch size"
    )
    p.add_argument(
        "--central-patience", type=int, default=10, help="its early-stopping patience (epochs)"
    )
    p.add_argument(
        "--reference",
        type=_floats,
        default=[],
        help="the centralized ROC-AUC per seed from an earlier sweep on the same data and "
        "seeds (comma-separated), instead of training it again",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: small models)")
    p.add_argument("--work", type=Path, default=RESULTS / "dp_sweep", help="data and run folder")
    args = p.parse_args(argv)
    try:
        settings = pick(args.settings)
        if args.seeds < 1:
            raise SweepError("--seeds must be at least 1")
        if args.reference and len(args.reference) != args.seeds:
            raise SweepError(
                f"--reference gives {len(args.reference)} value(s) for {args.seeds} seed(s)"
            )
        if args.quick:
            args.sizes, args.seeds, args.epsilons = [100, 100], 1, args.epsilons[:1]
            settings = [replace(s, rounds=1) for s in settings[:2]]
    except SweepError as exc:
        p.error(str(exc))

    import torch

    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("flwr", "edufl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    report = Report("dp_sweep", "DP-aware defaults (issue 19)", vars(args))
    report.details["settings"] = {s.name: asdict(s) for s in settings}
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    for dataset in args.dataset or ["synthetic"]:
        data = load(dataset, args.data, args.sizes, args.work)
        if data is None:
            report.details[dataset] = "skipped: no data"
            continue
        log(f"{dataset}: {len(data.exports)} institution(s); {len(settings)} setting(s) x "
            f"{len(args.epsilons)} epsilon(s) x {len(seeds)} seed(s)")  # fmt: skip
        result = sweep(
            data,
            settings,
            args.epsilons,
            seeds,
            args.work,
            central_batch_size=args.central_batch_size,
            central_patience=args.central_patience,
            reference=args.reference,
        )
        report.details[dataset] = result
        rows += table_rows(dataset, result, settings)
        for setting in settings:
            for epsilon in args.epsilons:
                ratios = [
                    r["ratio"]
                    for r in result["runs"]
                    if r["setting"] == setting.name and r["epsilon"] == epsilon
                ]
                report.add(
                    Row(
                        "DP-aware defaults",
                        f"{dataset} {setting.name} eps {epsilon:g}: fed+DP / centralized",
                        Stats.of(ratios),
                        "x",
                    )
                )
    print(markdown(HEADER, rows))
    report.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
