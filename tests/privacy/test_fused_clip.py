"""Factored per-student clipping: Opacus' clipped sums without materialised per-student grads."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from privacy import fused_clip
from privacy.fused_clip import FactoredLinear, install_factored_clipping, stash
from privacy.fused_rnn import FusedLSTM, FusedRNNError, fuse_recurrent_layers
from shared_models.models.registry import build_model
from tests.privacy.conftest import DYNAMIC, STATIC, WEEKS
from tests.privacy.test_fused_rnn import RECURRENT_MODELS, _batch


def _clipped_sums(
    model: nn.Module, batch: tuple[Tensor, ...], clip: float, factored: bool
) -> dict[str, Tensor]:
    """``p.summed_grad`` after Opacus' DPOptimizer clipped one batch's per-student gradients."""
    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(batch[0]),
    )
    if factored:
        install_factored_clipping(optimizer)
    optimizer.zero_grad()
    targets = torch.linspace(-1.0, 1.0, len(batch[0]))
    loss = sum(((out - targets) ** 2).mean() for out in wrapped(*batch).values())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        loss.backward()  # type: ignore[union-attr]
    optimizer.clip_and_accumulate()
    sums = {name: p.summed_grad.clone() for name, p in model.named_parameters()}
    wrapped._close()
    return sums


def _per_student_norms(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    wrapped = GradSampleModule(copy.deepcopy(model))
    targets = torch.linspace(-1.0, 1.0, len(batch[0]))
    loss = sum(((out - targets) ** 2).mean() for out in wrapped(*batch).values())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        loss.backward()  # type: ignore[union-attr]
    squares = [p.grad_sample.flatten(1).square().sum(1) for p in wrapped.parameters()]
    return torch.stack(squares).sum(0).sqrt()


@pytest.mark.parametrize("name", [*RECURRENT_MODELS, "cnn", "logistic"])
def test_factored_clipping_gives_opacus_clipped_sums_for_every_model(name: str) -> None:
    torch.manual_seed(0)
    reference = build_model(name, WEEKS, DYNAMIC, STATIC, {"dropout": 0.0})
    factored = copy.deepcopy(reference)
    fuse_recurrent_layers(factored, factored=True)
    wide = [m for m in reference.modules() if type(m) is nn.Linear and min(m.weight.shape) >= 8]
    assert sum(isinstance(m, FactoredLinear) for m in factored.modules()) == len(wide)
    batch = _batch(24)
    norms = _per_student_norms(reference, batch)
    clip = float(norms.median())  # half the students are clipped, half are not
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()

    expected = _clipped_sums(reference, batch, clip, factored=False)
    actual = _clipped_sums(factored, batch, clip, factored=True)

    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        scale = float(value.abs().max()) or 1.0
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5 * scale, msg=key)


def _one_weight(batch: int, clip: float) -> tuple[nn.Parameter, DPOptimizer]:
    weight = nn.Parameter(torch.zeros(5, 3))
    optimizer = DPOptimizer(
        torch.optim.SGD([weight], lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=batch,
    )
    return weight, optimizer


def test_a_layer_called_twice_in_a_step_clips_the_sum_of_both_calls() -> None:
    gen = torch.Generator().manual_seed(1)
    parts = [
        (torch.randn(n, 6, 5, generator=gen), torch.randn(n, 6, 3, generator=gen)) for n in (4, 2)
    ]
    per_student = sum(torch.einsum("nbo,nbi->boi", left, right) for left, right in parts)
    assert isinstance(per_student, Tensor)
    norms = per_student.flatten(1).norm(dim=1)
    clip = float(norms.median())
    weight, optimizer = _one_weight(6, clip)
    install_factored_clipping(optimizer)
    for left, right in parts:
        weight.grad_sample = stash(weight, left, right)

    optimizer.clip_and_accumulate()

    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    expected = torch.einsum("b,boi->oi", factor, per_student)
    torch.testing.assert_close(weight.summed_grad, expected, rtol=1e-5, atol=1e-6)


def test_an_lstm_step_forms_one_gram_of_its_gate_gradients_and_one_of_all_they_multiply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The LSTM's four parameters share their gate gradients: one joint stash, whose norms cost
    # the Gram of the gates' gradients and the Gram of [x, h_prev, 1, 1], once each.
    model = build_model("lstm", WEEKS, DYNAMIC, STATIC, {"dropout": 0.0})
    fuse_recurrent_layers(model, factored=True)
    shapes: list[tuple[int, ...]] = []
    gram = fused_clip._gram

    def counted(factor: Tensor) -> Tensor:
        shapes.append(tuple(factor.shape))
        return gram(factor)

    monkeypatch.setattr(fused_clip, "_gram", counted)
    _clipped_sums(model, _batch(6), clip=1.0, factored=True)

    hidden = model.rnn.hidden_size
    assert sorted(shapes) == [(WEEKS, 6, DYNAMIC + 1 + hidden + 2), (WEEKS, 6, 4 * hidden)]


def _joint_parts(
    gen: torch.Generator, steps: int, batch: int
) -> tuple[Tensor, Tensor, nn.Parameter, nn.Parameter]:
    left = torch.randn(steps, batch, 5, generator=gen)
    right = torch.cat([torch.randn(steps, batch, 3, generator=gen), torch.ones(steps, batch, 1)], 2)
    return left, right, nn.Parameter(torch.zeros(5, 3)), nn.Parameter(torch.zeros(5))


def _expected_sums(
    parts: list[tuple[Tensor, Tensor]], clip: float
) -> tuple[Tensor, Tensor, Tensor]:
    per_student = sum(torch.einsum("nbo,nbi->boi", left, right) for left, right in parts)
    assert isinstance(per_student, Tensor)
    norms = per_student.flatten(1).norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    summed = torch.einsum("b,boi->oi", factor, per_student)
    return norms, summed[:, :3], summed[:, 3]


@pytest.mark.parametrize("second_call", ["joint", "split", "reordered"])
def test_a_joint_stash_clips_each_parameter_from_its_columns(second_call: str) -> None:
    # Joint: a weight and a bias (a column of ones) in one product, called twice in the step.
    # Split: the bias is stashed alone in the second call; reordered: the second call puts
    # the bias's column first. Then the calls do not line up and each parameter is clipped
    # from its own columns; the clipped sums are the same.
    gen = torch.Generator().manual_seed(2)
    first, second = _joint_parts(gen, 4, 6), _joint_parts(gen, 2, 6)
    left, right, weight, bias = first
    norms, weight_sum, bias_sum = _expected_sums([first[:2], second[:2]], 0.0)
    clip = float(norms.median())
    _, weight_sum, bias_sum = _expected_sums([first[:2], second[:2]], clip)
    optimizer = DPOptimizer(
        torch.optim.SGD([weight, bias], lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=6,
    )
    install_factored_clipping(optimizer)
    placeholders = fused_clip.stash_joint((weight, bias), left, right)
    if second_call == "split":
        placeholders[weight] = stash(weight, second[0], second[1][..., :3])
        fused_clip.stash_joint((bias,), second[0], second[1][..., 3:])
    elif second_call == "reordered":
        swapped = torch.cat([second[1][..., 3:], second[1][..., :3]], 2)
        placeholders = fused_clip.stash_joint((bias, weight), second[0], swapped)
    else:
        placeholders = fused_clip.stash_joint((weight, bias), second[0], second[1])
    weight.grad_sample, bias.grad_sample = placeholders[weight], placeholders[bias]

    optimizer.clip_and_accumulate()

    torch.testing.assert_close(weight.summed_grad, weight_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias.summed_grad, bias_sum, rtol=1e-5, atol=1e-6)
    assert weight.summed_grad.is_contiguous() and bias.summed_grad.shape == (5,)


def test_a_joint_stash_refuses_parameters_its_factors_do_not_make() -> None:
    left, right = torch.zeros(3, 2, 5), torch.zeros(3, 2, 4)
    with pytest.raises(ValueError, match="do not make"):
        fused_clip.stash_joint((nn.Parameter(torch.zeros(5, 2)),), left, right)
    with pytest.raises(ValueError, match="rows"):
        fused_clip.stash_joint((nn.Parameter(torch.zeros(4, 5)),), left, right)


def test_a_placeholder_reaching_opacus_own_clipping_fails_loudly() -> None:
    weight, optimizer = _one_weight(4, 1.0)  # no install_factored_clipping
    weight.grad_sample = stash(weight, torch.randn(2, 4, 5), torch.randn(2, 4, 3))

    with pytest.raises(RuntimeError, match="invalid for input of size 0"):
        optimizer.pre_step()


def test_zero_grad_forgets_factors_a_step_did_not_use() -> None:
    weight, optimizer = _one_weight(4, 1.0)
    install_factored_clipping(optimizer)
    weight.grad_sample = stash(weight, torch.randn(2, 4, 5), torch.randn(2, 4, 3))

    optimizer.zero_grad()

    assert fused_clip._units([weight]) == []


def test_factors_that_do_not_make_the_weight_are_refused() -> None:
    weight = nn.Parameter(torch.zeros(5, 3))

    with pytest.raises(ValueError, match="do not make per-student gradients"):
        stash(weight, torch.randn(2, 4, 3), torch.randn(2, 4, 5))


def test_factored_layers_skip_the_native_backward_only_when_nothing_below_needs_it() -> None:
    layer = FusedLSTM(3, 4, batch_first=True)
    layer.__dict__["_factored"] = True  # what fuse_recurrent_layers(..., factored=True) sets
    layer(torch.randn(2, 5, 3))[0].sum().backward()
    assert all(p.grad is None for p in layer.parameters())  # DP-SGD sets p.grad itself

    x = torch.randn(2, 5, 3, requires_grad=True)
    layer(x)[0].sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_a_factored_layer_still_refuses_a_loss_through_its_final_state() -> None:
    layer = FusedLSTM(3, 4, batch_first=True)
    layer.__dict__["_factored"] = True
    _, (h_n, _) = layer(torch.randn(2, 5, 3))

    with pytest.raises(FusedRNNError, match="final hidden/cell state"):
        h_n.sum().backward()


@pytest.mark.parametrize("name", [*RECURRENT_MODELS, "cnn"])
@pytest.mark.parametrize("factored", [False, True])
def test_an_empty_poisson_batch_steps_with_noise_only(name: str, factored: bool) -> None:
    model = build_model(name, WEEKS, DYNAMIC, STATIC)
    fuse_recurrent_layers(model, factored=factored)
    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=8,
    )
    if factored:
        install_factored_clipping(optimizer)
    empty = (torch.zeros(0, WEEKS, DYNAMIC), torch.zeros(0, WEEKS), torch.zeros(0, STATIC))
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        sum(out.sum() for out in wrapped(*empty).values()).backward()  # type: ignore[union-attr]

    assert optimizer.pre_step()
    for param in model.parameters():
        assert param.grad is not None and param.grad.shape == param.shape
        assert bool(param.grad.abs().sum() > 0)  # the noise alone
    wrapped._close()
