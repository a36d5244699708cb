"""`edufl demo`: the README's main job on the embedded default, the synthetic consortium."""

from __future__ import annotations

from pathlib import Path

import typer

from client.loader import load_cohort
from client.validate import validate_export
from shared_models.cli_support import user_errors
from shared_models.cohort import CohortArrays
from shared_models.contract import default_spec
from shared_models.errors import DataContractError
from shared_models.training import FitConfig
from simulations.centralized import run_centralized
from simulations.synthetic import write_consortium


@user_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for everything the demo writes."),
    seed: int = typer.Option(0, help="Seed of the synthetic consortium and of training."),
) -> None:
    """Run the main job end to end on the synthetic consortium and print the results.

    Generates 4 institutions (1,200 students, 15 weeks), validates every export against the
    data contract, then trains and evaluates the at-risk model, writing tables and plots.

    Example:

      edufl demo --out runs/demo
    """
    spec = default_spec()
    consortium = out / "consortium"
    typer.echo(f"[1/3] synthetic consortium -> {consortium}")
    folders = write_consortium(consortium, institutions=4, students=1200, seed=seed, spec=spec)

    typer.echo("[2/3] validating each institution's export against the data contract")
    for folder in folders:
        report, _ = validate_export(folder, spec)
        if not report.usable:
            raise DataContractError(
                f"{folder}: generated export failed validation: {report.errors[0]}"
            )
        typer.echo(
            f"      {folder.name}: {report.n_students} students, "
            f"{100 * (report.at_risk_rate or 0):.0f} % at risk, "
            f"{len(report.low_completeness)} incomplete record(s) dropped, usable"
        )

    central = out / "centralized"
    typer.echo(f"[3/3] centralized LSTM on the pooled consortium (upper bound) -> {central}")
    cohort = CohortArrays.concatenate([load_cohort(f, spec) for f in folders])
    run_centralized(
        cohort, spec, central, model_name="lstm", target="risk", fit_config=FitConfig(seed=seed)
    )
    typer.echo("")
    typer.echo((central / "results.md").read_text("utf-8"))
    typer.echo(f"plots: {central / 'roc.png'}, {central / 'training_curves.png'}")
