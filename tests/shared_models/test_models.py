"""Architectures and registry: shapes, masking, static features, DP-SGD, state-dict keys."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from pydantic import ValidationError

from shared_models.data.cohort import ModelInputs
from shared_models.models import engagement_target
from shared_models.models.registry import (
    MODEL_NAMES,
    UnknownModelError,
    build_model,
    config_class,
    validate_model_config,
)
from shared_models.models.weights import named_weights
from shared_models.training import make_loader, make_optimizer, set_seed, train_one_epoch

W, F, S = 6, 4, 3  # weeks, dynamic features, static features


def _batch(seed: int = 0, n: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dynamic = torch.randn(n, W, F, generator=gen)
    mask = torch.ones(n, W)
    mask[:, 3] = 0.0  # a gap in the middle
    mask[0, 4:] = 0.0  # one student scored part-way through the term
    static = torch.randn(n, S, generator=gen)
    return dynamic, mask, static


def _build(name: str, seed: int = 0, **config: object) -> torch.nn.Module:
    set_seed(seed)
    return build_model(name, W, F, S, config or None)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_returns_one_value_per_student_for_each_configured_head(name: str) -> None:
    model = _build(name).eval()
    out = model(*_batch())
    expected = set(validate_model_config(name).targets)
    if name == "multitask":
        expected.add("engagement")
    assert set(out) == expected
    for value in out.values():
        assert value.shape == (5,)
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_values_in_unobserved_weeks_never_change_outputs(name: str) -> None:
    model = _build(name).eval()
    dynamic, mask, static = _batch()
    changed = dynamic.clone()
    unobserved = mask == 0
    changed[unobserved] = torch.randn(int(unobserved.sum()), F) * 1e3
    changed[0, 5, 1] = changed[1, 3, 2] = float("nan")  # missing cells may still hold NaN
    with torch.no_grad():
        before, after = model(dynamic, mask, static), model(changed, mask, static)
    for head in before:
        assert torch.equal(before[head], after[head]), head


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_values_in_observed_weeks_do_change_outputs(name: str) -> None:
    model = _build(name).eval()
    dynamic, mask, static = _batch()
    changed = dynamic.clone()
    changed[:, 0, :] += 3.0  # week 0 is observed for everyone
    with torch.no_grad():
        before, after = model(dynamic, mask, static), model(changed, mask, static)
    assert any(not torch.allclose(before[h], after[h]) for h in before)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_static_features_reach_the_output_only_when_use_static(name: str) -> None:
    dynamic, mask, static = _batch()
    for use_static in (True, False):
        model = _build(name, use_static=use_static).eval()
        with torch.no_grad():
            a, b = model(dynamic, mask, static), model(dynamic, mask, static + 2.0)
        same = all(torch.equal(a[h], b[h]) for h in a)
        assert same is (not use_static), f"use_static={use_static}"


def test_multitask_fuses_static_features_into_every_recurrent_step() -> None:
    model = _build("multitask")
    assert model.rnn.input_size == F + 1 + S  # features, mask, static at each week
    assert _build("multitask", use_static=False).rnn.input_size == F + 1


def test_cnn_lstm_modes_match_the_papers_ablation() -> None:
    hybrid, cnn_only = _build("cnn-lstm"), _build("cnn")
    lstm_only = _build("cnn-lstm", mode="lstm")
    assert hybrid.conv is not None and hybrid.rnn is not None
    assert cnn_only.conv is not None and cnn_only.rnn is None
    assert lstm_only.conv is None and lstm_only.rnn is not None


def test_cnn_lstm_activity_map_uses_only_the_selected_channels() -> None:
    model = _build("cnn-lstm", activity_index=[0, 2])
    conv = model.conv[0]
    assert conv.in_channels == 3  # two activity types and the week mask
    with pytest.raises(ValueError, match=r"activity_index \[7\] out of range"):
        _build("cnn-lstm", activity_index=[0, 7])


@pytest.mark.parametrize("name", ["cnn-lstm", "cnn"])
def test_activity_scale_scales_the_activity_channels_and_not_the_week_mask(name: str) -> None:
    scaled = _build(name, activity_index=[0, 2], seed=3, activity_scale=0.1)
    plain = _build(name, activity_index=[0, 2], seed=3)
    assert plain.activity_scale == 1.0  # the default: the paper's plain map (issue 19)
    # Scaling the inputs by s is scaling the convolution's weights on those channels by s.
    with torch.no_grad():
        weight = plain.conv[0].weight
        weight[:, :2] *= 0.1  # the two activity channels; the week mask (last) stays
        dynamic, mask, static = _batch(seed=4)
        expected, got = plain.eval()(dynamic, mask, static), scaled.eval()(dynamic, mask, static)
    for head in expected:
        torch.testing.assert_close(got[head], expected[head])


def test_state_dict_keys_and_shapes_match_between_independent_builds() -> None:
    for name in MODEL_NAMES:
        server, client = _build(name, seed=1), _build(name, seed=2)
        server_state, client_state = server.state_dict(), client.state_dict()
        assert list(server_state) == list(client_state), name
        assert [v.shape for v in server_state.values()] == [v.shape for v in client_state.values()]


def test_target_order_does_not_change_state_dict_keys() -> None:
    a = _build("cnn-lstm", targets=["risk", "grade"])
    b = _build("cnn-lstm", targets=["grade", "risk"])
    assert list(a.state_dict()) == list(b.state_dict())


def _dp_inputs(n: int = 24) -> ModelInputs:
    rng = np.random.default_rng(0)
    return ModelInputs(
        dynamic=rng.normal(size=(n, W, F)).astype(np.float32),
        week_mask=np.ones((n, W), dtype=np.float32),
        static=rng.normal(size=(n, S)).astype(np.float32),
        grade=rng.random(n).astype(np.float32),
        at_risk=(rng.random(n) < 0.5).astype(np.float32),
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_takes_a_dp_sgd_step_under_opacus(name: str) -> None:
    model = _build(name)
    reference_keys = list(_build(name, seed=5).state_dict())
    before = named_weights(model)  # copies
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG notice
        engine = PrivacyEngine(accountant="rdp")
        gsm, optimizer, loader = engine.make_private(
            module=model,
            optimizer=make_optimizer(model, 1e-2),
            data_loader=make_loader(_dp_inputs(), batch_size=8, shuffle=True),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )
        loss = train_one_epoch(gsm, loader, optimizer, "multitask")
    assert np.isfinite(loss)
    assert engine.accountant.history  # the steps were accounted
    after = named_weights(gsm)
    assert set(after) == set(before)
    assert all(not np.array_equal(before[k], after[k]) for k in before)  # noise moves every weight
    assert list(gsm._module.state_dict()) == reference_keys
    assert all(k.startswith("_module.") for k in gsm.state_dict())


def test_unknown_model_name_error_lists_the_valid_names() -> None:
    with pytest.raises(UnknownModelError, match="valid names are: lstm, cnn-lstm, cnn"):
        build_model("transformer", W, F, S)


def test_config_rejects_a_misspelt_hyper_parameter() -> None:
    with pytest.raises(ValidationError, match="hiden_size"):
        validate_model_config("lstm", {"hiden_size": 32})


def test_config_overrides_are_applied_and_caller_mapping_untouched() -> None:
    overrides = {"hidden_size": 16, "targets": ["grade"]}
    cfg = validate_model_config("lstm", overrides)
    assert cfg.hidden_size == 16 and cfg.targets == ("grade",)
    assert overrides == {"hidden_size": 16, "targets": ["grade"]}
    assert _build("lstm", hidden_size=16).rnn.hidden_size == 16


def test_config_of_another_model_is_refused() -> None:
    with pytest.raises(TypeError, match="GRUConfig"):
        build_model("gru", W, F, S, config_class("lstm")())


def test_paper_defaults_are_the_registered_defaults() -> None:
    lstm = validate_model_config("lstm")
    assert lstm.hidden_size == 64 and lstm.dropout == 0.2
    assert validate_model_config("gru").hidden_size == 50
    lstm_gru = validate_model_config("lstm-gru")
    assert (lstm_gru.lstm_hidden_size, lstm_gru.gru_hidden_size) == (50, 50)
    multitask = validate_model_config("multitask")
    assert (multitask.hidden_size, multitask.dropout) == (128, 0.5) and multitask.lr_decay > 0
    assert validate_model_config("cnn").mode == "cnn"
    assert validate_model_config("cnn-lstm").mode == "hybrid"


def test_inputs_of_another_shape_are_refused_with_the_expected_shape() -> None:
    model = _build("lstm")
    dynamic, mask, static = _batch()
    with pytest.raises(ValueError, match=r"dynamic of shape \(B, 6, 4\)"):
        model(dynamic[:, :, :3], mask, static)


def test_engagement_target_is_mean_activity_over_observed_weeks() -> None:
    dynamic = torch.tensor([[[1.0, 3.0], [5.0, 7.0], [100.0, 100.0]], [[0.0, 0.0]] * 3])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    target = engagement_target(dynamic, mask)
    assert target[0].item() == pytest.approx(4.0)  # (1 + 3 + 5 + 7) / 4
    assert torch.isnan(target[1])  # never observed: no target
    only_first = engagement_target(dynamic, mask, torch.tensor([0]))
    assert only_first[0].item() == pytest.approx(3.0)
