"""Federated checkpoints: the one format the server writes and every reader reads.

Layout of a run folder::

    checkpoints/round-0003.weights    global weights after round 3 (shared_models.models.weights:
                                      safetensors, or torch's zip loaded with weights_only)
    checkpoints/round-0003.state      server optimizer state (FedAdam moments ...), if any
    checkpoints/round-0003.json       manifest: round, strategy, model, spec, metrics, hashes

Each file is written to a temporary name and renamed into place, the weights and state first and
the manifest last: the manifest commits the round. A manifest names its files (plain names next
to it) and their SHA-256; readers check both before loading anything. The server resumes from
a checkpoint (`server.checkpoints`), an institution adopts one (`client.global_model`), an
auditor attacks one (`privacy.audit.federated`) and the reproductions score one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared_models.atomic import write_atomic, write_text_atomic
from shared_models.data.contract import FeatureSpec
from shared_models.errors import DataContractError, EduflError
from shared_models.models.artifact import CARD_FILE
from shared_models.models.registry import build_model
from shared_models.models.weights import assign_weights, load_tensors, save_weights
from shared_models.user_files import describe_read_error, loads_json, read_text

CHECKPOINTS = "checkpoints"
FORMAT_VERSION = 1


class CheckpointError(EduflError, RuntimeError):
    """A checkpoint is missing, damaged or belongs to a different run."""


@dataclass(frozen=True)
class Checkpoint:
    """A committed round: its manifest and where its files are."""

    round: int
    manifest: dict[str, Any]
    weights_path: Path
    state_path: Path | None
    manifest_path: Path | None = None  # for messages: the file that named the others


def write_checkpoint(
    folder: Path,
    server_round: int,
    model: nn.Module,
    manifest: Mapping[str, Any],
    *,
    state: Mapping[str, np.ndarray] | None = None,
    before_commit: Callable[[], object] | None = None,
) -> Checkpoint:
    """Commit round ``server_round`` to ``folder``: weights, optional state, then the manifest.

    Args:
        folder: the run's ``checkpoints`` folder (created if missing).
        server_round: the round just completed (1-based).
        model: a model holding the round's global weights.
        manifest: run facts to record (strategy, model, spec fingerprint, metrics ...).
        state: server-side strategy state to restore on resume.
        before_commit: called once the files are written, before the manifest commits them
            (the server appends the round's metrics line there).
    """
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"round-{server_round:04d}"
    weights_path = save_weights(model, stem.with_suffix(".weights"))  # written atomically
    state_path = None
    if state:
        state_path = stem.with_suffix(".state")
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
        write_atomic(state_path, lambda tmp: torch.save(tensors, tmp))
    if before_commit is not None:
        before_commit()
    full = {
        **manifest,
        "format": FORMAT_VERSION,
        "round": server_round,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "weights": weights_path.name,
        "weights_sha256": _sha256(weights_path),
        "state": state_path.name if state_path else None,
        "state_sha256": _sha256(state_path) if state_path else None,
    }
    manifest_path = stem.with_suffix(".json")
    write_text_atomic(manifest_path, json_text(full, indent=2) + "\n")
    return Checkpoint(server_round, full, weights_path, state_path, manifest_path)


def latest_checkpoint(run_dir: Path) -> Path:
    """The manifest (``round-NNNN.json``) of the last committed round of a federated run.

    Args:
        run_dir: a run folder or its ``checkpoints`` folder.

    Raises:
        DataContractError: the folder holds no manifest.
    """
    folder = run_dir / CHECKPOINTS if (run_dir / CHECKPOINTS).is_dir() else run_dir
    manifests = sorted(folder.glob("round-*.json"))
    if not manifests:
        raise DataContractError(f"{run_dir}: no federated checkpoint (checkpoints/round-*.json)")
    return manifests[-1]


def list_checkpoints(folder: Path) -> list[Checkpoint]:
    """The committed checkpoints in a ``checkpoints`` folder, oldest round first.

    Raises:
        CheckpointError: a manifest is unreadable or malformed; the message names it.
    """
    found = [read_checkpoint(path) for path in sorted(folder.glob("round-*.json"))]
    return sorted(found, key=lambda c: c.round)


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint that the manifest at ``path`` commits (its files are not read yet).

    Raises:
        CheckpointError: the manifest is unreadable or malformed; the message names it.
    """
    try:
        manifest = loads_json(read_text(path))
    except (OSError, ValueError) as exc:
        reason = describe_read_error(exc) if isinstance(exc, OSError) else exc
        raise CheckpointError(
            f"{path}: unreadable manifest ({reason}); restore it from a backup or "
            "move the round's files out of the run folder"
        ) from None
    problem = None
    if not isinstance(manifest, dict):
        problem = "not a JSON object"
    else:
        round_, weights, state = (manifest.get(k) for k in ("round", "weights", "state"))
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            problem = f"round must be a whole number >= 0, not {round_!r}"[:200]
        elif not _plain_name(weights):
            problem = f"weights must name a file next to the manifest, not {weights!r}"[:200]
        elif state is not None and not _plain_name(state):
            problem = f"state must name a file next to the manifest, not {state!r}"[:200]
    if problem is not None:
        raise CheckpointError(f"{path}: malformed manifest ({problem})")
    return Checkpoint(
        manifest["round"],
        manifest,
        path.with_name(manifest["weights"]),
        path.with_name(manifest["state"]) if manifest.get("state") else None,
        path,
    )


def load_checkpoint(checkpoint: Checkpoint, model: nn.Module) -> dict[str, np.ndarray]:
    """Load the checkpoint's weights into ``model``; return its strategy state.

    Raises:
        CheckpointError: a file is missing, its hash differs from the manifest's, or its
            tensors do not fit ``model``.
    """
    named_in = checkpoint.manifest_path
    tensors = checkpoint_tensors(checkpoint)
    try:
        assign_weights(model, tensors)
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint.weights_path}: {exc}") from None
    if checkpoint.state_path is None:
        return {}
    # Manifests written before state_sha256 existed carry no hash for the state.
    if "state_sha256" in checkpoint.manifest:
        expected = checkpoint.manifest["state_sha256"]
        _check_file(checkpoint.state_path, expected, "state tensors", named_in)
    try:
        tensors = load_tensors(checkpoint.state_path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return {k: v.numpy() for k, v in tensors.items()}


def checkpoint_tensors(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's global weights by name, once their checksum matches the manifest's.

    Read without unpickling and finite (`load_tensors`), not yet fitted to any model.

    Raises:
        CheckpointError: the weights file is missing, damaged or not the manifest's.
    """
    _check_file(
        checkpoint.weights_path,
        checkpoint.manifest.get("weights_sha256"),
        "weights",
        checkpoint.manifest_path,
    )
    try:
        return load_tensors(checkpoint.weights_path)
    except ValueError as exc:  # WeightsError names the file
        raise CheckpointError(str(exc)) from None


def checkpoint_manifest(source: Path) -> Path:
    """The manifest a run folder, its ``checkpoints`` folder or one checkpoint file stands for.

    Args:
        source: a run folder (its last committed round), a ``checkpoints`` folder, or one
            ``round-NNNN.json`` (or its ``.weights``).

    Raises:
        DataContractError: no checkpoint there.
    """
    if source.is_file():
        if source.suffix == ".weights":
            source = source.with_suffix(".json")
        if source.suffix == ".json" and source.name != CARD_FILE and source.is_file():
            return source
        raise DataContractError(
            f"{source}: not a federated checkpoint (checkpoints/round-NNNN.json)"
        )
    if not source.is_dir():
        raise DataContractError(f"{source}: no such run folder or checkpoint")
    return latest_checkpoint(source)


def is_checkpoint_path(path: Path) -> bool:
    """Whether ``path`` looks like a federated run or checkpoint (a model folder does not)."""
    if path.is_file():
        return path.suffix in (".json", ".weights") and path.name != CARD_FILE
    return path.is_dir() and ((path / CHECKPOINTS).is_dir() or any(path.glob("round-*.json")))


def checkpoint_model(checkpoint: Checkpoint, spec: FeatureSpec) -> nn.Module:
    """The global model a checkpoint holds, built from its manifest for ``spec``'s shapes.

    Raises:
        CheckpointError: the checkpoint was trained on another contract, its model cannot be
            built, or its weights are missing, damaged or of another architecture.
    """
    manifest, where = checkpoint.manifest, checkpoint.manifest_path or checkpoint.weights_path
    if manifest.get("spec_fingerprint") != spec.fingerprint:
        raise CheckpointError(
            f"{where}: trained on contract {str(manifest.get('spec_fingerprint'))[:12]}, "
            f"not {spec.short_fingerprint}; use the consortium's spec (--spec)"
        )
    name, overrides = manifest.get("model"), manifest.get("model_overrides") or {}
    try:
        if not isinstance(name, str):
            raise ValueError(f"model must be a model name, not {name!r}"[:200])
        model = build_model(name, spec.weeks, len(spec.dynamic), len(spec.static_names), overrides)
    except (EduflError, ValueError, TypeError) as exc:  # unknown model, invalid overrides
        raise CheckpointError(f"{where}: cannot build its model ({exc})") from None
    load_checkpoint(checkpoint, model)
    return model


def checkpoint_seed(checkpoint: Checkpoint) -> int:
    """The federation's seed, which fixed every institution's train/validation/test split.

    Raises:
        CheckpointError: the manifest's seed is not a whole number in [0, 2**32).
    """
    seed = checkpoint.manifest.get("seed", 0)
    whole = isinstance(seed, int) or (isinstance(seed, float) and seed.is_integer())
    if isinstance(seed, bool) or not whole or not 0 <= seed < 2**32:
        where = checkpoint.manifest_path or checkpoint.weights_path
        raise CheckpointError(
            f"{where}: seed must be a whole number in [0, 2**32), not {seed!r}"[:300]
        )
    return int(seed)


def json_text(value: Any, *, indent: int | None = None) -> str:
    """``value`` as strict JSON with sorted keys: NaN and infinities as null, NumPy as numbers."""
    return json.dumps(_finite(value), indent=indent, sort_keys=True, default=_json_default)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plain_name(name: Any) -> bool:
    """A file name without any folder part (a manifest must not point outside its folder)."""
    return (
        isinstance(name, str)
        and 0 < len(name.encode("utf-8", "surrogatepass")) <= 255  # NAME_MAX
        and name not in ("", ".", "..")
        and "\x00" not in name
        and Path(name).name == name
        and "\\" not in name
    )


def _check_file(path: Path, expected: Any, what: str, manifest: Path | None) -> None:
    named = f" (named in {manifest.name})" if manifest is not None else ""
    try:
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint {what} are missing{named}")
        digest = _sha256(path)
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot read checkpoint {what}{named} ({exc.strerror})"
        ) from None
    if digest != expected:
        raise CheckpointError(
            f"{path}: {what} do not match the manifest's checksum{named} (damaged or replaced)"
        )


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: strict JSON that every reader accepts."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    """NumPy scalars as numbers, paths as strings."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
