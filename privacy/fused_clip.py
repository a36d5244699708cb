"""Per-student clipping without per-student gradients: norms and sums from their factors.

A recurrent layer's per-student weight gradient is a sum over weeks of outer products,
``g_b = L_b^T R_b`` with ``L_b`` (T, out) the gate gradients and ``R_b`` (T, in) what the
weight multiplied. Opacus materialises ``g_b`` for every student (a B x out x in tensor per
weight, zero-filled, copied, then read twice to clip it): on the LSTM that memory traffic was
the largest part of the DP-SGD overhead (``docs/benchmarks.md``). This module clips the same
gradients from the factors instead (the "ghost norm" of Goodfellow 2015 and Li et al. 2022):

- the squared norm ``||g_b||^2 = sum_{t,s} (L_b L_b^T)_{ts} (R_b R_b^T)_{ts}``, two (T x T)
  Gram matrices per student, formed in float32 and summed in float64;
- the clipped sum ``sum_b c_b g_b = L^T (c * R)`` over all students and weeks, one product
  (the per-student clip factors ``c`` scale the rows of the narrower factor, here ``R``).

The values are those of Opacus' ``DPOptimizer.clip_and_accumulate`` (same clip factor
``min(1, C / (norm + 1e-6))`` over the norm of the student's whole gradient, same sum) up to
floating-point rounding. The guarantee does not change: every student's gradient is clipped to
``max_grad_norm`` before the sum the noise is added to.

How the factors travel: a grad sampler in factored mode (`privacy.fused_rnn`) calls `stash`
for a weight and hands Opacus an empty (B, 0) placeholder as its per-sample gradient, so
Opacus' hooks and its accumulation checks run unchanged; `install_factored_clipping` makes the
``DPOptimizer`` clip from the stash. Parameters whose gradients share a factor are stashed
together (`stash_joint`): an LSTM's four, ``L^T [x, h_prev, 1, 1]``, cost one Gram matrix per
factor and one product for all four clipped sums. A placeholder reaching Opacus' own clipping
fails loudly (an empty sum cannot take the parameter's shape) rather than training on a wrong
gradient.

`FactoredLinear` does the same for ``nn.Linear`` (``g_b = dy_b^T x_b``, one row per student):
in a DP round `privacy.fused_rnn.fuse_recurrent_layers` swaps the model's wider ``nn.Linear``
layers (a dense layer, not a one-unit head) for twins sharing their parameters. ``nn.Conv1d``
is left to Opacus: its per-student gradients are a few hundred values (edufl's filters,
32 x 8 x 3), nothing to save.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import Tensor, nn

__all__ = [
    "MIN_FACTORED_WIDTH",
    "FactoredLinear",
    "clear",
    "factored_linear",
    "install_factored_clipping",
    "stash",
    "stash_joint",
]

_ATTR = "_edufl_factors"


class _Joint:
    """Several parameters' per-student gradients as column blocks of one factored product."""

    def __init__(self, params: tuple[Tensor, ...], widths: tuple[int, ...]) -> None:
        self.params, self.widths = params, widths
        self.layout = (tuple(id(p) for p in params), widths)  # same layout: same columns


# A stashed part: (left, right, joint, columns of right); a lone weight's joint is None.
_Part = tuple[Tensor, Tensor, "_Joint | None", slice]


def _check_factors(left: Tensor, right: Tensor, out: int, width: int, what: str) -> None:
    if left.shape[:2] != right.shape[:2] or left.shape[2] != out or right.shape[2] != width:
        raise ValueError(
            f"factors {tuple(left.shape)} and {tuple(right.shape)} do not make per-student "
            f"gradients of {what}"
        )


