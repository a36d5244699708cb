"""DP randomness from ChaCha20: the right distributions, unpredictable, and what Opacus uses."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import privacy.noise as noise_module
from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from privacy.noise import SecureRandom, install_secure_noise
from shared_models.data.cohort import ModelInputs
from shared_models.training import make_loader, make_optimizer
from tests.privacy.conftest import BATCH, tiny_model

# Fixed keys make the statistical tests deterministic (no flaky p-values); real rounds never
# pass a key.
KEY_A, KEY_B = bytes(range(32)), bytes(range(1, 33))


def test_uniforms_lie_in_unit_interval_on_the_53_bit_grid_and_are_uniform() -> None:
    u = SecureRandom(KEY_A).uniform(100_000)

    assert u.dtype == np.float64
    assert u.min() >= 0.0 and u.max() < 1.0
    scaled = u * 2.0**53
    assert np.array_equal(scaled, np.floor(scaled))
    # Not float32 precision: most values use bits below 2**-24.
    assert np.mean(u * 2.0**24 != np.floor(u * 2.0**24)) > 0.99
    assert stats.kstest(u, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("std", [1.0, 3.5])
def test_normal_draws_follow_the_gaussian_with_the_requested_std(std: float) -> None:
    x = SecureRandom(KEY_A).normal((400, 500), std).numpy()

    assert x.shape == (400, 500)
    assert abs(x.mean()) < 5 * std / np.sqrt(x.size)
    assert x.std() == pytest.approx(std, rel=0.01)
    assert stats.kstest(x.ravel() / std, "norm").pvalue > 1e-3
    # Tails too: a Box-Muller with a bad radius would thin them.
    assert np.mean(np.abs(x) > 3 * std) == pytest.approx(2 * stats.norm.sf(3), rel=0.15)


def test_normal_is_cast_to_the_reference_dtype_and_zero_std_gives_exact_zeros() -> None:
    source = SecureRandom(KEY_A)

    assert source.normal((3, 4), 1.0, dtype=torch.float32).dtype == torch.float32
    zeros = source.normal((3, 4), 0.0, dtype=torch.float32)
    assert torch.equal(zeros, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="standard deviation"):
        source.normal((2,), -1.0)


def test_each_noise_value_averages_four_draws_as_opacus_secure_mode_does() -> None:
    # Same key, same stream: the noise value is (z1 + z2 + z3 + z4) / 2 of the next 4 draws.
    draws = SecureRandom(KEY_A).standard_normal(4 * 10).reshape(4, 10)
    noise = SecureRandom(KEY_A).normal((10,), 2.0).numpy()

    np.testing.assert_allclose(noise, draws.sum(axis=0) * 2.0 / 2.0, rtol=1e-12)


def test_gaussians_are_box_muller_of_the_next_uniforms_of_the_same_stream() -> None:
    # The draws are computed from the 53-bit integers directly (power-of-two scalings folded
    # in): they must stay the Box-Muller transform of exactly the uniforms `uniform` returns.
    pairs = 1000
    u = SecureRandom(KEY_A).uniform(2 * pairs)
    z = SecureRandom(KEY_A).standard_normal(2 * pairs - 1)  # odd: the last sine is dropped

    radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))
    angle = 2.0 * np.pi * u[pairs:]
    expected = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[: 2 * pairs - 1]
    np.testing.assert_allclose(z, expected, rtol=1e-12, atol=1e-15)


def test_a_draw_longer_than_one_chunk_continues_the_same_keystream() -> None:
    size = len(noise_module._ZEROS) + 12_345
    whole = SecureRandom(KEY_A).random_bytes(size)
    pieces = SecureRandom(KEY_A)

    assert whole == pieces.random_bytes(7) + pieces.random_bytes(size - 7)
    assert len(set(whole[i : i + 64] for i in range(0, size - 64, 64))) == (size - 64 + 63) // 64


def test_two_sources_are_independent_and_a_fresh_one_is_unpredictable() -> None:
    a, b = SecureRandom().normal((20_000,), 1.0), SecureRandom().normal((20_000,), 1.0)
    keyed_a, keyed_b = SecureRandom(KEY_A).uniform(20_000), SecureRandom(KEY_B).uniform(20_000)

    assert not torch.equal(a, b)
    assert abs(np.corrcoef(a.numpy(), b.numpy())[0, 1]) < 0.04
    assert abs(np.corrcoef(keyed_a, keyed_b)[0, 1]) < 0.04
    # Torch's global seed has no say in it.
    torch.manual_seed(0)
    first = SecureRandom().uniform(4)
    torch.manual_seed(0)
    assert not np.array_equal(first, SecureRandom().uniform(4))


def test_a_keyed_source_is_reproducible_and_rekeys_without_repeating(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(noise_module, "_REKEY_BYTES", 64)
    one, two = SecureRandom(KEY_A), SecureRandom(KEY_A)

    stream = one.random_bytes(64 * 8)
    assert stream == two.random_bytes(64 * 8)
    blocks = {stream[i : i + 64] for i in range(0, len(stream), 64)}
    assert len(blocks) == 8


def test_bernoulli_mask_includes_each_item_with_probability_p() -> None:
    source = SecureRandom(KEY_A)
    mask = source.bernoulli_mask(200_000, 0.125)

    assert mask.dtype == bool
    assert mask.mean() == pytest.approx(0.125, abs=5 * np.sqrt(0.125 * 0.875 / 200_000))
    assert not source.bernoulli_mask(100, 0.0).any()
    assert source.bernoulli_mask(100, 1.0).all()


def _engine() -> PrivacyEngine:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Secure RNG turned off", UserWarning)
        return PrivacyEngine()


def _dp_optimizer(noise_multiplier: float, max_grad_norm: float = 0.5) -> tuple[nn.Linear, object]:
    model = nn.Linear(50, 40)
    data = DataLoader(TensorDataset(torch.zeros(16, 50), torch.zeros(16, 40)), batch_size=16)
    _, optimizer, _ = _engine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=data,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
    )
    return model, optimizer


def _noised_grad(model: nn.Linear, optimizer: object, inputs: torch.Tensor) -> torch.Tensor:
    optimizer.zero_grad()  # type: ignore[attr-defined]
    model(inputs).sum().backward()
    optimizer.pre_step()  # type: ignore[attr-defined]  # clip, noise, scale; no update
    return model.weight.grad.detach().clone()


def test_installed_noise_has_std_noise_multiplier_times_clip_over_batch() -> None:
    model, optimizer = _dp_optimizer(noise_multiplier=1.3, max_grad_norm=0.5)
    install_secure_noise(optimizer, SecureRandom(KEY_A))

    # Zero inputs: only the bias has a gradient, the weight's gradient is pure noise.
    inputs = torch.zeros(16, 50, requires_grad=True)
    grad = _noised_grad(model, optimizer, inputs)

    expected = 1.3 * 0.5 / 16  # Opacus' mean reduction divides by the expected batch size
    assert grad.std().item() == pytest.approx(expected, rel=0.05)
    assert stats.kstest(grad.ravel().numpy() / expected, "norm").pvalue > 1e-3
    # Not torch's generator: reseeding it changes nothing about the next draw's source.
    torch.manual_seed(0)
    again = _noised_grad(model, optimizer, inputs)
    assert not torch.equal(grad, again)


def test_installed_noise_is_one_draw_split_over_the_parameters_in_their_dtypes() -> None:
    # One draw for all parameters (per-call cost), each its own stretch of the keystream.
    params = [nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(5, dtype=torch.float64))]
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=2.0,
        max_grad_norm=0.5,
        expected_batch_size=1,
    )
    install_secure_noise(optimizer, SecureRandom(KEY_A))
    for p in params:
        p.summed_grad = torch.ones_like(p)

    optimizer.add_noise()

    expected = SecureRandom(KEY_A).normal((17,), 2.0 * 0.5)
    assert [p.grad.dtype for p in params] == [torch.float32, torch.float64]  # type: ignore[union-attr]
    assert params[0].grad.shape == (3, 4)  # type: ignore[union-attr]
    torch.testing.assert_close(params[0].grad, (1 + expected[:12]).float().view(3, 4))
    torch.testing.assert_close(params[1].grad, 1 + expected[12:], rtol=0, atol=0)


def test_installed_noise_with_zero_multiplier_adds_exactly_nothing() -> None:
    inputs = torch.randn(16, 50, generator=torch.Generator().manual_seed(3)).requires_grad_()
    model, optimizer = _dp_optimizer(noise_multiplier=0.0)
    plain_grad = _noised_grad(model, optimizer, inputs)
    install_secure_noise(optimizer, SecureRandom(KEY_A))

    assert torch.equal(_noised_grad(model, optimizer, inputs), plain_grad)


def test_dp_session_draws_noise_and_batches_from_a_fresh_secure_source(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, students: ModelInputs
) -> None:
    sources = []
    for round_dir in ("a", "b"):
        session = DPSession.open(tmp_path / round_dir, budget, plan, institution="uni_a")
        model = tiny_model()
        loader = make_loader(students, BATCH, shuffle=True, seed=1)
        _, optimizer, loader = session.make_private(model, make_optimizer(model), loader)
        assert isinstance(optimizer.noise_source, SecureRandom)  # type: ignore[attr-defined]
        assert loader.batch_sampler.source is optimizer.noise_source  # type: ignore[attr-defined]
        sources.append(optimizer.noise_source)  # type: ignore[attr-defined]
        session.abandon_round()

    assert sources[0] is not sources[1]
