"""`edufl reproduce`: run a seed paper's experiment and write its table, JSON and plots.

The command imports what it runs in its body, so `edufl --help` starts without torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from shared_models.cli_support import user_errors
from shared_models.devices import DEVICE_HELP
from simulations.simulate_cli import RAY_ADDRESS, check_engine, resolve_engine

if TYPE_CHECKING:
    from server.rounds import RoundReport
    from simulations.reproduce.pipeline import Progress

# The choices --help lists, spelled here so that help needs neither torch nor pandas;
# tests/test_startup.py checks they equal `simulations.reproduce.data.DATASETS` and
# `simulations.reproduce.config.MODES`.
DATASET_NAMES = ("synthetic", "oulad", "uci", "uci-por", "uci-mat")
MODE_NAMES = ("centralized", "federated", "federated-dp")


def _terminal_progress() -> Progress:
    """A bar over the planned jobs on a terminal; one line per finished job everywhere."""
    from tqdm import tqdm

    from simulations.reproduce.pipeline import Progress

    class TerminalProgress(Progress):
        def __init__(self) -> None:
            self.bar: tqdm[None] | None = None

        def start(self, total: int) -> None:
            self.bar = tqdm(total=total, unit="job", leave=False, disable=None, file=sys.stderr)

        def job(self, text: str) -> None:
            if self.bar is not None:
                self.bar.set_description_str(text)

        def round(self, report: RoundReport, rounds: int) -> None:
            if self.bar is not None:
                self.bar.set_postfix_str(f"round {report.server_round}/{rounds}")

        def done(self, text: str) -> None:
            tqdm.write(f"  {text}", file=sys.stderr)
            if self.bar is not None:
                self.bar.set_postfix_str("")
                self.bar.update(1)

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()

    return TerminalProgress()


@user_errors
def reproduce(
    experiment: str | None = typer.Argument(
        None, help="An experiment (see --list), or an experiment .toml file.", show_default=False
    ),
    dataset: str | None = typer.Option(
        None, help=f"One of {', '.join(DATASET_NAMES)}; the experiment's default if omitted."
    ),
    data: Path | None = typer.Option(
        None,
        help="The OULAD or UCI download (its folder of CSVs, or the zip); default: "
        "../shared/datasets/... when that folder exists. Never downloaded.",
    ),
    out: Path | None = typer.Option(
        None, help="Output folder (replaced); default runs/reproduce/EXPERIMENT-DATASET."
    ),
    modes: str | None = typer.Option(
        None, help=f"Comma-separated subset of {','.join(MODE_NAMES)}; the experiment's if omitted."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Smoke test: 2 repeats, 2 epochs, 1 federated round."
    ),
    epsilons: str | None = typer.Option(
        None,
        help="Comma-separated epsilons replacing a privacy-utility sweep's (e.g. 1,4,16); the "
        "experiment's if omitted.",
    ),
    list_: bool = typer.Option(False, "--list", help="List the experiments and exit."),
    threads: int = typer.Option(
        1, min=1, help="torch threads; 1 is fastest for these small models on a shared machine."
    ),
    workers: int | None = typer.Option(
        None,
        min=1,
        help="Jobs run at once in worker processes (same results as one after another): every "
        "job on the inline engine; on Ray the centralized ones, while the federated ones run "
        "here. Default: the CPUs, at most 4; 1 runs every job in this process.",
        show_default=False,
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    engine: str = typer.Option(
        "auto",
        "--engine",
        help="The federated jobs' engine. ray: Flower's Ray engine, started once for every job "
        "(or a cluster, --ray-address), the jobs one after another; inline: each job's nodes in "
        "one process, without Ray, the jobs in the worker processes (--workers); auto: ray "
        "with --ray-address (or RAY_ADDRESS), else inline.",
    ),
    ray_address: str | None = RAY_ADDRESS,
) -> None:
    """Reproduce a seed paper's experiment centralized, federated and federated with DP.

    Writes OUT/results.md (every table with the command that produced it), OUT/results.json
    and the plots. OULAD and UCI are read from --data; the synthetic consortium is generated.

    Example:

      edufl reproduce --list

      edufl reproduce cnn-lstm --dataset oulad --data ~/data/OULAD --out runs/cnn-lstm-oulad

      edufl reproduce at-risk-lstm --quick --modes centralized

      edufl reproduce privacy-utility --dataset synthetic --engine inline
    """
    from shared_models.devices import resolve_device
    from simulations.reproduce.config import (
        MODES,
        ReproductionError,
        experiment_names,
        load_experiment,
        with_epsilons,
    )
    from simulations.reproduce.pipeline import (
        command_line,
        default_workers,
        new_reproduction,
        run_jobs,
    )
    from simulations.reproduce.report import write_report

    if list_:
        for name in experiment_names():
            cfg = load_experiment(name)
            typer.echo(f"{name:18s} {cfg.title}")
            typer.echo(f"{'':18s} datasets: {', '.join(cfg.datasets)}")
        return
    if experiment is None:
        raise typer.BadParameter("give an EXPERIMENT (see edufl reproduce --list)")
    check_engine(engine, ray_address)
    engine = resolve_engine(engine, ray_address)
    on = resolve_device(device).type  # before anything is written
    config = load_experiment(experiment)
    if epsilons is not None:
        config = with_epsilons(config, epsilons)
    chosen = [m.strip() for m in modes.split(",") if m.strip()] if modes else None
    bad = [m for m in chosen or [] if m not in MODES]
    if bad:
        raise ReproductionError(f"--modes: {', '.join(bad)} unknown; choose among {MODES}")
    name = dataset or config.default_dataset
    out_dir = out or Path("runs") / "reproduce" / f"{config.name}-{name}"
    import torch

    torch.set_num_threads(threads)
    rep = new_reproduction(
        config,
        name,
        data=data,
        out_dir=out_dir,
        modes=chosen,
        quick=quick,
        command=command_line(
            experiment,
            name,
            data,
            out_dir,
            chosen,
            quick,
            engine,
            epsilons=config.epsilons if epsilons is not None else None,
        ),
        device=on,
        engine=engine,
        ray_address=ray_address or None,
        workers=workers or default_workers(),
        threads=threads,
    )
    typer.echo(
        f"{config.name} on {name}: {len(rep.jobs)} jobs ({rep.workers} at once); {config.title}",
        err=True,
    )
    progress = _terminal_progress()
    try:
        run_jobs(rep, progress)
    finally:
        progress.close()
        if rep.error and rep.outcomes:  # keep what finished before the error
            typer.echo(f"stopped: {rep.error}; partial results in {write_report(rep)}", err=True)
    path = write_report(rep)
    typer.echo(path.read_text("utf-8"))
    typer.echo(f"done in {rep.seconds:.0f} s; outputs in {out_dir}", err=True)
