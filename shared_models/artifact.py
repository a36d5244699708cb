"""A trained model on disk: weights (no pickle) plus a JSON card that can rebuild it.

The card names the architecture and its config, the task, the data contract's fingerprint and
the training-split normalisation, so a client can score new students with exactly the inputs the
model was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from shared_models.atomic import write_text_atomic
from shared_models.cohort import Normalizer
from shared_models.contract import FeatureSpec
from shared_models.errors import DataContractError
from shared_models.registry import build_model
from shared_models.weights import load_weights, save_weights

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
    save_weights(model, out_dir / WEIGHTS_FILE)
    write_text_atomic(out_dir / CARD_FILE, json.dumps(card, indent=2))
    return out_dir / CARD_FILE


def load_trained(
    path: Path, spec: FeatureSpec | None = None
) -> tuple[nn.Module, Normalizer, ModelCard]:
    """Rebuild a model saved by `save_trained` (``path``: its folder or its ``model.json``).

    Raises:
        DataContractError: missing or malformed files, or a model trained on another contract.
    """
    card_path = path / CARD_FILE if path.is_dir() else path
    try:
        raw = json.loads(card_path.read_text("utf-8"))
        card = ModelCard(**{k: raw[k] for k in ModelCard.__dataclass_fields__})
    except FileNotFoundError:
        raise DataContractError(
            f"{card_path}: no trained model here (model.json missing)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataContractError(f"{card_path}: not a valid model card ({exc})") from None
    if spec is not None and card.spec_fingerprint != spec.fingerprint:
        raise DataContractError(
            f"{card_path}: model was trained on contract {card.spec_fingerprint[:12]}, but the "
            f"data follows {spec.short_fingerprint}; use the consortium's spec or retrain"
        )
    model = build_model(card.model, card.n_weeks, card.n_dynamic, card.n_static, card.config)
    try:
        load_weights(model, card_path.parent / WEIGHTS_FILE)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataContractError(f"{card_path.parent / WEIGHTS_FILE}: cannot load ({exc})") from None
    return model, Normalizer.from_state(card.normalizer), card
