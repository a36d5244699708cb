"""`edufl simulate ...`: researchers' federated simulations and the synthetic consortium.

Commands import what they run in their bodies, so `edufl --help` starts without Flower, Ray
and torch.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import typer

from server.cli import DP_EVALUATE_EVERY, INIT_FROM
from shared_models.cli_support import new_app, user_errors
from shared_models.devices import DEVICE_HELP
from simulations.import_cli import import_dataset

app = new_app(
    "Researcher side: synthetic consortia and federated simulations.\n\n"
    "Example:\n\n  edufl simulate synth demo/consortium --institutions 4 --students 1200\n\n"
    "  edufl simulate run --synthetic 4 --rounds 5 --model lstm --out runs/fedavg"
)


#: `simulations.runner.ENGINES`, spelled here so that --help needs no Flower (a test checks),
#: and ``auto`` (`resolve_engine`).
ENGINE_NAMES = ("auto", "ray", "inline")
#: ``--ray-address`` and ``--engine``, shared with `edufl reproduce` (one help, one check).
RAY_ADDRESS: str | None = typer.Option(
    None,
    "--ray-address",
    envvar="RAY_ADDRESS",
    help="Join this Ray cluster (HOST:PORT, auto) instead of starting Ray; all paths "
    "absolute, on storage every node mounts.",
)
ENGINE: str = typer.Option(
    "auto",
    "--engine",
    help="ray: Flower's Ray engine (clusters, GPU shares, nodes in parallel on many cores); "
    "inline: every node in this process, one after another, without Ray's start-up; auto: "
    "ray with --ray-address (or RAY_ADDRESS) or --gpus-per-node, else inline.",
)


def resolve_engine(engine: str, ray_address: str | None, gpus_per_node: float | None = None) -> str:
    """The engine ``auto`` stands for: Ray where only Ray can do it, else inline.

    Only Ray joins a cluster or reserves GPU shares. On one machine the inline engine starts in
    no time, where Ray's start-up is most of a simulation of a few thousand students
    (docs/benchmarks.md: 3.6x the centralized time at 1,200 students on Ray, 1.5x inline).
    """
    if engine != "auto":
        return engine
    return "ray" if ray_address or gpus_per_node is not None else "inline"


def check_engine(engine: str, ray_address: str | None) -> None:
    """Refuse an unknown ``--engine``, or ``inline`` with a Ray cluster to join.

    Raises:
        typer.BadParameter: naming the option and how to fix the call.
    """
    if engine not in ENGINE_NAMES:
        raise typer.BadParameter(
            f"--engine must be one of {', '.join(ENGINE_NAMES)}, not {engine!r}"
        )
    if engine == "inline" and ray_address:
        raise typer.BadParameter(
            f"--engine inline runs every node in this process and cannot join the Ray cluster "
            f"{ray_address}; use --engine ray, or drop --ray-address (and unset RAY_ADDRESS)"
        )


@app.command()
@user_errors
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write one export per institution into."),
    institutions: int = typer.Option(4, min=1, max=200, help="Number of institutions."),
    students: int = typer.Option(1200, min=20, help="Students in total, split unevenly."),
    weeks: int | None = typer.Option(
        None, min=1, max=104, help="Weeks per term; the spec's number if omitted."
    ),
    seed: int = typer.Option(0, help="Random seed; the same seed writes the same bytes."),
    spec: Path | None = typer.Option(None, help="Feature spec TOML; the default if omitted."),
    file_format: str = typer.Option("csv", "--format", help="csv or parquet."),
) -> None:
    """Write a synthetic consortium: one institution export per folder, plus a manifest.

    Latent ability and engagement drive weekly activity and scores; at-risk students tend to
    disengage; institutions differ in size, grading, program mix and engagement (non-IID);
    about 5 % of values are missing and a few records are incomplete.

    Example:

      edufl simulate synth demo/consortium --institutions 4 --students 1200 --weeks 15 --seed 0
    """
    from shared_models.data.contract import load_spec
    from shared_models.errors import DataContractError
    from simulations.synthetic import write_consortium

    if file_format not in ("csv", "parquet"):
        raise DataContractError(f"--format must be csv or parquet, not {file_format!r}")
    if students < 20 * institutions:
        raise DataContractError(
            f"--students {students} is too few for {institutions} institutions; "
            f"give at least {20 * institutions}"
        )
    feature_spec = load_spec(spec)
    folders = write_consortium(
        out_dir,
        institutions=institutions,
        students=students,
        weeks=weeks,
        seed=seed,
        spec=feature_spec,
        file_format=file_format,
    )
    for folder in folders:
        typer.echo(f"wrote {folder}")
    typer.echo(f"manifest: {out_dir / 'consortium.toml'}")


@app.command()
@user_errors
def run(
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints, metrics, summary."),
    data: list[Path] = typer.Option(
        [], "--data", help="An institution export folder; repeat for each virtual node."
    ),
    synthetic: int | None = typer.Option(
        None, min=1, max=200, help="Generate N synthetic institutions into OUT/consortium."
    ),
    students: int = typer.Option(1200, min=20, help="Students in total with --synthetic."),
    config: Path | None = typer.Option(
        None, "--config", help="Federation config TOML; the options below override it."
    ),
    model: str | None = typer.Option(None, help="Model name (lstm, gru, cnn-lstm, ...)."),
    strategy: str | None = typer.Option(
        None, help="fedavg, fedprox, fedadam, fedyogi, fedadagrad, fedavgm, fedmedian, ..."
    ),
    strategy_param: list[str] = typer.Option(
        [], "--strategy-param", help="A strategy parameter as KEY=VALUE (e.g. eta=0.01)."
    ),
    rounds: int | None = typer.Option(None, min=1, help="Rounds in total (default 5)."),
    local_epochs: int | None = typer.Option(
        None, min=1, help="Local epochs per round (default 3; under DP 1)."
    ),
    batch_size: int | None = typer.Option(
        None, min=1, help="Local batch size (default 32; under DP 256)."
    ),
    lr: float | None = typer.Option(
        None,
        "--lr",
        help="Local Adam learning rate (default: the model's, 1e-3 for the recurrent models; "
        "under DP 0.03, 0.05 for logistic).",
    ),
    average_rounds: float | None = typer.Option(
        None,
        min=0,
        max=1,
        help="Share of the last rounds whose global models the released model averages "
        "(default 0: the last round's; under DP 0.5, the last half).",
    ),
    proximal_mu: float | None = typer.Option(None, help="FedProx's proximal coefficient."),
    fraction_train: float | None = typer.Option(None, help="Share of nodes trained per round."),
    min_nodes: int | None = typer.Option(None, min=1, help="Nodes per round (default: all)."),
    seed: int | None = typer.Option(None, help="Seed of weights, splits and shuffling."),
    spec: Path | None = typer.Option(None, help="Feature spec TOML; the default if omitted."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT's last checkpoint."),
    cpus_per_node: float = typer.Option(
        1.0, min=0.05, help="Ray CPUs per virtual node; 1 runs one node per core at once."
    ),
    centralized: bool = typer.Option(
        False, "--centralized", help="Also train centrally on the same pooled splits; compare."
    ),
    dp_epsilon: float | None = typer.Option(
        None, "--dp-epsilon", help="Train with DP-SGD: each institution's epsilon for the run."
    ),
    dp_delta: float | None = typer.Option(
        None, "--dp-delta", help="DP delta per institution (default 1e-5; below 1/students)."
    ),
    dp_max_grad_norm: float | None = typer.Option(
        None, "--dp-max-grad-norm", help="DP per-student gradient clipping bound (default 1)."
    ),
    dp_evaluate_every: int | None = DP_EVALUATE_EVERY,
    init_from: Path | None = INIT_FROM,
    ray_address: str | None = RAY_ADDRESS,
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    engine: str = ENGINE,
    gpus_per_node: float | None = typer.Option(
        None,
        "--gpus-per-node",
        min=0.0001,
        max=1.0,
        help="On CUDA: the share of a GPU each virtual node reserves (default: the GPUs Ray "
        "sees, shared among the nodes).",
    ),
) -> None:
    """Run a federated simulation: one virtual node per institution export, on Ray or inline.

    Prints one line per round and writes OUT/metrics.jsonl, OUT/checkpoints/, OUT/summary.md and
    OUT/rounds.png. A run interrupted for any reason continues with --resume. With --ray-address
    (or RAY_ADDRESS) the virtual nodes run on an existing Ray cluster; --engine inline runs them
    in this process instead, without Ray's start-up (docs/simulations.md, "Engines"). With
    --dp-epsilon, the local epochs, batch size, learning rate and averaged rounds not given take
    the DP defaults (server.config.DP_DEFAULTS; docs/results.md, "DP-aware defaults (issue 19)").

    Example:

      edufl simulate run --synthetic 4 --rounds 5 --model lstm --strategy fedavg --out runs/fedavg

      edufl simulate run --synthetic 2 --rounds 5 --engine inline --out runs/quick

      edufl simulate run --ray-address 10.0.0.1:6379 --data /nfs/a --data /nfs/b --out /nfs/runs/ab
    """
    from server.config import FederationConfig
    from server.federation import progress_line
    from shared_models.atomic import write_text_atomic
    from shared_models.data.contract import load_spec
    from shared_models.devices import parse_device, resolve_device
    from shared_models.errors import DataContractError
    from shared_models.protocol import RISK_ROC_AUC
    from simulations.runner import simulate
    from simulations.synthetic import write_consortium

    if bool(data) == (synthetic is not None):
        raise typer.BadParameter("give either --data DIR (repeatable) or --synthetic N")
    check_engine(engine, ray_address)
    engine = resolve_engine(engine, ray_address, gpus_per_node)
    if engine == "inline" and gpus_per_node is not None:
        raise typer.BadParameter(
            "--gpus-per-node is a Ray reservation; with --engine inline the nodes take turns "
            "on the whole GPU: drop it, or use --engine ray"
        )
    device = parse_device(device)
    if not ray_address:  # fail before writing anything; on a cluster, Ray counts the GPUs
        resolve_device(device)
    if ray_address and not out.is_absolute():
        raise typer.BadParameter(
            f"--out {str(out)!r} is relative: on the Ray cluster {ray_address} every node writes "
            "below it, so give an absolute path on storage every node mounts"
        )
    if synthetic is not None:
        if students < 20 * synthetic:
            raise DataContractError(
                f"--students {students} is too few for {synthetic} institutions"
            )
        data = write_consortium(
            out / "consortium",
            institutions=synthetic,
            students=students,
            seed=0 if seed is None else seed,
            spec=load_spec(spec),
        )
    # Without a config file a round waits for every export's node, unless --min-nodes says.
    if min_nodes is None and config is None:
        min_nodes = len(data)
    options = {
        "model": model,
        "strategy": strategy,
        "strategy_params": _strategy_params(strategy_param) or None,
        "rounds": rounds,
        "local_epochs": local_epochs,
        "batch_size": batch_size,
        "learning_rate": lr,
        "average_rounds": average_rounds,
        "proximal_mu": proximal_mu,
        "fraction_train": fraction_train,
        "min_nodes": min_nodes,
        "seed": seed,
        "spec_path": spec,
        "resume": resume or None,
        "out_dir": out,
        "dp_epsilon": dp_epsilon,
        "dp_delta": dp_delta,
        "dp_max_grad_norm": dp_max_grad_norm,
        "dp_evaluate_every": dp_evaluate_every,
        "init_from": init_from,
    }
    federation = FederationConfig.from_options(config, options, source="options")
    started = time.monotonic()
    result = simulate(
        federation,
        data,
        cpus_per_node=cpus_per_node,
        on_round=lambda report: typer.echo(progress_line(report, federation.rounds)),
        ray_address=ray_address or None,
        device=device,
        gpus_per_node=gpus_per_node,
        engine=engine,
    )
    final = result.evaluate.get(RISK_ROC_AUC)
    noised = ""
    if result.noised:  # computed from the nodes' noised histograms, never from exact values
        std = result.released.get(RISK_ROC_AUC, {}).get("noise_std", math.nan)
        noised = f" (noised histograms, count noise std {std:.1f})"
    typer.echo(
        f"done in {time.monotonic() - started:.1f} s; final federated ROC-AUC: "
        + ("n/a" if final is None or math.isnan(final) else f"{final:.4f}")
        + f"{noised}; see {out / 'summary.md'}"
    )
    if federation.dp_epsilon is not None:
        typer.echo(f"privacy ledger: {out / 'ledger.jsonl'} (edufl audit verify / budget)")
    if centralized:
        from simulations.reference import centralized_reference

        ref = centralized_reference(federation, data)
        write_text_atomic(out / "centralized.json", json.dumps(vars(ref), indent=2, default=str))
        typer.echo(
            f"centralized on the same splits: ROC-AUC {ref.weighted_roc_auc:.4f} (weighted over "
            f"institutions), {ref.pooled_roc_auc:.4f} (pooled test set)"
        )


def _strategy_params(pairs: list[str]) -> dict[str, float]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            params[key.strip().replace("-", "_")] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise typer.BadParameter(f"--strategy-param {pair!r}: expected KEY=NUMBER")
    return params


app.command("import")(import_dataset)
