"""DP-SGD on the model's device: the same rounds as on the CPU, with noise drawn on the CPU.

The GPU tests skip cleanly without CUDA; ``bench/bench_gpu.py`` runs the same comparison at
scale on a GPU machine.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from privacy.fused_rnn import fuse_recurrent_layers
from privacy.noise import SecureRandom
from shared_models.data.cohort import ModelInputs
from shared_models.devices import model_device
from shared_models.models.weights import named_weights
from shared_models.training import make_loader, make_optimizer, set_seed, train_one_epoch
from tests.privacy.conftest import BATCH, DYNAMIC, STATIC, WEEKS, random_inputs, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
KEY = bytes(range(32))


def _dp_round(state_dir: Path, students: ModelInputs, device: str | None) -> tuple[Any, dict]:
    budget = PrivacyBudget(epsilon=2.0, delta=1e-3, max_grad_norm=1.0, accountant="rdp")
    plan = DPPlan.for_training(len(students), BATCH, local_epochs=2, planned_rounds=2)
    session = DPSession.open(state_dir, budget, plan, institution="uni_a")
    set_seed(3)
    model = tiny_model()
    if device is not None:
        model = model.to(device)
    loader = make_loader(students, BATCH, shuffle=True, seed=3)
    private, optimizer, loader = session.make_private(model, make_optimizer(model), loader)
    for _ in range(2):
        train_one_epoch(private, loader, optimizer, "risk")
    return model, session.spend_round("run-1", 1, "node-7")


def test_a_dp_round_on_the_cpu_is_the_round_without_a_device_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Noise and sampling are unpredictable by design; the same key makes two rounds comparable.
    monkeypatch.setattr("privacy.dp.SecureRandom", lambda: SecureRandom(KEY))
    students = random_inputs(64)
    default, default_entry = _dp_round(tmp_path / "default", students, None)
    on_cpu, cpu_entry = _dp_round(tmp_path / "cpu", students, "cpu")

    assert model_device(on_cpu) == torch.device("cpu")
    assert cpu_entry["epsilon_after"] == default_entry["epsilon_after"]
    expected, actual = named_weights(default), named_weights(on_cpu)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


# -- on a GPU (skipped without one) ------------------------------------------------------------


@needs_cuda
def test_secure_noise_on_the_gpu_is_the_cpu_draw_copied_there() -> None:
    on_cpu = SecureRandom(KEY).normal((64, 33), 1.7, dtype=torch.float32)
    on_gpu = SecureRandom(KEY).normal((64, 33), 1.7, dtype=torch.float32, device="cuda")
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=0, atol=0)


@needs_cuda
def test_a_dp_round_on_cuda_trains_there_and_matches_the_cpu_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("privacy.dp.SecureRandom", lambda: SecureRandom(KEY))
    students = random_inputs(64)
    on_cpu, cpu_entry = _dp_round(tmp_path / "cpu", students, "cpu")
    on_gpu, gpu_entry = _dp_round(tmp_path / "gpu", students, "cuda")

    assert model_device(on_gpu).type == "cuda"
    assert gpu_entry["epsilon_after"] == cpu_entry["epsilon_after"]
    assert gpu_entry["steps"] == cpu_entry["steps"]
    expected, actual = named_weights(on_cpu), named_weights(on_gpu)  # both NumPy, from the CPU
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=0, atol=1e-3, err_msg=name)


def _per_sample(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    wrapped = GradSampleModule(model)
    outputs = wrapped(*batch)
    targets = torch.linspace(-1.0, 1.0, len(batch[0]), device=batch[0].device)
    loss = sum(((out - targets) ** 2).mean() for out in outputs.values())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        loss.backward()  # type: ignore[union-attr]
    grads = {name: p.grad_sample.detach().cpu().clone() for name, p in model.named_parameters()}
    wrapped._close()
    return grads


@needs_cuda
@pytest.mark.parametrize("name", ["lstm", "gru", "lstm-gru"])
def test_fused_per_student_gradients_on_cuda_equal_opacus_hooks_on_the_cpu(name: str) -> None:
    from shared_models.models.registry import build_model

    torch.manual_seed(0)
    reference = build_model(name, WEEKS, DYNAMIC, STATIC, {"dropout": 0.0})
    fused = copy.deepcopy(reference).to("cuda")
    fuse_recurrent_layers(fused)
    gen = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(16, WEEKS, DYNAMIC, generator=gen),
        torch.ones(16, WEEKS),
        torch.randn(16, STATIC, generator=gen),
    )
    expected = _per_sample(reference, batch)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        actual = _per_sample(fused, tuple(t.to("cuda") for t in batch))
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-3, atol=1e-5, msg=key)