def stash(param: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Record ``param``'s per-student gradients as ``left[:, b]^T @ right[:, b]``.

    Args:
        left: (N, B, out) and right: (N, B, in), for ``param`` of shape (out, in), rows first
            (time-major: the clipped sum is then one product without copies); a layer called
            twice in one step stashes twice and the gradients add up.

    Returns:
        The (B, 0) tensor to give Opacus as this parameter's per-sample gradient.
    """
    if param.dim() != 2:
        raise ValueError(f"a lone stashed parameter is a matrix, got {tuple(param.shape)}")
    _check_factors(left, right, param.shape[0], param.shape[1], f"a {tuple(param.shape)} weight")
    param.__dict__.setdefault(_ATTR, []).append((left, right, None, slice(None)))
    return left.new_empty(left.shape[1], 0)


def stash_joint(params: Sequence[Tensor], left: Tensor, right: Tensor) -> dict[Tensor, Tensor]:
    """Record several parameters' per-student gradients as column blocks of one product.

    Parameter ``k``'s gradient for student ``b`` is ``left[:, b]^T @ right[:, b, cols_k]``
    (shaped as the parameter: a vector is one column), ``cols_k`` the next
    ``params[k].numel() // out`` columns of ``right``. An LSTM's four parameters share their
    gate gradients: ``right = [x, h_prev, 1, 1]`` gives all four, whose norms then cost two
    Gram matrices and whose clipped sums one product.

    Returns:
        The (B, 0) placeholder to give Opacus for each parameter.
    """
    out = left.shape[2]
    widths = tuple(p.numel() // out for p in params)
    if any(p.numel() != out * w or p.shape[0] != out for p, w in zip(params, widths, strict=True)):
        raise ValueError(f"parameters {[tuple(p.shape) for p in params]} do not have {out} rows")
    _check_factors(left, right, out, sum(widths), f"parameters of {sum(widths)} columns")
    joint = _Joint(tuple(params), widths)
    start = 0
    for param, width in zip(params, widths, strict=True):
        part = (left, right, joint, slice(start, start + width))
        param.__dict__.setdefault(_ATTR, []).append(part)
        start += width
    return {p: left.new_empty(left.shape[1], 0) for p in params}


def clear(param: Tensor) -> None:
    """Forget ``param``'s stashed factors (a step not taken, a round ended)."""
    param.__dict__.pop(_ATTR, None)


def _units(params: Sequence[Tensor]) -> list[tuple[list[Tensor], list[slice], Tensor, Tensor]]:
    """Each stashed parameter's factors, taken: (params, their columns, left, right) per unit.

    A joint stash stays one unit when all its parameters took part in the same calls (the
    usual case); otherwise each parameter is clipped from its own columns, as a lone weight.
    Several calls of a layer in one step: g_b = sum_k L_kb^T R_kb = [L_1b; L_2b]^T [R_1b; R_2b].
    """
    parts: dict[int, list[_Part]] = {}
    for p in params:
        taken = p.__dict__.pop(_ATTR, None)
        if taken:
            parts[id(p)] = taken
    units: list[tuple[list[Tensor], list[slice], Tensor, Tensor]] = []
    done: set[int] = set()
    for p in params:
        own = parts.get(id(p))
        if own is None or id(p) in done:
            continue
        joint = own[0][2]
        members = list(joint.params) if joint is not None else [p]
        calls = [part[2] for part in own]
        whole = (
            joint is not None
            and all(c is not None and c.layout == joint.layout for c in calls)
            and all(
                id(m) in parts and id(m) not in done and [part[2] for part in parts[id(m)]] == calls
                for m in members
            )
        )
        if whole:
            units.append(
                (
                    members,
                    [parts[id(m)][0][3] for m in members],
                    _cat([part[0] for part in own]),
                    _cat([part[1] for part in own]),
                )
            )
            done.update(id(m) for m in members)
        else:
            units.append(
                (
                    [p],
                    [slice(None)],
                    _cat([part[0] for part in own]),
                    _cat([part[1][..., part[3]] for part in own]),
                )
            )
            done.add(id(p))
    return units


def _cat(factors: list[Tensor]) -> Tensor:
    return factors[0] if len(factors) == 1 else torch.cat(factors)


def _gram(factor: Tensor) -> Tensor:
    """``factor[:, b] @ factor[:, b]^T`` per student (B, T, T), returned in float64.

    One batched product on strided views (no copy) in the factor's precision (float32 at
    least), as Opacus forms its per-student gradients and norms; the float64 result keeps the
    sum of the two Grams' products from losing more (`_squared_norms`). A float64 product was
    2x slower at batch 256 for no useful precision: the squared norms agree with exact ones to
    5e-7 (Opacus' own float32 norms: 2e-7), far below anything the clipping could notice.
    """
    work = factor if factor.dtype in (torch.float32, torch.float64) else factor.float()
    return torch.bmm(work.transpose(0, 1), work.permute(1, 2, 0)).double()


def _same_tensor(t: Tensor) -> tuple[Any, ...]:
    """What identifies a factor's values: two views of one tensor are different objects."""
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def _squared_norms(left: Tensor, right: Tensor, grams: dict[tuple[Any, ...], Tensor]) -> Tensor:
    """``||left[:, b]^T right[:, b]||^2`` per student without forming the product.

    ``grams`` caches Gram matrices by factor (`_same_tensor`): weights stashed apart may
    share their ``left`` (the same memory, each through its own view).
    """
    if left.shape[0] == 1:  # one row per student: the norm of an outer product
        return left[0].double().square().sum(1) * right[0].double().square().sum(1)
    key = _same_tensor(left)
    if key not in grams:
        grams[key] = _gram(left)
    return (grams[key] * _gram(right)).sum((1, 2)).clamp_(min=0)


def _clip_and_accumulate(self: DPOptimizer) -> None:
    """`DPOptimizer.clip_and_accumulate`, reading stashed factors where a weight has them."""
    params = self.params
    units = _units(params)
    if not units:  # nothing factored this step: Opacus' own clipping, unchanged
        DPOptimizer.clip_and_accumulate(self)
        return
    factored = {id(m) for members, *_ in units for m in members}
    rest = [p for p in params if id(p) not in factored]
    flat = [self._get_flat_grad_sample(p).flatten(1) for p in rest]
    sizes = {u[2].shape[1] for u in units} | {len(g) for g in flat}
    if len(sizes) > 1:
        raise RuntimeError(
            f"per-student gradients of one step cover different batch sizes {sorted(sizes)}; "
            "a factored weight was stashed for another batch (zero_grad between steps)"
        )
    device = params[0].device
    grams: dict[tuple[Any, ...], Tensor] = {}
    squared = [_squared_norms(left, right, grams).to(device) for _, _, left, right in units]
    # The materialised rest (a one-unit head) in one block when it can be: one pass, not one
    # per parameter.
    kinds = {(g.dtype, g.device) for g in flat} | {(p.dtype, p.device) for p in rest}
    joined = len(kinds) == 1 and len(flat) > 1
    blocks = [torch.cat(flat, 1)] if joined else flat
    squared += [g.double().square().sum(1).to(device) for g in blocks]
    norms = torch.stack(squared).sum(0).sqrt()
    clip = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    grads: dict[int, Tensor] = {}
    for members, cols, left, right in units:
        product = _clipped_sum(left, right, clip.to(device=left.device, dtype=members[0].dtype))
        for m, c in zip(members, cols, strict=True):
            grads[id(m)] = product[:, c].contiguous().view(m.shape)
    if joined:
        summed = clip.to(device=flat[0].device, dtype=flat[0].dtype) @ blocks[0]
        for p, part in zip(rest, summed.split([g.shape[1] for g in flat]), strict=True):
            grads[id(p)] = part.view(p.shape)
    else:
        for p, g in zip(rest, flat, strict=True):
            grads[id(p)] = (clip.to(device=p.device, dtype=p.dtype) @ g.to(p.dtype)).view(p.shape)
    for p in params:
        _check_processed_flag(p.grad_sample)
        grad = grads[id(p)]
        if p.summed_grad is not None:
            p.summed_grad += grad
        else:
            p.summed_grad = grad
        _mark_as_processed(p.grad_sample)


def _clipped_sum(left: Tensor, right: Tensor, clip: Tensor) -> Tensor:
    """``sum_b clip[b] * left[:, b]^T @ right[:, b]``: one product over all students and rows.

    The clip factors scale the rows of the narrower factor (an LSTM's input and hidden state
    are 4x narrower than its gates), and the product is formed as narrow^T @ wide: several
    times faster than wide^T @ narrow for a narrow factor. Rows are taken in the order the
    wider factor is stored in (time-major from the LSTM's sampler, batch-major from the
    GRU's), so that it is read in place; the sum does not depend on the order. The result,
    (out, in), may be a transposed view: the caller copies the columns it keeps.
    """
    right_is_narrow = right.shape[2] <= left.shape[2]
    narrow, wide = (right, left) if right_is_narrow else (left, right)
    batch_major = wide.transpose(0, 1).is_contiguous() and not wide.is_contiguous()

    def rows(factor: Tensor) -> Tensor:
        ordered = factor.transpose(0, 1) if batch_major else factor
        return ordered.reshape(-1, factor.shape[2])

    scaled = narrow.to(clip.dtype) * clip.view(1, -1, 1)  # keeps narrow's memory layout
    product = rows(scaled).t() @ rows(wide.to(clip.dtype))
    return product.t() if right_is_narrow else product


def install_factored_clipping(optimizer: DPOptimizer) -> None:
    """Make ``optimizer`` clip stashed (factored) per-student gradients; others as Opacus does.

    Also makes its ``zero_grad`` forget factors a step did not use, as Opacus forgets
    ``grad_sample``.
    """
    zero_grad = optimizer.zero_grad

    def clear_then_zero(self: DPOptimizer, set_to_none: bool = False) -> Any:
        for p in self.params:
            clear(p)
        return zero_grad(set_to_none)

    optimizer.clip_and_accumulate = types.MethodType(  # type: ignore[method-assign]
        _clip_and_accumulate, optimizer
    )
    optimizer.zero_grad = types.MethodType(clear_then_zero, optimizer)  # type: ignore[method-assign]


#: Narrowest ``nn.Linear`` (inputs or outputs) whose per-student gradients are factored.
MIN_FACTORED_WIDTH = 8


class FactoredLinear(nn.Linear):
    """``nn.Linear`` whose per-student weight gradients are stashed as factors (a DP round's)."""


@register_grad_sampler(FactoredLinear)  # type: ignore[untyped-decorator]
@torch.no_grad()
def _linear_grad_sample(
    layer: FactoredLinear, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """``g_b = sum_n dy[b, n]^T x[b, n]`` over any middle dimensions (none: one row)."""
    x, dy = activations[0].to(backprops.dtype), backprops
    x, dy = (
        (x.unsqueeze(1), dy.unsqueeze(1)) if x.dim() == 2 else (x.flatten(1, -2), dy.flatten(1, -2))
    )
    grads = {layer.weight: stash(layer.weight, dy.transpose(0, 1), x.transpose(0, 1))}
    if layer.bias is not None:
        grads[layer.bias] = dy.sum(1)
    return grads


def factored_linear(module: nn.Module) -> FactoredLinear | None:
    """A `FactoredLinear` sharing ``module``'s parameters, for an ``nn.Linear`` where it pays.

    Only when both widths are at least `MIN_FACTORED_WIDTH`: a per-student gradient is then at
    least that many times larger than its factors. A one-unit head's gradient is no larger
    than its input, and Opacus' materialised path is cheaper for it.
    """
    if type(module) is not nn.Linear:
        return None
    if min(module.in_features, module.out_features) < MIN_FACTORED_WIDTH:
        return None
    with torch.device("meta"):  # no storage and no draw from torch's RNG for throwaway weights
        twin = FactoredLinear(module.in_features, module.out_features, bias=module.bias is not None)
    twin.weight = module.weight
    twin.bias = module.bias
    twin.train(module.training)
    return twin
