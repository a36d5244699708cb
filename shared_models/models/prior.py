"""A public prior: a federated run's initial weights taken from a model trained on public data.

`edufl simulate run | server start --init-from MODEL` start the federation from MODEL's weights
instead of seeded random ones. MODEL takes the forms an institution's ``--model`` takes: a model
folder (``model.json`` + ``model.pt``, from `edufl train` or `edufl client adopt`), its
``model.pt`` or ``model.json``, a federated run folder (its last committed round), its
``checkpoints`` folder, or one checkpoint (``round-NNNN.json`` or its ``.weights``).

Nothing in the files is trusted: the checksum the card or manifest names must match, the tensors
are read without unpickling and must be finite, and they must fit the run's model by name and
shape. Where the prior's data came from cannot be checked here: DP covers the institutions'
records only if the prior saw none of them (docs/privacy.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from shared_models.data.contract import FeatureSpec
from shared_models.errors import DataContractError, EduflError
from shared_models.models.artifact import (
    model_folder_of,
    read_model_folder,
)
from shared_models.models.checkpoints import (
    checkpoint_manifest,
    checkpoint_tensors,
    is_checkpoint_path,
    read_checkpoint,
)
from shared_models.models.registry import validate_model_config
from shared_models.models.weights import assign_weights, check_weights

#: The input normalisation of every federation node (`shared_models.data.node`).
NODE_NORMALIZATION = "contract"


class PriorError(DataContractError):
    """A prior (``--init-from``) that is missing, damaged or does not fit the run's model."""


@dataclass(frozen=True)
class Prior:
    """A prior's weights and what its files say about them, checked but not yet applied."""

    source: Path  # as given
    kind: Literal["model", "checkpoint"]
    weights_path: Path
    weights_sha256: str  # of the weights file's bytes (what `sha256sum` prints)
    model: str
    config: dict[str, Any]  # the prior's full model config
    task: str | None
    spec_fingerprint: str | None  # None: its files do not say
    normalization: str | None  # the input normalisation it was trained with
    tensors: dict[str, torch.Tensor]

    def record(self) -> dict[str, Any]:
        """What a run records about its start (checkpoint manifests, ``summary.md``)."""
        return {
            "path": str(self.source),
            "kind": self.kind,
            "weights": str(self.weights_path.resolve()),
            "weights_sha256": self.weights_sha256,
            "model": self.model,
            "spec_fingerprint": self.spec_fingerprint,
        }


def read_prior(path: Path) -> Prior:
    """Read and check the prior at ``path`` (any of the forms in the module docstring).

    Raises:
        PriorError: no such path, none of the forms, unreadable or damaged files, a checksum
            that differs from its card's or manifest's, or non-finite weights.
    """
    path = Path(path)
    if not path.exists():
        raise PriorError(f"{path}: no such file or folder")
    try:
        if model_folder_of(path) is not None:
            return _from_model_folder(path)
        if is_checkpoint_path(path):
            return _from_checkpoint(path)
    except PriorError:
        raise
    except (EduflError, ValueError) as exc:  # DataContractError, CheckpointError, WeightsError
        raise PriorError(str(exc)) from None
    raise PriorError(
        f"{path}: not a model — pass a model folder (model.json + model.pt, from `edufl "
        "train`), its model.pt, a federated run folder (checkpoints/round-*.json) or one "
        "checkpoint (round-NNNN.json)"
    )


