"""Federated checkpoints as every reader finds them: a run folder's ``checkpoints/round-NNNN.json``
manifests, each naming its weights file and their SHA-256."""

from __future__ import annotations

from pathlib import Path

from shared_models.errors import DataContractError


def latest_checkpoint(run_dir: Path) -> Path:
    """The manifest (``round-NNNN.json``) of the last committed round of a federated run."""
    folder = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    manifests = sorted(folder.glob("round-*.json"))
    if not manifests:
        raise DataContractError(f"{run_dir}: no federated checkpoint (checkpoints/round-*.json)")
    return manifests[-1]
