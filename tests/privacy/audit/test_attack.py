"""Membership inference sees much less of a DP-trained model than of a memorising one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from torch import nn

from privacy.audit.attack import membership_inference
from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from shared_models.data.cohort import ModelInputs
from shared_models.training import make_loader, make_optimizer, set_seed, train_one_epoch
from tests.privacy.conftest import random_inputs, tiny_model

N, EPOCHS, BATCH, LR = 128, 60, 16, 0.02


def _train(members: ModelInputs, state_dir: Path | None) -> nn.Module:
    """Same data, architecture, seed and schedule; DP-SGD at epsilon 1 when ``state_dir``."""
    set_seed(0)
    model = tiny_model(hidden=16)
    optimizer = make_optimizer(model, LR)
    loader = make_loader(members, BATCH, shuffle=True)
    if state_dir is not None:
        budget = PrivacyBudget(epsilon=1.0, delta=1e-3)
        plan = DPPlan.for_training(len(members), BATCH, EPOCHS, planned_rounds=1)
        session = DPSession.open(state_dir, budget, plan, institution="uni_a")
        model, optimizer, loader = session.make_private(model, optimizer, loader)
    for _ in range(EPOCHS):
        train_one_epoch(model, loader, optimizer, "risk")
    return model


def test_dp_training_leaves_a_much_smaller_membership_advantage(tmp_path: Path) -> None:
    members, non_members = random_inputs(N, seed=1), random_inputs(N, seed=2)

    plain = membership_inference(_train(members, None), members, non_members, delta=1e-3)
    private = membership_inference(
        _train(members, tmp_path), members, non_members, delta=1e-3, claimed_epsilon=1.0
    )

    assert plain.advantage > 0.4 and plain.auc > 0.7  # random labels: it memorised them
    assert private.advantage < plain.advantage - 0.25
    assert private.advantage <= private.advantage_bound  # type: ignore[operator]
    assert plain.epsilon_lower_bound > 1.0 >= private.epsilon_lower_bound


def test_an_untrained_model_shows_no_leak() -> None:
    set_seed(0)
    model = tiny_model()
    members, non_members = random_inputs(N, seed=1), random_inputs(N, seed=2)

    result = membership_inference(model, members, non_members, delta=1e-3)

    assert abs(result.auc - 0.5) < 0.12
    assert result.epsilon_lower_bound == 0.0
    assert result.advantage_bound is None


def test_advantage_bound_follows_the_claimed_epsilon() -> None:
    set_seed(0)
    members, non_members = random_inputs(8, seed=1), random_inputs(8, seed=2)

    result = membership_inference(
        tiny_model(), members, non_members, delta=0.0, claimed_epsilon=1.0
    )

    assert result.advantage_bound == pytest.approx((math.e - 1) / (math.e + 1))