def apply_prior(
    prior: Prior,
    model: nn.Module,
    *,
    name: str,
    overrides: dict[str, Any],
    task: str,
    spec: FeatureSpec,
) -> list[str]:
    """Copy the prior's weights into ``model`` (the run's, built for ``spec``), after the checks.

    Args:
        name, overrides, task: the run's model name, model overrides and task.

    Returns:
        Notes for the log: differences that do not stop the prior fitting (another task, or
        another input normalisation than the nodes').

    Raises:
        PriorError: another model, another contract, or weights of other names or shapes.
    """
    where = prior.source
    if prior.model != name:
        raise PriorError(
            f"{where}: model {prior.model!r} but this run trains {name!r}; pass --model "
            f"{prior.model} or a prior of the same model"
        )
    if prior.spec_fingerprint is not None and prior.spec_fingerprint != spec.fingerprint:
        raise PriorError(
            f"{where}: trained on contract {prior.spec_fingerprint[:12]}, but this run's "
            f"contract is {spec.name} {spec.version} ({spec.short_fingerprint}); pass the "
            "consortium's spec (--spec) or a prior trained on data of this contract"
        )
    try:
        check_weights(model, prior.tensors)
    except ValueError as exc:
        raise PriorError(
            f"{where}: its weights do not fit this run's {name} ({exc})"
            + _config_hint(prior, name, overrides)
        ) from None
    assign_weights(model, prior.tensors)
    notes = []
    if prior.task is not None and prior.task != task:
        notes.append(
            f"{where}: trained for task {prior.task!r}, this run trains {task!r}; its output "
            "heads start from another target"
        )
    if prior.normalization is not None and prior.normalization != NODE_NORMALIZATION:
        notes.append(
            f"{where}: trained on {prior.normalization} inputs, but the nodes normalise with "
            f"the contract's ranges ({NODE_NORMALIZATION}): its first layer sees differently "
            "scaled inputs at first; a prior from a federated run on public data "
            "(`edufl simulate run --synthetic N`, no DP needed) matches them"
        )
    return notes


def _from_model_folder(path: Path) -> Prior:
    stored = read_model_folder(path)
    card = stored.card
    return Prior(
        source=path,
        kind="model",
        weights_path=stored.weights_path,
        weights_sha256=stored.weights_sha256,
        model=card.model,
        config=card.config,
        task=card.task,
        spec_fingerprint=card.spec_fingerprint,
        normalization=stored.normalizer.method,
        tensors=stored.tensors,
    )


def _from_checkpoint(path: Path) -> Prior:
    found = read_checkpoint(checkpoint_manifest(path))
    where = found.manifest_path
    manifest = found.manifest
    name = manifest.get("model")
    if not isinstance(name, str):
        raise PriorError(f"{where}: names no model ({name!r:.80})")
    overrides = manifest.get("model_overrides") or {}
    try:
        config = validate_model_config(name, overrides).model_dump(mode="json")
    except (EduflError, ValueError, TypeError) as exc:  # unknown model, invalid overrides
        raise PriorError(f"{where}: its model cannot be built ({_first_line(exc)})") from None
    tensors = checkpoint_tensors(found)  # the manifest's checksum, finite values
    fingerprint = manifest.get("spec_fingerprint")
    task = manifest.get("task")
    return Prior(
        source=path,
        kind="checkpoint",
        weights_path=found.weights_path,
        weights_sha256=str(manifest["weights_sha256"]),  # checked against the file above
        model=name,
        config=config,
        task=task if isinstance(task, str) else None,
        spec_fingerprint=fingerprint if isinstance(fingerprint, str) else None,
        normalization=NODE_NORMALIZATION,
        tensors=tensors,
    )


def _config_hint(prior: Prior, name: str, overrides: dict[str, Any]) -> str:
    """Which model settings differ between the prior and the run, as a fix to make."""
    try:
        ours = validate_model_config(name, overrides).model_dump(mode="json")
    except (ValueError, TypeError):
        return ""
    differs = {
        key: value
        for key, value in prior.config.items()
        if key in ours and not _same(ours[key], value)
    }
    if not differs:
        return "; was it trained on data of another shape?"
    listed = ", ".join(f"{k} {v!r} (this run {ours[k]!r})" for k, v in sorted(differs.items()))
    return (
        f"; the prior's model has {listed}: set model_overrides to the prior's in the "
        "federation config, or pass a prior built like this run's model"
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return bool(np.isclose(a, b))
    return a == b


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
