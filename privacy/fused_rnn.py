"""Per-student gradients of recurrent layers in one pass over time: the DP-SGD fast path.

Opacus' ``DPLSTM``/``DPGRU`` unroll the sequence in Python through two ``RNNLinear`` layers per
week, and its hooks compute and accumulate a per-student gradient for each of them at every week:
about 5x the time of a plain LSTM epoch here (``bench/bench_dp.py``). This module swaps each such
layer, for the duration of a DP round, for a twin that *is* torch's ``nn.LSTM``/``nn.GRU``
(native kernels) holding the very same ``Parameter`` objects, and registers an Opacus grad
sampler for the twin. From the gradient of the layer's output sequence, which Opacus' hooks
capture, the sampler redoes backpropagation through time in closed form to get every week's
gate gradients, then forms each student's weight gradients with one batched matrix product over
all weeks, or, in factored mode (what `privacy.dp.DPSession` uses), leaves them as factors for
`privacy.fused_clip`, which clips them without materialising them. In factored mode a layer
whose input needs no gradient also skips the native backward: the sampler's BPTT replaces it,
and the summed weight gradients it would compute are replaced by DP-SGD's anyway.

Only how per-student gradients are computed changes: Opacus' ``GradSampleModule`` still scales
and accumulates them, ``DPOptimizer`` still clips (from factors) and noises, and the accountant
still counts the steps. ``tests/privacy/test_fused_rnn.py`` compares the gradients with Opacus'
own on the same batch, ``tests/privacy/test_fused_clip.py`` the clipped sums.

Supported: single-layer, unidirectional, ``batch_first`` layers with biases, called without an
initial state and without packed sequences, whose final ``(h_n, c_n)`` carry no gradient (the
edufl models read the output sequence). Anything else is left to Opacus' hooks, or raises.

Devices: everything runs where the layer's parameters are. On CUDA the twin runs cuDNN's
kernels, and building it packs the shared parameters into one cuDNN weight buffer, in place, as
``nn.LSTM.cuda()`` does: the ``Parameter`` objects (and so the optimizer's and the original
layer's references) stay the same, only their storage moves. The grad sampler recomputes the
gates with plain float32 matrix products; cuDNN may use TF32 when torch allows it, so on a GPU
its per-student gradients agree with Opacus' to TF32's precision rather than float32's.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.layers import DPGRU, DPLSTM
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from privacy import fused_clip
from shared_models.models.native import native_twin

logger = logging.getLogger(__name__)

__all__ = ["FusedGRU", "FusedLSTM", "FusedRNNError", "fuse_recurrent_layers"]

_HINT = "open the DPSession with fused_rnn=False to use Opacus' own per-sample gradients"


class FusedRNNError(NotImplementedError):
    """A fused layer used in a way its per-student gradients do not cover."""


def _refuse_state_gradient(grad: Tensor | None) -> None:
    # The native backward calls this with None (or zeros) when the state was not used.
    if grad is not None and bool(grad.any()):
        raise FusedRNNError(
            "a gradient reached the final hidden/cell state of a fused recurrent layer; its "
            f"per-student gradients only follow the output sequence; {_HINT}"
        )


def _guarded(state: Tensor) -> Tensor:
    """``state``, raising in backward if a loss depends on it (it would be missed silently)."""
    if state.requires_grad:
        state.register_hook(_refuse_state_gradient)  # type: ignore[no-untyped-call]
    return state


def _check_call(input: Any, hx: Any) -> None:
    if hx is not None or isinstance(input, PackedSequence):
        raise FusedRNNError(
            f"fused recurrent layers take a padded batch and no initial state; {_HINT}"
        )


class _Recent:
    """The last few training outputs of a layer, so its grad sampler need not recompute them.

    An entry keeps its input alive, so an input of the same address, shape, strides and version
    is the same tensor; anything else is recomputed (always correct, only slower).
    """

    def __init__(self) -> None:
        self._entries: deque[tuple[Tensor, int, Tensor]] = deque(maxlen=4)

    def keep(self, input: Tensor, output: Tensor) -> None:
        if torch.is_grad_enabled() and isinstance(input, Tensor):
            self._entries.append((input, input._version, output.detach()))

    def take(self, x: Tensor) -> Tensor | None:
        for k, (seen, version, output) in enumerate(self._entries):
            same = (seen.data_ptr(), seen.shape, seen.stride(), seen.dtype, seen._version) == (
                x.data_ptr(),
                x.shape,
                x.stride(),
                x.dtype,
                version,
            )
            if same:
                del self._entries[k]
                return output
        return None


class _NoWeightGradients(torch.autograd.Function):
    """Outputs of a layer run without autograd, made to require gradients for Opacus' hooks.

    In factored mode the per-student gradients come from the grad sampler and the clipped sum
    from `privacy.fused_clip`: the native backward's summed weight gradients would be thrown
    away (DP-SGD replaces ``p.grad``), so it is not run. Only for inputs that need no gradient:
    then nothing below the layer waits for one. The weights are inputs so that the output
    requires gradients (Opacus' backward hook fires on it) and get none.
    """

    @staticmethod
    def forward(ctx: Any, n_outputs: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.n_inputs = len(tensors)
        return tuple(t.clone() for t in tensors[:n_outputs])

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor | None, *state_grads: Tensor | None) -> Any:
        for grad in state_grads:
            _refuse_state_gradient(grad)
        return (None,) * (1 + ctx.n_inputs)


def _skips_native_backward(layer: nn.RNNBase, input: Any) -> bool:
    """Whether ``layer`` may run without autograd (factored DP-SGD, input needing no gradient)."""
    return bool(
        layer.__dict__.get("_factored", False)
        and layer.training
        and torch.is_grad_enabled()
        and isinstance(input, Tensor)
        and not input.requires_grad
    )


def _run(layer: nn.RNNBase, native: type[nn.RNNBase], input: Any) -> tuple[Tensor, ...]:
    """The native forward's (output, *states), without its backward where it is not needed."""
    if not _skips_native_backward(layer, input):
        output, state = native.forward(layer, input)
        states = state if isinstance(state, tuple) else (state,)
        outputs: tuple[Tensor, ...] = (output, *(_guarded(s) for s in states))
    else:
        with torch.no_grad():
            output, state = native.forward(layer, input)
        states = state if isinstance(state, tuple) else (state,)
        params = tuple(layer.parameters())
        outputs = _NoWeightGradients.apply(1 + len(states), output, *states, *params)
    if layer.training:
        layer.__dict__.setdefault("_recent", _Recent()).keep(input, outputs[0])
    return outputs


class FusedLSTM(nn.LSTM):
    """``nn.LSTM`` whose per-student gradients Opacus computes with `_lstm_grad_sample`."""

    def forward(self, input: Any, hx: Any = None) -> Any:
        _check_call(input, hx)
        output, h_n, c_n = _run(self, nn.LSTM, input)
        return output, (h_n, c_n)


class FusedGRU(nn.GRU):
    """``nn.GRU`` whose per-student gradients Opacus computes with `_gru_grad_sample`."""

    def forward(self, input: Any, hx: Any = None) -> Any:
        _check_call(input, hx)
        output, h_n = _run(self, nn.GRU, input)
        return output, h_n


def _output(layer: nn.RNNBase, x: Tensor, native: type[nn.RNNBase]) -> Tensor:
    """The layer's output sequence for ``x``: kept from the forward pass, or recomputed."""
    recent: _Recent | None = layer.__dict__.get("_recent")
    kept = recent.take(x) if recent is not None else None
    if kept is not None:
        return kept
    output: Tensor = native.forward(layer, x)[0]  # not layer(x): that re-enters Opacus' hooks
    return output


def _shifted(sequence: Tensor) -> Tensor:
    """``sequence`` one step later: zeros at step 0, step t-1 at step t (B, T, H)."""
    return torch.cat([sequence.new_zeros(sequence[:, :1].shape), sequence[:, :-1]], dim=1)


def _weights(layer: nn.RNNBase) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter, nn.Parameter]:
    """``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` of a single-layer RNN."""
    names = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    w_ih, w_hh, b_ih, b_hh = (cast(nn.Parameter, getattr(layer, n)) for n in names)
    return w_ih, w_hh, b_ih, b_hh


