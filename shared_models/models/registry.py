"""Model names, their configs, and the one function every party builds models with.

Server and clients both call `build_model` with the shapes fixed by the data contract, so they
hold the same architecture with the same state-dict keys and can exchange weights by name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from shared_models.model_names import MODEL_NAMES
from shared_models.models.base import ModelConfig, StudentModel
from shared_models.models.cnn_lstm import CNNConfig, CNNLSTMConfig, CNNLSTMModel
from shared_models.models.gru import GRUConfig, GRUModel
from shared_models.models.logistic import LogisticConfig, LogisticModel
from shared_models.models.lstm import LSTMConfig, LSTMModel
from shared_models.models.lstm_gru import LSTMGRUConfig, LSTMGRUModel
from shared_models.models.multitask import MultiTaskConfig, MultiTaskLSTM

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, tuple[type[StudentModel], type[ModelConfig]]] = {
    "lstm": (LSTMModel, LSTMConfig),
    "cnn-lstm": (CNNLSTMModel, CNNLSTMConfig),
    "cnn": (CNNLSTMModel, CNNConfig),
    "gru": (GRUModel, GRUConfig),
    "lstm-gru": (LSTMGRUModel, LSTMGRUConfig),
    "multitask": (MultiTaskLSTM, MultiTaskConfig),
    "logistic": (LogisticModel, LogisticConfig),
}


class UnknownModelError(ValueError):
    """A model name that is not in `MODEL_NAMES`."""


def _lookup(name: str) -> tuple[type[StudentModel], type[ModelConfig]]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; valid names are: {', '.join(MODEL_NAMES)}"
        ) from None


def config_class(name: str) -> type[ModelConfig]:
    """The pydantic config class of model ``name`` (e.g. for a JSON schema of its options)."""
    return _lookup(name)[1]


def validate_model_config(
    name: str, overrides: Mapping[str, Any] | ModelConfig | None = None
) -> ModelConfig:
    """The validated config of model ``name``: paper defaults updated by ``overrides``.

    Raises:
        UnknownModelError: ``name`` is not registered.
        pydantic.ValidationError: an override is unknown (a typo) or out of range.
        TypeError: ``overrides`` is a config object of another model.
    """
    cls = _lookup(name)[1]
    if isinstance(overrides, ModelConfig):
        if not isinstance(overrides, cls):
            raise TypeError(
                f"model {name!r} takes a {cls.__name__}, got a {type(overrides).__name__}"
            )
        return overrides
    # Validating a copy never mutates the caller's mapping.
    return cls.model_validate(dict(overrides or {}))


def build_model(
    name: str,
    n_weeks: int,
    n_dynamic: int,
    n_static: int,
    config: Mapping[str, Any] | ModelConfig | None = None,
) -> StudentModel:
    """Build model ``name`` for inputs of the given shapes.

    Initial weights come from torch's global RNG: seed it (``training.set_seed``) for
    reproducible weights. Keys and shapes of the state dict depend only on the arguments.

    Args:
        name: one of `MODEL_NAMES`.
        n_weeks: weeks per term fixed by the data contract.
        n_dynamic: weekly features per week.
        n_static: static columns after one-hot encoding (may be 0).
        config: hyper-parameter overrides (a mapping) or a ready config of this model.
    """
    model_cls, _ = _lookup(name)
    cfg = validate_model_config(name, config)
    model = model_cls(n_weeks, n_dynamic, n_static, cfg)
    logger.debug(
        "built %s (%d parameters) for weeks=%d dynamic=%d static=%d",
        name,
        sum(p.numel() for p in model.parameters()),
        n_weeks,
        n_dynamic,
        n_static,
    )
    return model
