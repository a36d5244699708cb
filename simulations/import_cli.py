"""`edufl simulate import`: a public dataset download as institution exports, one per partition."""

from __future__ import annotations

import tomllib
from pathlib import Path

import typer

from shared_models.cli_support import user_errors


@user_errors
def import_dataset(
    dataset: str = typer.Argument(..., help="oulad or uci.", show_default=False),
    path: Path = typer.Argument(
        ..., help="The download: a folder holding its CSV files, or the zip they come in."
    ),
    out_dir: Path = typer.Argument(..., help="Folder to write one export per partition into."),
    partition: str | None = typer.Option(
        None,
        help="oulad: natural-module, natural-presentation (default); uci: school, "
        "school-subject (default); any: pooled, dirichlet, size-skew.",
        show_default=False,
    ),
    alpha: float = typer.Option(
        0.5, min=0.0, help="Dirichlet concentration for dirichlet / size-skew; small = skewed."
    ),
    clients: int | None = typer.Option(
        None, min=2, help="Number of clients; required by dirichlet and size-skew."
    ),
    week: int | None = typer.Option(
        None,
        min=1,
        help="Build the data as known at the end of week K (OULAD: 1-39; UCI: period 1 or 2).",
    ),
    seed: int = typer.Option(0, help="Random seed of synthetic partitions; same seed, same split."),
) -> None:
    """Import a public dataset: one institution export per partition, plus spec.toml.

    OULAD reads the official download (a folder of its seven CSVs, or the zip) and streams
    studentVle.csv, so the full 450 MB log needs memory for the students only. UCI Student
    Performance reads student-mat.csv and student-por.csv. Natural partitions are OULAD's
    modules or module presentations and UCI's schools (x subjects); dirichlet splits each
    label over --clients with concentration --alpha; size-skew draws client sizes instead.

    Example:

      edufl simulate import oulad ~/data/OULAD data/oulad --partition natural-presentation

      edufl simulate import uci ~/data/student.zip data/uci --partition dirichlet --clients 4
    """
    from simulations.datasets import registry as datasets
    from simulations.partition import MANIFEST, SPEC_FILE, SYNTHETIC_PARTITIONS

    module = datasets.get(dataset)
    chosen = partition or module.DEFAULT_PARTITION
    offered = datasets.partitions(dataset)
    if chosen not in offered:
        raise typer.BadParameter(
            f"{chosen!r} is not a {module.NAME} partition; choose one of: {', '.join(offered)}",
            param_hint="--partition",
        )
    if clients is not None and chosen not in SYNTHETIC_PARTITIONS:
        raise typer.BadParameter(
            f"--clients applies to {' and '.join(SYNTHETIC_PARTITIONS)} only; "
            f"{chosen} has its own number of parts",
            param_hint="--clients",
        )
    typer.echo(f"reading {module.NAME} from {path} ...", err=True)
    folders = module.to_exports(
        path, out_dir, partition=chosen, week=week, seed=seed, alpha=alpha, clients=clients
    )
    parts = tomllib.loads((out_dir / MANIFEST).read_text("utf-8"))["parts"]
    for folder in folders:
        info = parts[folder.name]
        typer.echo(
            f"wrote {folder}  ({info['records']} records, "
            f"{100 * info['at_risk_rate']:.1f} % at risk)"
        )
    typer.echo(f"contract: {out_dir / SPEC_FILE}   manifest: {out_dir / MANIFEST}")
    typer.echo("next, check each export against the contract, e.g.:")
    typer.echo(f"  edufl client validate {folders[0]} --spec {out_dir / SPEC_FILE}")