def _weight_grads(
    layer: nn.RNNBase, x: Tensor, h_prev: Tensor, d_ih: Tensor, d_hh: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-student gradients from the gate gradients of every step (B, T, ...; any strides).

    Factored layers (`fuse_recurrent_layers` with ``factored=True``) stash the weights' factors
    for `privacy.fused_clip` and give Opacus placeholders; others form them with one bmm each.
    """
    w_ih, w_hh, b_ih, b_hh = _weights(layer)
    g_b_ih = d_ih.sum(dim=1)
    g_b_hh = g_b_ih.clone() if d_ih is d_hh else d_hh.sum(dim=1)  # LSTM: the same gradients
    if layer.__dict__.get("_factored", False):
        return {
            w_ih: fused_clip.stash(w_ih, d_ih.transpose(0, 1), x.transpose(0, 1)),
            w_hh: fused_clip.stash(w_hh, d_hh.transpose(0, 1), h_prev.transpose(0, 1)),
            b_ih: g_b_ih,
            b_hh: g_b_hh,
        }
    if d_ih is d_hh:  # LSTM: both projections get the same gate gradients, one bmm serves
        both = torch.einsum("btg,btk->bgk", d_ih, torch.cat([x, h_prev], dim=2))
        g_ih, g_hh = both[..., : x.shape[2]], both[..., x.shape[2] :]
    else:
        g_ih = torch.bmm(d_ih.transpose(1, 2), x)
        g_hh = torch.bmm(d_hh.transpose(1, 2), h_prev)
    return {w_ih: g_ih, w_hh: g_hh, b_ih: g_b_ih, b_hh: g_b_hh}


@register_grad_sampler(FusedLSTM)  # type: ignore[untyped-decorator]
@torch.no_grad()
def _lstm_grad_sample(
    layer: FusedLSTM, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-student gradients of an LSTM from ``backprops`` = dLoss/dOutput, (B, T, H).

    Gates are recomputed from the input and the output sequence the forward pass kept (no
    recurrence needed), the cell states by one elementwise pass; then BPTT runs backwards with
    one (B, 4H) x (4H, H) product per step, as the native backward does, keeping every step's
    gate gradients. Everything inside is time-major (T, B, ...) so that a step is one
    contiguous block, written in place into few buffers (each full-size pass and allocation
    counts at batch 256), and the loops index lists of per-step views made by one ``unbind``
    each (at batch 64 the per-call cost of the loops is as large as their arithmetic).
    """
    x = activations[0].to(backprops.dtype)
    out = _output(layer, x, nn.LSTM)
    batch, steps, hidden = out.shape
    n_in = x.shape[2]
    w_ih, w_hh, b_ih, b_hh = _weights(layer)
    factored = layer.__dict__.get("_factored", False)
    # a[t] = [x_t, h_{t-1}]: what both weight matrices multiply, time-major. Factored, two
    # columns of ones follow, which the biases multiply: the four parameters' per-student
    # gradients are then one product's column blocks (`privacy.fused_clip.stash_joint`).
    width = n_in + hidden
    a = x.new_empty(steps, batch, width + 2 * factored)
    a[:, :, :n_in] = x.transpose(0, 1)
    a[0, :, n_in:width] = 0
    a[1:, :, n_in:width] = out[:, :-1].transpose(0, 1)
    a[:, :, width:] = 1
    gates = torch.addmm(
        b_ih + b_hh, a.view(steps * batch, a.shape[2])[:, :width], torch.cat([w_ih, w_hh], 1).t()
    )
    gates = gates.view(steps, batch, 4, hidden)
    # tanh(z) = 2 sigmoid(2z) - 1: torch's float32 tanh is several times slower on CPU. Then
    # every gate's derivative is s (1 - s) of its sigmoid s (times 4 for the tanh gate g).
    gates[:, :, 2] *= 2
    gates.sigmoid_()
    factor = torch.addcmul(gates, gates, gates, value=-1)  # s - s^2, all four gates at once
    gates[:, :, 2].mul_(2).sub_(1)
    i, f, g, o = gates.unbind(2)
    c = torch.mul(i, g)  # c[t] = f[t] * c[t - 1] + i[t] * g[t], in place
    c_t, f_t = c.unbind(0), f.unbind(0)
    for t in range(1, steps):
        c_t[t].addcmul_(f_t[t], c_t[t - 1])
    # h = o * tanh(c), tanh(c) = 2 s_c - 1 with s_c = sigmoid(2c); 1 - tanh(c)^2 = 4 s_c (1 - s_c).
    s_c = torch.mul(c, 2).sigmoid_()
    dc_from_dh = torch.addcmul(s_c, s_c, s_c, value=-1).mul_(o).mul_(4)  # dh -> dc
    tanh_c = s_c.mul_(2).sub_(1)
    # Each gate's pre-activation gradient is dc (dh for the output gate) times its factor.
    factor[:, :, 0].mul_(g)
    factor[0, :, 1] = 0
    factor[1:, :, 1].mul_(c[:-1])
    factor[:, :, 2].mul_(i).mul_(4)
    factor[:, :, 3].mul_(tanh_c)
    # BPTT, writing each step's gate gradients over its factors (read once, at that step).
    d_gates = factor
    cell_part, out_part = d_gates[:, :, :3].unbind(0), d_gates[:, :, 3].unbind(0)
    flat = d_gates.view(steps, batch, 4 * hidden).unbind(0)
    dc_dh, grad_out = dc_from_dh.unbind(0), backprops.unbind(1)
    dh = grad_out[steps - 1].clone()
    dc = backprops.new_zeros(batch, hidden)
    dc_3 = dc.unsqueeze(1)  # a view: follows dc's in-place updates
    for t in range(steps - 1, -1, -1):
        dc.addcmul_(dh, dc_dh[t])
        cell_part[t].mul_(dc_3)
        out_part[t].mul_(dh)
        if t:
            dc.mul_(f_t[t])
            torch.addmm(grad_out[t - 1], flat[t], w_hh, out=dh)
    if factored:
        return fused_clip.stash_joint((w_ih, w_hh, b_ih, b_hh), d_gates.flatten(2), a)
    d_flat = d_gates.view(steps, batch, 4 * hidden).transpose(0, 1)  # batch-major views
    a = a.transpose(0, 1)
    return _weight_grads(layer, a[..., :n_in], a[..., n_in:], d_flat, d_flat)


@register_grad_sampler(FusedGRU)  # type: ignore[untyped-decorator]
@torch.no_grad()
def _gru_grad_sample(
    layer: FusedGRU, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-student gradients of a GRU from ``backprops`` = dLoss/dOutput, (B, T, H).

    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``: the input and hidden projections get
    different gradients for the candidate gate (the hidden one is scaled by ``r``).
    """
    x = activations[0].to(backprops.dtype)
    out = _output(layer, x, nn.GRU)
    h_prev = _shifted(out)
    w_ih, w_hh, b_ih, b_hh = _weights(layer)
    gi = x @ w_ih.t() + b_ih
    gh = h_prev @ w_hh.t() + b_hh
    gi_r, gi_z, gi_n = gi.chunk(3, dim=2)
    gh_r, gh_z, gh_n = gh.chunk(3, dim=2)
    r, z = (gi_r + gh_r).sigmoid(), (gi_z + gh_z).sigmoid()
    n = (gi_n + r * gh_n).tanh()
    # Every gate's pre-activation gradient is dh (the total gradient of h_t) times a factor.
    d_n = (1 - z) * (1 - n * n)
    d_r = d_n * gh_n * r * (1 - r)
    d_z = (h_prev - n) * z * (1 - z)
    factor_ih = torch.cat([d_r, d_z, d_n], dim=2)
    factor_hh = torch.cat([d_r, d_z, d_n * r], dim=2)
    dh_all = torch.empty_like(out)
    dh_next = backprops.new_zeros(out.shape[0], out.shape[2])
    for t in range(out.shape[1] - 1, -1, -1):
        dh = backprops[:, t] + dh_next
        dh_all[:, t] = dh
        step = dh.repeat(1, 3).mul_(factor_hh[:, t])
        dh_next = torch.addmm(dh * z[:, t], step, w_hh)
    dh3 = dh_all.repeat(1, 1, 3)
    return _weight_grads(layer, x, h_prev, dh3 * factor_ih, dh3 * factor_hh)


_TWINS: dict[type[nn.Module], type[FusedLSTM] | type[FusedGRU]] = {
    DPLSTM: FusedLSTM,
    DPGRU: FusedGRU,
}


def _twin(module: nn.Module, factored: bool) -> nn.Module | None:
    """The fused twin of an eligible layer, sharing its parameters; else None.

    ``DPLSTM``/``DPGRU`` always; ``nn.Linear`` only when ``factored``.
    """
    if factored and (linear := fused_clip.factored_linear(module)) is not None:
        return linear
    cls = _TWINS.get(type(module))
    # The shape check and the parameter sharing are the plain-training fast path's; a layer of
    # another shape is served by Opacus' hooks.
    return None if cls is None else native_twin(module, cls)


def fuse_recurrent_layers(model: nn.Module, *, factored: bool = False) -> Callable[[], None]:
    """Swap every eligible ``DPLSTM``/``DPGRU`` in ``model`` for its fused twin, in place.

    Parameters are shared, not copied: an optimizer built on ``model`` keeps updating them, and
    state-dict names do not change. Call before Opacus wraps the model.

    Args:
        factored: the twins' weight matrices leave their per-student gradients as factors for
            `privacy.fused_clip` (the ``DPOptimizer`` must have `install_factored_clipping`),
            and ``nn.Linear`` layers are swapped for `privacy.fused_clip.FactoredLinear` twins
            too; False gives Opacus materialised per-sample gradients (``p.grad_sample``).

    Returns:
        A function that puts the original layers back (they hold the trained weights).
    """
    found = [
        (parent, name, child, twin)
        for parent in model.modules()
        for name, child in parent.named_children()
        if (twin := _twin(child, factored)) is not None
    ]
    for parent, name, _, twin in found:
        twin.__dict__["_factored"] = factored  # read by the recurrent twins' grad samplers
        setattr(parent, name, twin)

    def restore() -> None:
        for parent, name, child, twin in reversed(found):
            for param in twin.parameters():
                fused_clip.clear(param)
            setattr(parent, name, child)

    return restore
