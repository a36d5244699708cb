"""Model weights by name: exchange between parties and save/load to disk without pickle.

Opacus' ``DPLSTM``/``DPGRU`` expose each recurrent weight twice in ``state_dict()`` (as
``rnn.weight_ih_l0`` and as its alias ``rnn.l0.ih.weight``, sharing storage), and an Opacus
``GradSampleModule`` prefixes every key with ``_module.``. These helpers unwrap the model and keep
each tensor once, under its ``named_parameters``/``named_buffers`` name, so what goes over the
wire or to disk is the same on every party and never depends on key order.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared_models.atomic import write_atomic
from shared_models.errors import DataContractError

logger = logging.getLogger(__name__)

try:  # safetensors is preferred when installed; torch's zip format with weights_only otherwise
    from safetensors.torch import load_file as _st_load
    from safetensors.torch import save_file as _st_save
except ImportError:  # pragma: no cover - depends on the environment
    _st_load = None
    _st_save = None

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format; safetensors files start with a header length


class WeightsError(DataContractError):
    """A weights file that cannot be loaded, or weights that do not fit the model."""


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


def check_weights(model: nn.Module, weights: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Refuse ``weights`` whose names or shapes differ from ``model``'s (which may be on meta).

    Raises:
        ValueError: names are missing or unexpected, or a shape differs; the message lists them.
    """
    targets = _named_tensors(model)
    missing = sorted(set(targets) - set(weights))
    unexpected = sorted(set(weights) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the model: missing {missing[:5]}, unexpected "
            f"{[str(u)[:80] for u in unexpected[:5]]}; were both built with the same model "
            "name, config and data contract?"
        )
    for name, target in targets.items():
        shape = tuple(np.shape(weights[name]))
        if shape != tuple(target.shape):
            raise ValueError(
                f"weight {name!r} has shape {shape}, the model expects {tuple(target.shape)}"
            )


def assign_weights(model: nn.Module, weights: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Copy ``weights`` into ``model`` by name (strict: same names, same shapes).

    Raises:
        ValueError: names are missing or unexpected, or a shape differs; the message lists them.
    """
    check_weights(model, weights)
    with torch.no_grad():
        for name, target in _named_tensors(model).items():
            value = torch.as_tensor(np.asarray(weights[name]))
            target.copy_(value.to(dtype=target.dtype, device=target.device))


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """Write the model's weights to ``path`` (safetensors if installed, else torch's format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, weights_writer(model))
    return path


def weights_writer(model: nn.Module) -> Callable[[Path], None]:
    """A function writing the model's current weights to the path it is given.

    The tensors are copied now, so what is written is the model as it was at this call.
    """
    tensors = {n: t.detach().cpu().contiguous().clone() for n, t in _named_tensors(model).items()}

    def write(path: Path) -> None:
        if _st_save is not None:
            _st_save(tensors, str(path))
        else:
            torch.save(tensors, path)
        logger.debug("saved %d tensors to %s", len(tensors), path)

    return write


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The named tensors of a file written by `save_weights` (or a checkpoint's state).

    Only tensors come back: torch's format is read with ``weights_only=True``, whose unpickler
    refuses every global outside torch's tensor types, so a file carrying a pickled object
    (``__reduce__`` calling ``os.system``, say) is refused before anything in it runs.

    Raises:
        WeightsError: unreadable, damaged, not tensors by name, not finite, or carrying
            anything other than tensors; the message names the file.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read weights ({exc.strerror or exc})") from None
    if magic != _ZIP_MAGIC and _st_load is None:
        raise WeightsError(
            f"{path}: not a weights file written by edufl (torch zip format); if it was "
            "written with safetensors, install safetensors to read it"
        )
    try:
        if magic == _ZIP_MAGIC:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        else:
            assert _st_load is not None
            tensors = _st_load(str(path))
    except pickle.UnpicklingError as exc:
        # Name what was refused ("GLOBAL posix.system"), never torch's advice to retry unsafely.
        found = re.search(r"(?:unsupported|Unsupported global:?)\s+(GLOBAL\s+)?([\w.]+)", str(exc))
        refused = f"it asks for {found.group(2)}" if found else ""
        raise WeightsError(
            f"{path}: refused: the file holds Python objects, not just tensors"
            + (f" ({refused})" if refused else "")
            + "; edufl never unpickles code, so a model or checkpoint must be saved by edufl"
        ) from None
    except Exception as exc:  # torch and safetensors raise many types for a damaged file
        raise WeightsError(f"{path}: damaged or not a weights file ({_short(exc)})") from None
    if not isinstance(tensors, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise WeightsError(f"{path}: expected tensors by name, found {type(tensors).__name__}")
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided or tensor.is_complex() or tensor.device.type != "cpu":
            raise WeightsError(f"{path}: tensor {name[:80]!r} is not a plain real CPU tensor")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"{path}: tensor {name[:80]!r} holds NaN or infinite values")
    return dict(tensors)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load weights written by `save_weights` into ``model``, bit for bit, without unpickling.

    Raises:
        WeightsError: the file is unreadable or refused (see `load_tensors`), or its tensors
            do not match the model (see `assign_weights`). A ``ValueError``.
    """
    tensors = load_tensors(path)
    try:
        assign_weights(model, tensors)
    except ValueError as exc:
        raise WeightsError(f"{path}: {exc}") from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
