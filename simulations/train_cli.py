"""`edufl train`: centralized training on pooled exports (the federated upper bound)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from shared_models.cli_support import user_errors
from shared_models.devices import DEVICE_HELP
from shared_models.model_names import MODEL_NAMES

if TYPE_CHECKING:
    from shared_models.training import EpochRecord


@user_errors
def train(
    data_dirs: list[Path] = typer.Argument(..., help="One or more institution export folders."),
    model: str = typer.Option("lstm", help=f"One of: {', '.join(MODEL_NAMES)}."),
    target: str = typer.Option("risk", help="risk, grade, or both (multi-task)."),
    out: Path = typer.Option(..., help="Output folder for metrics, weights, tables, plots."),
    split: str = typer.Option("random", help="random (70/15/15), stratified, or kfold."),
    folds: int = typer.Option(5, min=2, help="Folds when --split kfold."),
    epochs: int = typer.Option(100, min=1, help="Maximum epochs (early stopping, patience 10)."),
    batch_size: int = typer.Option(64, min=1),
    class_weighting: bool = typer.Option(False, help="Weight the rarer class up in the loss."),
    seed: int = typer.Option(0),
    spec: Path | None = typer.Option(None, help="Feature spec TOML; the default if omitted."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Pool exports and train one model centrally, against the scikit-learn baselines.

    Writes to OUT: metrics.json, model.pt + model.json (weights load with weights_only=True),
    results.md (model vs baselines), roc.png, grade_scatter.png, training_curves.png. The
    weights are saved as CPU tensors whatever --device trained them.

    Example:

      edufl train demo/consortium/institution_0* --model cnn-lstm --target risk --out runs/central
    """
    from tqdm import tqdm

    from shared_models.data.cohort import CohortArrays
    from shared_models.data.contract import load_spec
    from shared_models.data.loader import load_cohort
    from shared_models.devices import describe_device, resolve_device
    from shared_models.errors import DataContractError
    from shared_models.training import FitConfig
    from simulations.centralized import run_centralized

    if model not in MODEL_NAMES:
        raise DataContractError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    if target not in ("risk", "grade", "both"):
        raise DataContractError(f"--target must be risk, grade or both, not {target!r}")
    if split not in ("random", "stratified", "kfold"):
        raise DataContractError(f"--split must be random, stratified or kfold, not {split!r}")
    on = resolve_device(device)
    feature_spec = load_spec(spec)
    cohort = CohortArrays.concatenate([load_cohort(d, feature_spec) for d in data_dirs])
    typer.echo(f"pooled {len(cohort)} records from {len(data_dirs)} export(s)")
    if on.type != "cpu":
        typer.echo(f"training on {describe_device(on)}")
    cfg = FitConfig(
        max_epochs=epochs,
        batch_size=batch_size,
        class_weighting=class_weighting,
        seed=seed,
        device=str(on),
    )
    with tqdm(
        total=epochs, desc=f"training {model}", unit="epoch", leave=False, disable=None
    ) as bar:  # a bar on a terminal, silence in logs

        def on_epoch(record: EpochRecord) -> None:
            if record.epoch == 1:
                bar.reset()
            bar.update(1)
            bar.set_postfix(
                train=f"{record.train_loss:.4f}",
                val=f"{record.val_loss:.4f}" if record.val_loss is not None else "-",
            )

        runs = run_centralized(
            cohort,
            feature_spec,
            out,
            model_name=model,
            target=target,  # type: ignore[arg-type]
            split=split,  # type: ignore[arg-type]
            folds=folds,
            fit_config=cfg,
            on_epoch=on_epoch,
        )
    typer.echo((out / "results.md").read_text("utf-8"))
    stopped = runs[0]["epochs_run"]
    typer.echo(f"trained {stopped} epoch(s); outputs in {out}")
