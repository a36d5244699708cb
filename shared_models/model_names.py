"""The names of the federation's model architectures, importable without torch.

`shared_models.models.registry` maps each to its class; the wire protocol validates a round's
``model`` against this list without importing the models (and so torch).
"""

from __future__ import annotations

MODEL_NAMES: tuple[str, ...] = (
    "lstm",
    "cnn-lstm",
    "cnn",
    "gru",
    "lstm-gru",
    "multitask",
    "logistic",
)
