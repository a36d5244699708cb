"""Adopting the federation's global model locally, ready for scoring.

A federated checkpoint holds only weights and the architecture; every institution normalises its
inputs as it did while training (`shared_models.data.node.node_normalizer`: the contract's
constants), so the local model folder pairs the global weights with that normaliser. Nothing
leaves the client.
"""

from __future__ import annotations

from pathlib import Path

from shared_models.data.contract import FeatureSpec
from shared_models.data.node import node_normalizer, split_node
from shared_models.errors import DataContractError
from shared_models.models.artifact import save_trained
from shared_models.models.checkpoints import (
    CheckpointError,
    checkpoint_model,
    checkpoint_seed,
    latest_checkpoint,
    read_checkpoint,
)


def adopt_global_model(
    checkpoint: Path, data_dir: Path, spec: FeatureSpec, out_dir: Path, *, seed: int | None = None
) -> Path:
    """Write a scoring-ready model folder (model.pt + model.json) for this institution.

    Args:
        checkpoint: a run folder, its ``checkpoints`` folder, or one ``round-NNNN.json``.
        data_dir: this institution's export (checked against the contract).
        spec: the consortium contract; must match the checkpoint's fingerprint.
        out_dir: where to write the model folder.
        seed: split seed; the federation's own by default, so the split matches training.

    Raises:
        DataContractError: no checkpoint, a corrupt one, or another contract.
    """
    manifest_path = checkpoint if checkpoint.suffix == ".json" else latest_checkpoint(checkpoint)
    try:
        found = read_checkpoint(manifest_path)
        split_seed = checkpoint_seed(found) if seed is None else seed
        if not 0 <= split_seed < 2**32:
            raise CheckpointError(f"{manifest_path}: seed {split_seed} is not in [0, 2**32)")
        model = checkpoint_model(found, spec)
    except CheckpointError as exc:  # the institution's input: a data-contract error to the CLI
        raise DataContractError(str(exc)) from None
    manifest = found.manifest
    train = split_node(data_dir, spec, seed=split_seed).train
    normalizer = node_normalizer(spec, train)
    save_trained(
        out_dir,
        model,
        name=manifest["model"],  # checkpoint_model built it, so it names a model
        task=str(manifest.get("task", "risk")),
        spec=spec,
        normalizer=normalizer,
        extra={
            "federated_round": manifest.get("round"),
            "checkpoint": str(manifest_path),
            "run_id": manifest.get("run_id"),
        },
    )
    return out_dir
