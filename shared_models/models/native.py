"""Plain-training fast path: Opacus' recurrent layers run on torch's native kernels.

Every edufl recurrent model is built from ``opacus.layers.DPLSTM``/``DPGRU`` so that Opacus can
compute per-student gradients when the model trains under DP. Those layers unroll the sequence
in Python, two ``RNNLinear`` calls per week; torch's ``nn.LSTM``/``nn.GRU`` compute the same
recurrence (same gate order, same parameter names) in one C++ call. When no per-student
gradient is needed (centralized training, federated rounds without DP, scoring), `native_recurrent`
routes each eligible layer's forward through a native twin that holds the very same
``Parameter`` objects: the optimizer keeps updating the same tensors, and the layer, its
state-dict names and its hooks stay where they are. `privacy.fused_rnn` builds its DP twins
with `native_twin`.

Eligible: single-layer, unidirectional, ``batch_first`` layers with biases and no projection,
the only shape edufl builds. Anything else, and any model Opacus has wrapped or hooked, runs
as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from opacus.layers import DPGRU, DPLSTM
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["native_recurrent", "native_twin"]

_NATIVE: dict[type[nn.Module], type[nn.RNNBase]] = {DPLSTM: nn.LSTM, DPGRU: nn.GRU}


def native_twin(module: nn.Module, cls: type[nn.RNNBase] | None = None) -> nn.RNNBase | None:
    """A native recurrent layer sharing ``module``'s parameters, or None if it is not eligible.

    Args:
        module: any module; only a ``DPLSTM`` or ``DPGRU`` of the eligible shape gets a twin.
        cls: the twin's class, a subclass of ``nn.LSTM`` (for a ``DPLSTM``) or ``nn.GRU`` (for
            a ``DPGRU``); the plain native class when None.
    """
    native = _NATIVE.get(type(module))
    if native is None:
        return None
    layer = cast(Any, module)  # DPRNNBase: nn.RNNBase's attributes without its type
    shape = (layer.num_layers, layer.bidirectional, layer.batch_first, layer.bias, layer.proj_size)
    if shape != (1, False, True, True, 0):
        logger.debug("%s keeps Opacus' unrolled forward (shape %s)", layer, shape)
        return None
    twin_cls = cls or native
    if not issubclass(twin_cls, native):
        raise TypeError(f"a twin of {type(module).__name__} must be a {native.__name__}")
    with torch.device("meta"):  # no storage and no draw from torch's RNG for throwaway weights
        twin = twin_cls(layer.input_size, layer.hidden_size, batch_first=True)
    shared = dict(layer.named_parameters())  # DPRNNBase names them like nn.LSTM/nn.GRU
    for name in twin._flat_weights_names:
        setattr(twin, name, shared[name])
    twin._init_flat_weights()  # the native kernels read this list, not the attributes
    twin.train(layer.training)
    return twin


def _hooked(model: nn.Module) -> bool:
    """Whether Opacus wrapped or hooked ``model`` (its layers must then stay as they are)."""
    from opacus import GradSampleModule

    return any(
        isinstance(m, GradSampleModule) or bool(getattr(m, "autograd_grad_sample_hooks", None))
        for m in model.modules()
    )


@contextmanager
def native_recurrent(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s Opacus recurrent layers run on torch's native kernels.

    Each eligible layer stays in place (its state-dict names, hooks and train/eval mode are its
    own); only its ``forward`` is routed through a native twin holding the same parameters. For
    plain (non-DP) training and inference: a model Opacus has wrapped or hooked is left
    untouched. The layers' own ``forward`` is back when the block ends, even on an error.
    """
    if _hooked(model):
        yield model
        return
    routed = [
        (layer, twin)
        for layer in model.modules()
        if "forward" not in layer.__dict__ and (twin := native_twin(layer)) is not None
    ]
    for layer, twin in routed:
        layer.__dict__["forward"] = _routed(layer, twin)
    try:
        yield model
    finally:
        for layer, _ in routed:
            layer.__dict__.pop("forward", None)


def _routed(layer: nn.Module, twin: nn.RNNBase) -> Any:
    native = type(twin)

    def forward(input: Any, hx: Any = None) -> Any:
        twin.training = layer.training  # dropout between layers and the kernels' mode
        return native.forward(twin, input, hx)

    return forward
