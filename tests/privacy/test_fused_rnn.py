"""Fused per-student gradients of recurrent layers: the same values as Opacus', by construction."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.layers import DPGRU, DPLSTM
from torch import Tensor, nn

from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from privacy.fused_rnn import FusedGRU, FusedLSTM, FusedRNNError, fuse_recurrent_layers
from privacy.noise import SecureRandom
from shared_models.data.cohort import ModelInputs
from shared_models.models.registry import build_model
from shared_models.models.weights import named_weights
from shared_models.training import make_loader, make_optimizer, set_seed, train_one_epoch
from tests.privacy.conftest import BATCH, DYNAMIC, STATIC, WEEKS

RECURRENT_MODELS = ("lstm", "cnn-lstm", "gru", "lstm-gru", "multitask")


def _batch(n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Random students, some unseen in later weeks (their summary is an earlier step)."""
    gen = torch.Generator().manual_seed(seed)
    dynamic = torch.randn(n, WEEKS, DYNAMIC, generator=gen)
    mask = (torch.rand(n, WEEKS, generator=gen) > 0.3).float()
    mask[:, 0] = 1.0
    return dynamic, mask, torch.randn(n, STATIC, generator=gen)


def _per_sample_gradients(model: nn.Module, batch: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """Opacus' per-sample gradients of a mean loss over every output head, by parameter name."""
    wrapped = GradSampleModule(model)
    outputs = wrapped(*batch)
    targets = torch.linspace(-1.0, 1.0, len(batch[0]))
    loss = sum(((out - targets) ** 2).mean() for out in outputs.values())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        loss.backward()  # type: ignore[union-attr]
    grads = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    wrapped._close()
    return grads


@pytest.mark.parametrize("name", RECURRENT_MODELS)
def test_fused_per_student_gradients_equal_opacus_hooks_for_every_recurrent_model(
    name: str,
) -> None:
    torch.manual_seed(0)
    reference = build_model(name, WEEKS, DYNAMIC, STATIC, {"dropout": 0.0})
    fused = copy.deepcopy(reference)
    fuse_recurrent_layers(fused)
    assert not any(isinstance(m, DPLSTM | DPGRU) for m in fused.modules())
    batch = _batch(24)

    expected = _per_sample_gradients(reference, batch)
    actual = _per_sample_gradients(fused, batch)

    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        scale = float(value.abs().max()) or 1.0
        torch.testing.assert_close(actual[key], value, rtol=0, atol=1e-5 * scale, msg=key)


def test_fused_gradients_are_the_same_when_the_forward_output_must_be_recomputed() -> None:
    torch.manual_seed(0)
    model = build_model("lstm-gru", WEEKS, DYNAMIC, STATIC, {"dropout": 0.0})
    fuse_recurrent_layers(model)
    batch = _batch(16)
    kept = _per_sample_gradients(model, batch)

    def forget_output(module: nn.Module, *_: object) -> None:
        module.__dict__.pop("_recent", None)

    forget = model.lstm.register_forward_hook(forget_output)
    recomputed = _per_sample_gradients(model, batch)
    forget.remove()

    for key, value in kept.items():
        torch.testing.assert_close(recomputed[key], value, msg=key)


def test_fused_twin_shares_the_parameters_and_restore_puts_the_layer_back() -> None:
    model = build_model("lstm-gru", WEEKS, DYNAMIC, STATIC)
    before = dict(model.named_parameters())
    lstm, gru = model.lstm, model.gru

    restore = fuse_recurrent_layers(model)

    assert isinstance(model.lstm, FusedLSTM) and isinstance(model.gru, FusedGRU)
    during = dict(model.named_parameters())
    assert during.keys() == before.keys()
    assert all(during[k] is before[k] for k in before)  # an optimizer keeps updating them
    restore()
    assert model.lstm is lstm and model.gru is gru


def test_layers_opacus_fuses_differently_are_left_to_its_hooks() -> None:
    model = nn.Sequential(DPLSTM(3, 4, batch_first=True, num_layers=2))

    fuse_recurrent_layers(model)

    assert isinstance(model[0], DPLSTM)


def test_loss_through_the_final_hidden_state_is_refused_not_silently_missed() -> None:
    layer = FusedLSTM(3, 4, batch_first=True)
    _, (h_n, _) = layer(torch.randn(2, 5, 3))

    with pytest.raises(FusedRNNError, match="final hidden/cell state"):
        h_n.sum().backward()


def test_initial_state_is_refused() -> None:
    layer = FusedGRU(3, 4, batch_first=True)

    with pytest.raises(FusedRNNError, match="fused_rnn=False"):
        layer(torch.randn(2, 5, 3), torch.zeros(1, 2, 4))


def _students(n: int) -> ModelInputs:
    rng = np.random.default_rng(3)
    return ModelInputs(
        dynamic=rng.normal(size=(n, WEEKS, DYNAMIC)).astype(np.float32),
        week_mask=np.ones((n, WEEKS), dtype=np.float32),
        static=rng.normal(size=(n, STATIC)).astype(np.float32),
        grade=rng.random(n).astype(np.float32),
        at_risk=(rng.random(n) < 0.5).astype(np.float32),
    )


def _dp_round(state_dir: Path, fused: bool, name: str, task: str) -> tuple[Any, dict[str, Any]]:
    students = _students(64)
    budget = PrivacyBudget(epsilon=2.0, delta=1e-3)
    plan = DPPlan.for_training(len(students), BATCH, local_epochs=1, planned_rounds=2)
    session = DPSession.open(state_dir, budget, plan, institution="uni_a", fused_rnn=fused)
    set_seed(7)
    model = build_model(name, WEEKS, DYNAMIC, STATIC)
    loader = make_loader(students, BATCH, shuffle=True, seed=7)
    private, optimizer, loader = session.make_private(model, make_optimizer(model), loader)
    train_one_epoch(private, loader, optimizer, task)
    entry = session.spend_round("run-1", 1, "node-1")
    return model, entry


@pytest.mark.parametrize(
    ("name", "task"),
    [("lstm", "risk"), ("gru", "grade"), ("cnn-lstm", "risk"), ("multitask", "multitask")],
)
def test_a_fused_dp_round_trains_the_same_weights_and_spends_the_same_epsilon(
    tmp_path: Path, name: str, task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DP noise and sampling are unpredictable by design (a fresh ChaCha20 key each round);
    # comparing two rounds needs the same draws for both: the same key.
    monkeypatch.setattr("privacy.dp.SecureRandom", lambda: SecureRandom(bytes(32)))
    hooks_model, hooks_entry = _dp_round(tmp_path / "hooks", False, name, task)
    fused_model, fused_entry = _dp_round(tmp_path / "fused", True, name, task)

    assert fused_entry["epsilon_after"] == hooks_entry["epsilon_after"]
    assert fused_entry["steps"] == hooks_entry["steps"]
    assert not any(isinstance(m, FusedLSTM | FusedGRU) for m in fused_model.modules())
    expected, actual = named_weights(hooks_model), named_weights(fused_model)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, rtol=0, atol=1e-5, err_msg=key)
