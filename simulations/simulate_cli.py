"""`edufl simulate ...`: researchers' federated simulations and the synthetic consortium."""

from __future__ import annotations

from pathlib import Path

import typer

from shared_models.cli_support import new_app, user_errors
from shared_models.contract import load_spec
from shared_models.errors import DataContractError
from simulations.synthetic import write_consortium

app = new_app(
    "Researcher side: synthetic consortia and federated simulations.\n\n"
    "Example:\n\n  edufl simulate synth demo/consortium --institutions 4 --students 1200"
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
