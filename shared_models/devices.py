"""Where training and scoring run: the ``--device auto|cpu|cuda[:N]`` of every command.

`parse_device` checks the spelling without importing torch, so a CLI or a node config can refuse
a typo before anything heavy loads; `resolve_device` asks torch what it can see and turns the
spec into a ``torch.device`` (``auto``: the current CUDA device when one is visible, else the
CPU). Both raise `DeviceError`, one line naming the option and how to fix it.

Resolve in the process that computes, and not earlier than needed: ``torch.cuda.is_available()``
initialises the CUDA driver, and CUDA initialised before a ``fork`` is unusable in the child (a
deployed node forks each message's ClientApp from a warm process, `client.node.warm_exec`).
Nothing here touches CUDA at import.

Whatever the device, weights leave a process as CPU tensors (`shared_models.models.weights`
copies them to the CPU before exchanging or saving them) and DP noise is drawn on the CPU from
a ChaCha20 keystream (`privacy.noise`), then copied to the device.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from shared_models.errors import EduflError, PublicError

if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "DEVICE_CHOICES",
    "DEVICE_HELP",
    "DeviceError",
    "describe_device",
    "model_device",
    "parse_device",
    "resolve_device",
]

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
#: The help text of every command's ``--device`` option (one spelling everywhere).
DEVICE_HELP = (
    "Where to train/score: auto (CUDA when torch sees a GPU, else CPU), cpu, cuda or cuda:N."
)

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


class DeviceError(EduflError, PublicError, ValueError):
    """A device spec that is misspelt or names hardware torch cannot see.

    Public: the text names only the spec and this machine's torch build, never a student.
    """


def _given(option: str, spec: str) -> str:
    """``--device cuda`` for a flag, ``device=cuda`` for a config key."""
    return f"{option} {spec}" if option.startswith("-") else f"{option}={spec}"


def parse_device(spec: str, *, option: str = "--device") -> str:
    """The canonical spelling of ``spec``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Case and surrounding blanks are ignored. Does not import torch.

    Raises:
        DeviceError: anything else (``tpu``, ``cuda:x``, ``gpu``); the message says what to use.
    """
    text = str(spec).strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    if (found := _CUDA_INDEX.fullmatch(text)) is not None:
        return f"cuda:{int(found.group(1))}"
    raise DeviceError(
        f"{_given(option, repr(spec))}: not a device; use {DEVICE_CHOICES} (N = 0, 1, ...: the "
        "CUDA device's index)"
    )


def resolve_device(spec: str | None = "auto", *, option: str = "--device") -> torch.device:
    """The ``torch.device`` that ``spec`` names on this machine (None means ``auto``).

    ``auto`` is ``cuda`` when torch sees a CUDA device, else ``cpu``; ``cuda`` is the current
    CUDA device (index 0 unless ``CUDA_VISIBLE_DEVICES`` or the caller chose another).

    Raises:
        DeviceError: a misspelt spec, ``cuda`` without a visible CUDA device (a CPU build of
            torch, no driver, ``CUDA_VISIBLE_DEVICES`` empty), or ``cuda:N`` beyond the
            devices torch sees. One line, naming ``option`` and the fix.
    """
    canonical = parse_device("auto" if spec is None else spec, option=option)
    import torch

    if canonical == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if canonical == "auto":
        chosen = torch.device("cuda" if available else "cpu")
        logger.debug("%s auto resolved to %s", option, chosen)
        return chosen
    if not available:
        build = (
            "this is a CPU build"
            if torch.version.cuda is None
            else f"a CUDA {torch.version.cuda} build: check the NVIDIA driver and "
            "CUDA_VISIBLE_DEVICES"
        )
        raise DeviceError(
            f"{_given(option, canonical)}: no CUDA device is visible to torch "
            f"{torch.__version__} ({build}); use {_given(option, 'cpu')} or auto"
        )
    device = torch.device(canonical)
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(
            f"{_given(option, canonical)}: torch sees {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}; use one of them, cuda (the current one) or auto"
        )
    return device


def describe_device(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``: what a command prints about where it runs."""
    if device.type != "cuda":
        return str(device)
    import torch

    index = torch.cuda.current_device() if device.index is None else device.index
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model without any.

    edufl's models keep every tensor on one device: inputs are moved to this one.
    """
    import torch

    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
