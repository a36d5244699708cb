"""The DP logistic baseline: its engineered features, padding, DP-SGD, checkpoints and scoring."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score
from torch import nn

from client.early_warning.scoring import (
    calibrate_model_dir,
    load_observed_term,
    load_scoring_model,
    score_cohort,
)
from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from shared_models.data.cohort import CohortArrays, ModelInputs, Normalizer
from shared_models.data.contract import default_spec
from shared_models.data.loader import load_cohort
from shared_models.models import LogisticModel, engineered_features
from shared_models.models.artifact import load_trained, save_trained
from shared_models.models.checkpoints import checkpoint_model, read_checkpoint, write_checkpoint
from shared_models.models.logistic import PER_INDICATOR
from shared_models.models.registry import build_model, validate_model_config
from shared_models.models.weights import named_weights
from shared_models.training import (
    FitConfig,
    fit,
    make_loader,
    make_optimizer,
    set_seed,
    train_one_epoch,
)

W, F, S = 8, 3, 2  # weeks, dynamic features, static features


def _build(weeks: int = W, seed: int = 0, **config: object) -> LogisticModel:
    set_seed(seed)
    model = build_model("logistic", weeks, F, S, config or None)
    assert isinstance(model, LogisticModel)
    return model


def _batch(n: int = 6, weeks: int = W, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    dynamic = torch.rand(n, weeks, F, generator=gen) * 2 - 1  # the contract's [-1, 1]
    mask = torch.ones(n, weeks)
    mask[0, 5:] = 0.0  # observed for five weeks only
    mask[1, 2] = mask[1, 6] = 0.0  # gaps
    mask[2, 1:] = 0.0  # a single week
    mask[3] = 0.0  # never observed
    static = torch.randn(n, S, generator=gen)
    return dynamic, mask, static


def test_features_match_a_hand_computation_with_a_gap() -> None:
    # One indicator, weeks 0-4; week 3 unobserved (and holding NaN, never read).
    dynamic = torch.tensor([[[-1.0], [0.0], [1.0], [float("nan")], [0.5], [7.0]]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
    mean, last, recent, trend, lowest, observed = engineered_features(dynamic, mask, 3)[0]
    assert mean.item() == pytest.approx(0.125)  # (-1 + 0 + 1 + 0.5) / 4
    assert last.item() == pytest.approx(0.5)
    assert recent.item() == pytest.approx(0.5)  # weeks 1, 2, 4: (0 + 1 + 0.5) / 3
    # Least squares of (0, 1, 0.5) on weeks (1, 2, 4): slope 0.5 / (14 / 3), times (3 - 1) / 2.
    assert trend.item() == pytest.approx(0.5 / (14 / 3))
    assert lowest.item() == pytest.approx(-1.0)
    assert observed.item() == pytest.approx(0.8)  # 4 of weeks 0-4


def test_a_straight_rise_across_the_window_reads_one() -> None:
    dynamic = torch.linspace(-1, 1, 4).view(1, 4, 1)
    features = engineered_features(dynamic, torch.ones(1, 4), 4)[0]
    assert features[PER_INDICATOR.index("trend")].item() == pytest.approx(1.0)


def test_every_feature_is_zero_without_an_observed_week() -> None:
    dynamic = torch.full((1, W, F), float("nan"))
    features = engineered_features(dynamic, torch.zeros(1, W), 4)
    assert torch.equal(features, torch.zeros(1, len(PER_INDICATOR) * F + 1))


def test_outputs_one_value_per_student_for_each_configured_head() -> None:
    for targets in (["risk"], ["risk", "grade"], ["grade"]):
        model = _build(targets=targets).eval()
        out = model(*_batch())
        assert set(out) == set(targets)
        for head, value in out.items():
            assert value.shape == (6,) and torch.isfinite(value).all(), head
        if "grade" in out:
            assert ((out["grade"] > 0) & (out["grade"] < 1)).all()  # the [0, 1] grade scale


def test_the_feature_map_has_no_parameters_only_one_linear_layer_per_head() -> None:
    model = _build(targets=["risk", "grade"])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2
    with_params = [m for m in model.modules() if list(m.parameters(recurse=False))]
    assert with_params == linears
    width = len(PER_INDICATOR) * F + 1 + S
    assert sum(p.numel() for p in model.parameters()) == 2 * (width + 1)
    assert sorted(model.state_dict()) == [
        "head.heads.grade.bias", "head.heads.grade.weight",
        "head.heads.risk.bias", "head.heads.risk.weight",
    ]  # fmt: skip
    assert not list(model.buffers())


def test_padding_with_unobserved_weeks_never_changes_the_output() -> None:
    short = _build(W).eval()
    long = _build(W + 5, seed=9).eval()
    long.load_state_dict(short.state_dict())  # the state dict does not depend on the weeks
    dynamic, mask, static = _batch()
    pad = torch.randn(6, 5, F) * 1e3
    pad[0, 2] = float("nan")
    padded = torch.cat([dynamic, pad], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(6, 5)], dim=1)
    with torch.no_grad():
        before, after = short(dynamic, mask, static), long(padded, padded_mask, static)
    torch.testing.assert_close(after["risk"], before["risk"], rtol=0, atol=1e-6)


def test_weeks_after_the_last_observed_one_are_never_read() -> None:
    model = _build().eval()
    dynamic, mask, static = _batch()
    changed = dynamic.clone()
    changed[mask == 0] = float("nan")
    with torch.no_grad():
        assert torch.equal(
            model(dynamic, mask, static)["risk"], model(changed, mask, static)["risk"]
        )
    changed[0, 4, 0] += 1.0  # student 0's last observed week
    with torch.no_grad():
        moved = model(changed, mask, static)["risk"] != model(dynamic, mask, static)["risk"]
    assert moved.tolist() == [True, False, False, False, False, False]


def test_config_defaults_and_limits() -> None:
    cfg = validate_model_config("logistic")
    assert (cfg.recent_weeks, cfg.dropout, cfg.dense_units) == (4, 0.0, 0)
    with pytest.raises(ValidationError, match="recent_weeks"):
        validate_model_config("logistic", {"recent_weeks": 1})
    with pytest.raises(ValidationError, match="dense_units"):
        validate_model_config("logistic", {"dense_units": 16})  # a linear model: no hidden layer


def _inputs(n: int = 64, seed: int = 0) -> ModelInputs:
    rng = np.random.default_rng(seed)
    dynamic = rng.uniform(-1, 1, size=(n, W, F)).astype(np.float32)
    at_risk = (dynamic[:, :, 0].mean(axis=1) < 0).astype(np.float32)  # learnable from the mean
    return ModelInputs(
        dynamic=dynamic,
        week_mask=np.ones((n, W), dtype=np.float32),
        static=rng.normal(size=(n, S)).astype(np.float32),
        grade=np.full(n, np.nan, dtype=np.float32),
        at_risk=at_risk,
    )


def test_a_dp_round_through_the_privacy_session_trains_and_is_accounted(tmp_path: Path) -> None:
    students = _inputs()
    budget = PrivacyBudget(epsilon=4.0, delta=1e-3, max_grad_norm=1.0, accountant="rdp")
    plan = DPPlan.for_training(len(students), 16, local_epochs=2, planned_rounds=2)
    session = DPSession.open(tmp_path, budget, plan, institution="uni_a")
    model = _build()
    keys = list(model.state_dict())
    before = named_weights(model)
    loader = make_loader(students, 16, shuffle=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' notices about full backward hooks
        private, optimizer, loader = session.make_private(
            model, make_optimizer(model, 0.05), loader
        )
        losses = [train_one_epoch(private, loader, optimizer, "risk") for _ in range(2)]
    entry = session.spend_round("run-1", 1, "node-1")
    assert all(np.isfinite(losses))
    assert 0 < entry["epsilon_after"] <= budget.epsilon
    after = named_weights(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    assert list(model.state_dict()) == keys  # the unwrapped model is what leaves the node


def test_a_checkpoint_and_a_model_folder_round_trip(tmp_path: Path) -> None:
    spec = default_spec()
    n_dyn, n_static = len(spec.dynamic), len(spec.static_names)
    set_seed(3)
    overrides = {"targets": ["risk", "grade"], "recent_weeks": 3}
    model = build_model("logistic", spec.weeks, n_dyn, n_static, overrides)
    manifest = {"model": "logistic", "model_overrides": overrides}
    manifest |= {"spec_fingerprint": spec.fingerprint, "seed": 3}
    written = write_checkpoint(tmp_path / "checkpoints", 2, model, manifest)
    restored = checkpoint_model(read_checkpoint(written.manifest_path), spec)
    assert isinstance(restored, LogisticModel) and restored.config.recent_weeks == 3
    for name, value in named_weights(model).items():
        np.testing.assert_array_equal(named_weights(restored)[name], value, err_msg=name)

    normalizer = Normalizer.from_contract(spec)
    save_trained(
        tmp_path / "folder", model, name="logistic", task="multitask", spec=spec,
        normalizer=normalizer,
    )  # fmt: skip
    loaded, _, card = load_trained(tmp_path / "folder", spec)
    assert card.model == "logistic" and card.config["recent_weeks"] == 3
    dynamic, mask = torch.rand(4, spec.weeks, n_dyn), torch.ones(4, spec.weeks)
    static = torch.rand(4, n_static)
    with torch.no_grad():
        a, b = model.eval()(dynamic, mask, static), loaded.eval()(dynamic, mask, static)
    for head in a:
        torch.testing.assert_close(b[head], a[head], rtol=0, atol=0)


def test_a_trained_model_is_calibrated_and_scores_an_export_part_way_through_the_term(
    consortium_dir: Path, tmp_path: Path
) -> None:
    spec = default_spec()
    train = CohortArrays.concatenate(
        [load_cohort(consortium_dir / f"institution_0{k}", spec) for k in (1, 2)]
    )
    normalizer = Normalizer.from_contract(spec)
    set_seed(0)
    model = build_model("logistic", spec.weeks, train.n_dynamic, train.n_static)
    fit(model, normalizer.transform(train), None, "risk", FitConfig(max_epochs=15, seed=0))
    folder = tmp_path / "model"
    save_trained(folder, model, name="logistic", task="risk", spec=spec, normalizer=normalizer)
    held_out = consortium_dir / "institution_03"
    report = calibrate_model_dir(folder, held_out, spec, seed=0)
    assert report.calibrated is not None

    scorer = load_scoring_model(folder, spec)
    assert scorer.calibrator is not None
    term = load_observed_term(held_out, spec, observed_weeks=6)
    scores = score_cohort(scorer, term.cohort, term.observed_weeks)
    assert len(scores) == len(term.cohort) > 0
    assert ((scores.probability >= 0) & (scores.probability <= 1)).all()
    assert np.isnan(scores.grade).all()  # no grade head
    labels = term.cohort.at_risk
    known = ~np.isnan(labels)
    # Better than chance at week 6 on an institution it never saw.
    assert roc_auc_score(labels[known], scores.raw_probability[known]) > 0.6
