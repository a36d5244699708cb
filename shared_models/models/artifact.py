"""A trained model on disk: weights (no pickle) plus a JSON card that can rebuild it.

The card names the architecture and its config, the task, the data contract's fingerprint and
the training-split normalisation, so a client can score new students with exactly the inputs the
model was trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from shared_models.atomic import write_atomic_many
from shared_models.data.cohort import Normalizer
from shared_models.data.contract import FeatureSpec
from shared_models.errors import DataContractError
from shared_models.models.registry import MODEL_NAMES, build_model, validate_model_config
from shared_models.models.weights import assign_weights, check_weights, load_tensors, weights_writer
from shared_models.user_files import describe_read_error, loads_json, read_text

WEIGHTS_FILE = "model.pt"
CARD_FILE = "model.json"
CARD_FORMAT = 1


@dataclass(frozen=True)
class ModelCard:
    """What is needed to rebuild and feed a trained model."""

    model: str
    config: dict[str, Any]
    task: str
    spec_fingerprint: str
    n_weeks: int
    n_dynamic: int
    n_static: int
    normalizer: dict[str, Any]
    extra: dict[str, Any]


def save_trained(
    out_dir: Path,
    model: nn.Module,
    *,
    name: str,
    task: str,
    spec: FeatureSpec,
    normalizer: Normalizer,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.pt`` and ``model.json`` into ``out_dir``; returns the card's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = getattr(model, "config", None)
    card = {
        "format": CARD_FORMAT,
        "model": name,
        "config": config.model_dump(mode="json") if config is not None else {},
        "task": task,
        "spec_fingerprint": spec.fingerprint,
        "n_weeks": spec.weeks,
        "n_dynamic": len(spec.dynamic),
        "n_static": len(spec.static_names),
        "normalizer": normalizer.state(),
        "extra": extra or {},
    }
    write_weights = weights_writer(model)
    digest: list[str] = []

    def weights(tmp: Path) -> None:
        write_weights(tmp)
        digest.append(hashlib.sha256(tmp.read_bytes()).hexdigest())

    def card_text(tmp: Path) -> None:  # runs after `weights`: the card names their hash
        tmp.write_text(json.dumps({**card, "weights_sha256": digest[0]}, indent=2), "utf-8")

    # Both files are complete before either replaces an older model: never a mixed pair.
    write_atomic_many({out_dir / WEIGHTS_FILE: weights, out_dir / CARD_FILE: card_text})
    return out_dir / CARD_FILE


@dataclass(frozen=True)
class StoredModel:
    """A model folder's files, read and checked, before any model is built from them."""

    card: ModelCard
    normalizer: Normalizer
    card_path: Path
    weights_path: Path
    weights_sha256: str  # of model.pt's bytes, as read
    tensors: dict[str, torch.Tensor]


def model_folder_of(path: Path) -> Path | None:
    """The model folder ``path`` names (the folder, or the folder of its model.pt or
    model.json), or None when ``path`` is none of those forms. The card may still be missing
    beside a model.pt: `read_model_folder` says so."""
    if path.is_file() and path.name in (WEIGHTS_FILE, CARD_FILE):
        return path.parent
    if path.is_dir() and (path / CARD_FILE).is_file():
        return path
    return None


def read_model_folder(path: Path, spec: FeatureSpec | None = None) -> StoredModel:
    """The card and tensors of a model saved by `save_trained`, checked but not built.

    ``path`` is its folder, its model.json or its model.pt. The card is validated, the weights'
    checksum compared with the card's, and the tensors read without unpickling (`load_tensors`:
    finite values only). With ``spec``, the card must name that contract and its shapes.

    Raises:
        DataContractError: missing or malformed files, or a model trained on another contract.
    """
    if path.is_dir():
        card_path = path / CARD_FILE
    else:  # the weights stand for their folder: both files are one model
        card_path = path.with_name(CARD_FILE) if path.name == WEIGHTS_FILE else path
    try:
        raw = loads_json(read_text(card_path))
    except FileNotFoundError:
        raise DataContractError(
            f"{card_path}: no trained model here (model.json missing)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataContractError(
            f"{card_path}: cannot read model card ({describe_read_error(exc)})"
        ) from None
    except ValueError as exc:
        raise DataContractError(f"{card_path}: not a valid model card ({exc})") from None
    card, normalizer = _validated_card(raw, card_path)
    if spec is not None and card.spec_fingerprint != spec.fingerprint:
        raise DataContractError(
            f"{card_path}: model was trained on contract {card.spec_fingerprint[:12]}, but the "
            f"data follows {spec.short_fingerprint}; use the consortium's spec or retrain"
        )
    if spec is not None:
        shapes = (card.n_weeks, card.n_dynamic, card.n_static)
        expected = (spec.weeks, len(spec.dynamic), len(spec.static_names))
        if shapes != expected:
            raise DataContractError(
                f"{card_path}: the card's input shape (weeks, dynamic, static) {shapes} is not "
                f"its contract's {expected}; the card was edited: export the model again"
            )
    weights_path = card_path.parent / WEIGHTS_FILE
    expected_digest = raw.get("weights_sha256") if isinstance(raw, dict) else None
    digest = _sha256(weights_path)
    if expected_digest is not None and digest is not None and digest != expected_digest:
        raise DataContractError(
            f"{weights_path}: does not match {card_path.name} (replaced, damaged, or an "
            "interrupted save); export the model again"
        )
    tensors = load_tensors(weights_path)  # names an unreadable file
    return StoredModel(card, normalizer, card_path, weights_path, digest or "", tensors)


