"""The plain-training fast path: Opacus' recurrent layers routed through torch's native kernels."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.layers import DPGRU, DPLSTM

from shared_models.data.cohort import ModelInputs
from shared_models.models.native import native_recurrent, native_twin
from shared_models.models.registry import build_model
from shared_models.training import FitConfig, fit, set_seed
from tests.shared_models.conftest import synthetic_inputs

RECURRENT = ["lstm", "gru", "lstm-gru", "cnn-lstm", "multitask"]


def _model(name: str, inputs: ModelInputs, seed: int = 0) -> torch.nn.Module:
    set_seed(seed)
    _, weeks, n_dynamic = inputs.dynamic.shape
    return build_model(name, weeks, n_dynamic, inputs.static.shape[1])


def _loss_and_grads(model: torch.nn.Module, inputs: ModelInputs) -> tuple[float, dict]:
    model.zero_grad()
    tensors = [torch.from_numpy(a) for a in (inputs.dynamic, inputs.week_mask, inputs.static)]
    outputs = model(*tensors)
    # Every head in the loss, so every parameter gets a gradient.
    loss = sum((out - 0.5).pow(2).mean() for out in outputs.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _recurrent_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, DPLSTM | DPGRU)]


@pytest.mark.parametrize("name", RECURRENT)
def test_native_path_computes_the_same_loss_and_gradients(name: str) -> None:
    inputs = synthetic_inputs(n=48, seed=3)
    model = _model(name, inputs)
    assert _recurrent_layers(model), f"{name} has no Opacus recurrent layer to route"
    model.eval()  # dropout off: the two passes must see the same network
    loss, grads = _loss_and_grads(model, inputs)
    with native_recurrent(model):
        assert all("forward" in m.__dict__ for m in _recurrent_layers(model))
        native_loss, native_grads = _loss_and_grads(model, inputs)
    assert native_loss == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == native_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(native_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_the_layers_own_forward_and_state_dict_names_stay() -> None:
    inputs = synthetic_inputs(n=16)
    model = _model("lstm-gru", inputs)
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"), native_recurrent(model):
        assert list(model.state_dict()) == keys
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == keys


def test_training_updates_the_layers_parameters_in_place() -> None:
    inputs = synthetic_inputs(n=32)
    model = _model("lstm", inputs)
    layer = _recurrent_layers(model)[0]
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    ids = {n: id(p) for n, p in layer.named_parameters()}
    fit(model, inputs, None, "risk", FitConfig(max_epochs=1, batch_size=16))
    assert {n: id(p) for n, p in layer.named_parameters()} == ids
    assert any(not torch.equal(before[n], p) for n, p in layer.named_parameters())
    assert "forward" not in layer.__dict__


def test_a_model_opacus_wrapped_keeps_its_hooked_layers() -> None:
    inputs = synthetic_inputs(n=16)
    wrapped = GradSampleModule(_model("lstm", inputs))
    with native_recurrent(wrapped):
        assert not any("forward" in m.__dict__ for m in wrapped.modules())


def test_only_the_shape_edufl_builds_gets_a_twin() -> None:
    assert native_twin(DPLSTM(3, 4, batch_first=True)) is not None
    assert native_twin(DPGRU(3, 4, batch_first=True)) is not None
    assert native_twin(DPLSTM(3, 4, num_layers=2, batch_first=True)) is None
    assert native_twin(DPLSTM(3, 4, batch_first=False)) is None
    assert native_twin(torch.nn.Linear(3, 4)) is None
    with pytest.raises(TypeError, match="must be a GRU"):
        native_twin(DPGRU(3, 4, batch_first=True), torch.nn.LSTM)


def test_fit_on_the_native_path_matches_the_unrolled_one() -> None:
    """Same seed, same data: the trained weights agree up to float rounding."""
    inputs = synthetic_inputs(n=64, seed=5)
    config = FitConfig(max_epochs=2, batch_size=16, seed=7)
    native = _model("gru", inputs)
    fit(native, inputs, None, "grade", config)
    unrolled = _model("gru", inputs)
    # Opacus' unrolled forward, as before the fast path: a hooked model is left as it is.
    unrolled.__dict__["autograd_grad_sample_hooks"] = [object()]
    fit(unrolled, inputs, None, "grade", config)
    for (n, a), (_, b) in zip(
        native.state_dict().items(), unrolled.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=n)
