"""Losses, the shared epoch loop (plain, DP, FedProx), fit with early stopping, weights on disk."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine

from shared_models.data.cohort import ModelInputs
from shared_models.early_stopping import EarlyStopping
from shared_models.losses import balanced_pos_weight, task_loss
from shared_models.models.registry import build_model
from shared_models.models.weights import assign_weights, load_weights, named_weights, save_weights
from shared_models.training import (
    EpochRecord,
    FitConfig,
    evaluate,
    fit,
    make_loader,
    make_optimizer,
    predict,
    set_seed,
    train_one_epoch,
)

MakeInputs = Callable[..., ModelInputs]


def _model(name: str, inputs: ModelInputs, seed: int = 0, **config: object) -> torch.nn.Module:
    set_seed(seed)
    _, weeks, n_dynamic = inputs.dynamic.shape
    return build_model(name, weeks, n_dynamic, inputs.static.shape[1], config or None)


def _private(model: torch.nn.Module, loader, optimizer, noise: float, clip: float):  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' secure-RNG notice
        engine = PrivacyEngine(accountant="rdp")
        gsm, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise,
            max_grad_norm=clip,
            poisson_sampling=True,
        )
    return engine, gsm, dp_optimizer, dp_loader


# --- losses ---------------------------------------------------------------------------------


def test_grade_loss_leaves_out_ungraded_students_and_keeps_gradients_finite() -> None:
    pred = torch.tensor([0.5, 0.2, 0.9], requires_grad=True)
    grade = torch.tensor([0.7, float("nan"), 0.4])
    loss = task_loss({"grade": pred}, grade, torch.zeros(3), "grade")
    # (0.2^2 + 0.5^2) / batch of 3: the ungraded student counts as zero, not as NaN.
    assert loss.item() == pytest.approx((0.04 + 0.25) / 3)
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert pred.grad[1].item() == 0.0


def test_risk_loss_with_pos_weight_matches_hand_computed_bce() -> None:
    logit = torch.tensor([0.0, 2.0])
    labels = torch.tensor([1.0, 0.0])
    loss = task_loss({"risk": logit}, torch.zeros(2), labels, "risk", pos_weight=3.0)
    expected = (3.0 * math.log(2.0) + math.log(1.0 + math.e**2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_multitask_loss_is_the_weighted_sum_of_present_heads() -> None:
    outputs = {"risk": torch.tensor([0.0]), "grade": torch.tensor([0.5])}
    grade, labels = torch.tensor([0.0]), torch.tensor([1.0])
    loss = task_loss(outputs, grade, labels, "multitask", loss_weights={"grade": 2.0})
    assert loss.item() == pytest.approx(math.log(2.0) + 2.0 * 0.25, rel=1e-6)


def test_task_without_a_matching_head_is_refused_with_a_fix() -> None:
    with pytest.raises(ValueError, match="build it with config targets including 'grade'"):
        task_loss({"risk": torch.zeros(2)}, torch.zeros(2), torch.zeros(2), "grade")
    with pytest.raises(ValueError, match="valid tasks are: risk, grade, multitask"):
        task_loss({"risk": torch.zeros(2)}, torch.zeros(2), torch.zeros(2), "dropout")


def test_balanced_pos_weight_is_negatives_over_positives() -> None:
    assert balanced_pos_weight([0, 0, 0, 1, np.nan]) == 3.0
    with pytest.raises(ValueError, match="both classes"):
        balanced_pos_weight([0, 0])


# --- one epoch: plain, DP, FedProx ------------------------------------------------------------


def test_dp_epoch_with_empty_poisson_batches_still_takes_every_noisy_step(
    make_inputs: MakeInputs,
) -> None:
    inputs = make_inputs(n=4, seed=3)
    model = _model("lstm", inputs)
    loader = make_loader(inputs, batch_size=1)  # sample rate 1/4: many empty batches
    engine, gsm, optimizer, dp_loader = _private(model, loader, make_optimizer(model), 1.0, 1.0)
    sizes: list[int] = []

    def recording():  # type: ignore[no-untyped-def]
        for batch in dp_loader:
            sizes.append(len(batch[0]))
            yield batch

    torch.manual_seed(0)
    loss = train_one_epoch(gsm, recording(), optimizer, "risk")
    assert 0 in sizes  # this seed does produce empty batches
    assert math.isfinite(loss)
    [(noise, rate, steps)] = engine.accountant.history
    assert (noise, rate) == (1.0, 0.25)
    assert steps == len(sizes) == len(dp_loader)  # empty batches are accounted steps


def test_dp_training_on_one_task_leaves_the_other_heads_usable(make_inputs: MakeInputs) -> None:
    inputs = make_inputs(n=32)
    model = _model("cnn-lstm", inputs)  # risk and grade heads, trained on risk only
    loader = make_loader(inputs, batch_size=8)
    _, gsm, optimizer, dp_loader = _private(model, loader, make_optimizer(model), 1.0, 1.0)
    assert math.isfinite(train_one_epoch(gsm, dp_loader, optimizer, "risk"))
    report = evaluate(gsm, inputs, "multitask")  # scoring works on the wrapped module too
    assert set(report) == {"n", "loss", "risk", "grade"}
    assert math.isfinite(report["loss"])


def test_plain_epoch_skips_empty_batches_and_reports_nan_when_nothing_was_seen(
    make_inputs: MakeInputs,
) -> None:
    inputs = make_inputs(n=8)
    model = _model("gru", inputs)
    empty = [
        tuple(torch.empty((0, *t.shape[1:])) for t in batch)
        for batch in [next(iter(make_loader(inputs, 8)))]
    ]
    loss = train_one_epoch(model, empty, make_optimizer(model), "grade")
    assert math.isnan(loss)


def _one_sgd_step(inputs: ModelInputs, mu: float, shift: float, dp: bool) -> dict[str, np.ndarray]:
    model = _model("lstm", inputs, dropout=0.0)
    start = named_weights(model)
    anchor = {k: v + shift for k, v in start.items()}
    loader = make_loader(inputs, batch_size=len(inputs))
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if dp:
        # Clipping to ~0 and no noise leave only the proximal gradient.
        _, model, optimizer, loader = _private(model, loader, optimizer, 0.0, 1e-12)
    train_one_epoch(model, loader, optimizer, "risk", proximal_mu=mu, global_params=anchor)
    after = named_weights(model)
    return {k: after[k] - start[k] for k in start}


@pytest.mark.parametrize("dp", [False, True], ids=["plain", "opacus"])
def test_fedprox_term_pulls_weights_towards_the_global_model(
    dp: bool, make_inputs: MakeInputs
) -> None:
    inputs = make_inputs(n=16)
    with_prox = _one_sgd_step(inputs, mu=0.5, shift=1.0, dp=dp)
    without = _one_sgd_step(inputs, mu=0.0, shift=1.0, dp=dp)
    for name in with_prox:
        # SGD: delta_mu - delta_0 = -lr * mu * (w - w_global) = 0.1 * 0.5 * shift
        extra = with_prox[name] - without[name]
        np.testing.assert_allclose(extra, 0.05, atol=1e-5, err_msg=name)


def test_proximal_mu_without_global_params_is_refused(make_inputs: MakeInputs) -> None:
    inputs = make_inputs(n=8)
    model = _model("lstm", inputs)
    with pytest.raises(ValueError, match="global_params"):
        train_one_epoch(
            model, make_loader(inputs, 8), make_optimizer(model), "risk", proximal_mu=0.1
        )


# --- fit, early stopping ----------------------------------------------------------------------


def test_early_stopping_stops_patience_epochs_after_the_best_and_keeps_it() -> None:
    model = torch.nn.Linear(1, 1)
    stopper = EarlyStopping(patience=10)
    losses = [5.0, 4.0, 3.0, *[3.0 + 0.1 * i for i in range(1, 20)]]
    for epoch, loss in enumerate(losses, start=1):
        with torch.no_grad():
            model.weight.fill_(float(epoch))
        if stopper.step(loss, model, epoch):
            break
    assert (stopper.best_epoch, epoch) == (3, 13)
    assert stopper.restore(model)
    assert model.weight.item() == 3.0


def test_fit_stops_at_best_plus_patience_and_restores_the_best_weights(
    make_inputs: MakeInputs,
) -> None:
    train = make_inputs(n=48, seed=0)
    # The validation labels are the opposite rule, so validation loss soon stops improving.
    val = make_inputs(n=32, seed=1)
    val = ModelInputs(val.dynamic, val.week_mask, val.static, val.grade, 1.0 - val.at_risk)
    model = _model("lstm", train, hidden_size=8, learning_rate=0.05)
    snapshots: dict[int, dict[str, np.ndarray]] = {}
    records: list[EpochRecord] = []

    def remember(record: EpochRecord) -> None:
        records.append(record)
        snapshots[record.epoch] = named_weights(model)

    result = fit(
        model, train, val, "risk", FitConfig(max_epochs=60, batch_size=16), on_epoch=remember
    )
    assert result.stopped_early
    assert result.best_epoch is not None
    assert len(result.history) == result.best_epoch + 10 == len(records)
    val_losses = [r.val_loss for r in result.history]
    assert result.best_val_loss == min(val_losses)
    restored = named_weights(model)
    for name, value in snapshots[result.best_epoch].items():
        assert np.array_equal(restored[name], value), name


def test_fit_is_deterministic_for_a_seed(make_inputs: MakeInputs) -> None:
    train = make_inputs(n=32)
    runs = []
    for _ in range(2):
        model = _model("cnn-lstm", train)
        fit(model, train, None, "multitask", FitConfig(max_epochs=2, batch_size=8, seed=3))
        runs.append(named_weights(model))
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_fit_decays_the_learning_rate_exponentially_for_multitask(make_inputs: MakeInputs) -> None:
    train = make_inputs(n=16)
    model = _model("multitask", train, hidden_size=8, lr_decay=0.5)
    result = fit(model, train, None, "multitask", FitConfig(max_epochs=3, batch_size=8))
    rates = [r.learning_rate for r in result.history]
    assert rates == pytest.approx([1e-3, 1e-3 * math.exp(-0.5), 1e-3 * math.exp(-1.0)])


def test_fit_with_class_weighting_uses_the_train_split_balance(make_inputs: MakeInputs) -> None:
    train = make_inputs(n=40)
    model = _model("lstm", train, hidden_size=4)
    result = fit(model, train, None, "risk", FitConfig(max_epochs=1, class_weighting=True))
    negatives, positives = (train.at_risk == 0).sum(), (train.at_risk == 1).sum()
    assert result.pos_weight == pytest.approx(negatives / positives)


def test_lstm_learns_a_risk_signal_in_one_dynamic_channel(make_inputs: MakeInputs) -> None:
    train, test = make_inputs(n=256, seed=0), make_inputs(n=128, seed=1)
    model = _model("lstm", train, hidden_size=16)
    fit(model, train, None, "risk", FitConfig(max_epochs=8, batch_size=32))
    report = evaluate(model, test, "risk")
    assert report["risk"]["roc_auc"] > 0.8


# --- predictions, evaluation, weights ----------------------------------------------------------


def test_predict_returns_probabilities_and_scaled_grades_per_student(
    tiny_inputs: ModelInputs,
) -> None:
    model = _model("cnn-lstm", tiny_inputs).train()
    out = predict(model, tiny_inputs, batch_size=10)
    assert set(out) == {"risk", "grade"}
    for value in out.values():
        assert value.shape == (len(tiny_inputs),) and value.dtype == np.float32
        assert ((value >= 0) & (value <= 1)).all()
    assert model.training  # predict restores the caller's mode
    # No dropout at prediction time: the same scores in other batches (up to float rounding:
    # the BLAS kernels' sums depend on the batch's size on some CPUs; dropout would move them
    # by far more).
    again = predict(model, tiny_inputs)
    np.testing.assert_allclose(out["risk"], again["risk"], rtol=1e-6, atol=1e-7)


def test_evaluate_reports_metrics_for_each_trained_head(tiny_inputs: ModelInputs) -> None:
    model = _model("multitask", tiny_inputs)
    report = evaluate(model, tiny_inputs, "multitask")
    assert set(report) == {"n", "loss", "risk", "grade", "engagement"}
    graded = int(np.isfinite(tiny_inputs.grade).sum())
    assert report["grade"]["n"] == graded < len(tiny_inputs)
    assert report["risk"]["n"] == len(tiny_inputs)


def test_saved_weights_reload_bit_for_bit(tmp_path: Path, tiny_inputs: ModelInputs) -> None:
    original = _model("lstm-gru", tiny_inputs, seed=1)
    path = save_weights(original, tmp_path / "model.weights")
    fresh = _model("lstm-gru", tiny_inputs, seed=2)
    load_weights(fresh, path)
    for name, value in named_weights(original).items():
        assert np.array_equal(named_weights(fresh)[name], value), name
    out_a, out_b = predict(original, tiny_inputs), predict(fresh, tiny_inputs)
    assert np.array_equal(out_a["grade"], out_b["grade"])


def test_weights_of_another_architecture_are_refused(
    tmp_path: Path, tiny_inputs: ModelInputs
) -> None:
    path = save_weights(_model("lstm", tiny_inputs), tmp_path / "lstm.weights")
    with pytest.raises(ValueError, match="missing"):
        load_weights(_model("gru", tiny_inputs), path)


def test_named_weights_hold_each_dp_recurrent_weight_once(tiny_inputs: ModelInputs) -> None:
    model = _model("lstm", tiny_inputs)
    weights = named_weights(model)
    assert "rnn.weight_ih_l0" in weights
    assert "rnn.l0.ih.weight" in model.state_dict()  # Opacus' alias of the same tensor
    assert "rnn.l0.ih.weight" not in weights
    other = _model("lstm", tiny_inputs, seed=9)
    assign_weights(other, weights)
    assert torch.equal(
        other.state_dict()["rnn.l0.ih.weight"], model.state_dict()["rnn.l0.ih.weight"]
    )