def load_trained(
    path: Path, spec: FeatureSpec | None = None
) -> tuple[nn.Module, Normalizer, ModelCard]:
    """Rebuild a model saved by `save_trained` (``path``: its folder, model.json or model.pt).

    Nothing in the folder is trusted: the card is validated, the weights are read without
    unpickling (`read_model_folder`), and their names and shapes are checked against the
    card's architecture built on torch's ``meta`` device *before* any real model is allocated,
    so a card asking for a billion hidden units cannot exhaust memory.

    Raises:
        DataContractError: missing or malformed files, or a model trained on another contract.
    """
    stored = read_model_folder(path, spec)
    card, card_path, weights_path = stored.card, stored.card_path, stored.weights_path
    shape = (card.model, card.n_weeks, card.n_dynamic, card.n_static, card.config)
    try:
        with torch.device("meta"):  # names and shapes only: nothing is allocated
            skeleton = build_model(*shape)
    except NotImplementedError:  # an initialiser without a meta kernel: check after building
        skeleton = None
    except (ValueError, TypeError, RuntimeError) as exc:
        raise DataContractError(
            f"{card_path}: the card's model cannot be built ({_first_line(exc)})"
        ) from None
    try:
        if skeleton is not None:
            check_weights(skeleton, stored.tensors)
        model = build_model(*shape)
        assign_weights(model, stored.tensors)
    except ValueError as exc:
        raise DataContractError(
            f"{weights_path}: does not fit the model {card_path.name} describes ({exc})"
        ) from None
    return model, stored.normalizer, card


def _known_model(name: str) -> str:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name[:40]!r}; one of {', '.join(MODEL_NAMES)}")
    return name


class _CardSchema(BaseModel):
    """What a model card must hold; unknown keys (a newer edufl's) are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    format: Literal[1] = 1  # CARD_FORMAT
    model: Annotated[str, AfterValidator(_known_model)]
    config: dict[str, Any]
    task: Annotated[str, Field(min_length=1, max_length=32)]
    spec_fingerprint: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    n_weeks: Annotated[int, Field(ge=1, le=104)]  # the contract's own bounds
    n_dynamic: Annotated[int, Field(ge=1, le=10_000)]
    n_static: Annotated[int, Field(ge=0, le=100_000)]
    normalizer: dict[str, Any]
    extra: dict[str, Any] = {}


def _validated_card(raw: Any, card_path: Path) -> tuple[ModelCard, Normalizer]:
    try:
        schema = _CardSchema.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(card)'}: {e['msg']}"
            for e in exc.errors()[:5]
        )
        raise DataContractError(f"{card_path}: not a valid model card ({problems})") from None
    fields = schema.model_dump(exclude={"format"})
    fields["config"] = trained_config(schema.model, schema.config)
    card = ModelCard(**fields)
    return card, _normalizer(schema, card_path)


#: Config fields added after cards were first written, with the value a card that lacks them
#: was trained with (its new default would rebuild a different model): ``static_scale`` (issue
#: 19) scales the static attributes of ``cnn-lstm``, ``cnn`` and ``multitask``, 0.1 by default
#: since; a model saved before it read them unscaled.
_BEFORE_FIELD: dict[str, Any] = {"static_scale": 1.0}


def trained_config(model: str, config: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the fields it predates set to what its model was trained with."""
    fields = validate_model_config(model, None).model_dump()
    missing = {k: v for k, v in _BEFORE_FIELD.items() if k in fields and k not in config}
    return {**config, **missing}


def _normalizer(card: _CardSchema, card_path: Path) -> Normalizer:
    """The card's normaliser, refused unless its statistics fit the card and are finite."""
    expected = {
        "dyn_mean": card.n_dynamic,
        "dyn_std": card.n_dynamic,
        "static_mean": card.n_static,
        "static_std": card.n_static,
    }
    try:
        normalizer = Normalizer.from_state(card.normalizer)
        arrays = {key: getattr(normalizer, key) for key in expected}
        scalars = np.array([normalizer.grade_min, normalizer.grade_max], dtype=np.float64)
    except (KeyError, ValueError, TypeError, OverflowError) as exc:
        raise DataContractError(
            f"{card_path}: normalizer is malformed ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    for key, size in expected.items():
        values = arrays[key]
        if values.shape != (size,) or not np.isfinite(values).all():
            raise DataContractError(f"{card_path}: normalizer.{key} must be {size} finite numbers")
        if key.endswith("_std") and (values <= 0).any():
            raise DataContractError(f"{card_path}: normalizer.{key} must be positive")
    if not np.isfinite(scalars).all() or scalars[0] >= scalars[1]:
        raise DataContractError(f"{card_path}: normalizer grade_min must be below grade_max")
    log1p = card.normalizer.get("dyn_log1p")
    if log1p is not None and (
        not isinstance(log1p, list)
        or len(log1p) != card.n_dynamic
        or not all(isinstance(b, bool) for b in log1p)
    ):
        raise DataContractError(
            f"{card_path}: normalizer.dyn_log1p must be {card.n_dynamic} true/false values, one "
            "per weekly feature (the contract's `transform`)"
        )
    return normalizer


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None  # load_tensors names the problem


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
