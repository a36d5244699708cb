"""Adopting the federation's global model locally, ready for scoring.

A federated checkpoint holds only weights and the architecture; every institution normalises its
inputs with its own training-split statistics (as it did while training), so the local model
folder pairs the global weights with this institution's normaliser. Nothing leaves the client.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from shared_models.data.cohort import Normalizer
from shared_models.data.contract import FeatureSpec
from shared_models.data.node import split_node
from shared_models.errors import DataContractError, EduflError
from shared_models.models.artifact import save_trained
from shared_models.models.checkpoints import latest_checkpoint
from shared_models.models.registry import build_model
from shared_models.models.weights import load_weights


def adopt_global_model(
    checkpoint: Path, data_dir: Path, spec: FeatureSpec, out_dir: Path, *, seed: int | None = None
) -> Path:
    """Write a scoring-ready model folder (model.pt + model.json) for this institution.

    Args:
        checkpoint: a run folder, its ``checkpoints`` folder, or one ``round-NNNN.json``.
        data_dir: this institution's export (its train split fixes the normalisation).
        spec: the consortium contract; must match the checkpoint's fingerprint.
        out_dir: where to write the model folder.
        seed: split seed; the federation's own by default, so the split matches training.

    Raises:
        DataContractError: no checkpoint, a corrupt one, or another contract.
    """
    manifest_path = checkpoint if checkpoint.suffix == ".json" else latest_checkpoint(checkpoint)
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text("utf-8"))
        weights = manifest_path.parent / manifest["weights"]
        name, overrides = str(manifest["model"]), manifest.get("model_overrides") or {}
        split_seed = int(manifest.get("seed", 0)) if seed is None else seed
        if not 0 <= split_seed < 2**32:
            raise ValueError(f"seed {split_seed} is not in [0, 2**32)")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataContractError(f"{manifest_path}: not a federated checkpoint ({exc})") from None
    if manifest.get("spec_fingerprint") != spec.fingerprint:
        raise DataContractError(
            f"{manifest_path}: trained on contract {str(manifest.get('spec_fingerprint'))[:12]}, "
            f"not {spec.short_fingerprint}; use the consortium's spec"
        )
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    if digest != manifest.get("weights_sha256"):
        raise DataContractError(f"{weights}: missing or does not match its manifest's checksum")
    try:
        model = build_model(name, spec.weeks, len(spec.dynamic), len(spec.static_names), overrides)
    except (EduflError, ValueError, TypeError) as exc:  # unknown model, invalid overrides
        raise DataContractError(f"{manifest_path}: cannot build its model ({exc})") from None
    load_weights(model, weights)
    train = split_node(data_dir, spec, seed=split_seed).train
    normalizer = Normalizer(spec.target.grade_min, spec.target.grade_max).fit(train)
    save_trained(
        out_dir,
        model,
        name=name,
        task=str(manifest.get("task", "risk")),
        spec=spec,
        normalizer=normalizer,
        extra={"federated_round": manifest.get("round"), "checkpoint": str(manifest_path)},
    )
    return out_dir
