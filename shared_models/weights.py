"""Model weights by name: exchange between parties and save/load to disk without pickle.

Opacus' ``DPLSTM``/``DPGRU`` expose each recurrent weight twice in ``state_dict()`` (as
``rnn.weight_ih_l0`` and as its alias ``rnn.l0.ih.weight``, sharing storage), and an Opacus
``GradSampleModule`` prefixes every key with ``_module.``. These helpers unwrap the model and keep
each tensor once, under its ``named_parameters``/``named_buffers`` name, so what goes over the
wire or to disk is the same on every party and never depends on key order.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared_models.atomic import write_atomic

logger = logging.getLogger(__name__)

try:  # safetensors is preferred when installed; torch's zip format with weights_only otherwise
    from safetensors.torch import load_file as _st_load
    from safetensors.torch import save_file as _st_save
except ImportError:  # pragma: no cover - depends on the environment
    _st_load = None
    _st_save = None

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format; safetensors files start with a header length


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside an Opacus ``GradSampleModule`` (or the module itself)."""
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, nn.Module) else model


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    base = unwrap(model)
    tensors: dict[str, torch.Tensor] = dict(base.named_parameters())
    persistent = base.state_dict(keep_vars=True)
    tensors |= {n: b for n, b in base.named_buffers() if n in persistent}
    return tensors


def named_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """Every learned tensor once, by name, as float32 NumPy copies (for Flower ``ArrayRecord``)."""
    return {name: t.detach().cpu().numpy().copy() for name, t in _named_tensors(model).items()}


def assign_weights(model: nn.Module, weights: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Copy ``weights`` into ``model`` by name (strict: same names, same shapes).

    Raises:
        ValueError: names are missing or unexpected, or a shape differs; the message lists them.
    """
    targets = _named_tensors(model)
    missing = sorted(set(targets) - set(weights))
    unexpected = sorted(set(weights) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model: missing {missing}, unexpected {unexpected}; "
            "were both built with the same model name, config and data contract?"
        )
    with torch.no_grad():
        for name, target in targets.items():
            value = torch.as_tensor(np.asarray(weights[name]))
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(target.shape)}"
                )
            target.copy_(value.to(dtype=target.dtype, device=target.device))


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write the model's weights to ``path`` (safetensors if installed, else torch's format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in _named_tensors(model).items()}
    if _st_save is not None:
        write_atomic(path, lambda tmp: _st_save(tensors, str(tmp)))
    else:
        write_atomic(path, lambda tmp: torch.save(tensors, tmp))
    logger.debug("saved %d tensors to %s", len(tensors), path)
    return path


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights written by `save_weights` into ``model``, bit for bit, without unpickling.

    Raises:
        ValueError: the file's tensors do not match the model (see `assign_weights`).
    """
    path = Path(path)
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == _ZIP_MAGIC:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    elif _st_load is not None:
        tensors = _st_load(str(path))
    else:
        raise ValueError(
            f"{path} is not a torch weights file; if it was written with safetensors, "
            "install safetensors to read it"
        )
    assign_weights(model, tensors)
