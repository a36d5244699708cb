"""The one budget type, its defaults, and the policy a node applies to the server's proposal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from privacy.budget import (
    DEFAULT_DELTA,
    DEFAULT_EPSILON,
    PrivacyBudget,
    PrivacyConfigError,
    node_budget,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_defaults_are_the_budgets_own() -> None:
    assert PrivacyBudget() == PrivacyBudget(epsilon=DEFAULT_EPSILON, delta=DEFAULT_DELTA)
    assert (DEFAULT_EPSILON, DEFAULT_DELTA) == (8.0, 1e-5)


def test_a_budget_is_frozen_and_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match="epsilon_max"):
        PrivacyBudget.model_validate({"epsilon_max": 3})
    with pytest.raises(ValueError):
        PrivacyBudget().epsilon = 1.0  # type: ignore[misc]


def test_a_node_requiring_dp_caps_the_servers_proposal_at_its_own_budget() -> None:
    for proposed, expected in ((20.0, DEFAULT_EPSILON), (3.0, 3.0), (None, DEFAULT_EPSILON)):
        budget = node_budget("required", None, None, proposed_epsilon=proposed, proposed_delta=1e-3)
        assert budget is not None
        assert (budget.epsilon, budget.delta) == (expected, DEFAULT_DELTA)
    own = node_budget("required", 2.0, 1e-6, proposed_epsilon=8.0, proposed_delta=1e-5)
    assert own is not None and (own.epsilon, own.delta) == (2.0, 1e-6)
    smaller = node_budget("required", None, None, proposed_epsilon=None, proposed_delta=1e-7)
    assert smaller is not None and smaller.delta == 1e-7


def test_without_a_mode_of_its_own_the_server_decides_dp_or_not() -> None:
    assert node_budget(None, None, None, proposed_epsilon=None) is None
    assert node_budget("off", 2.0, None, proposed_epsilon=None) is None
    budget = node_budget(
        None, None, None, proposed_epsilon=5.0, proposed_delta=1e-4, accountant="prv"
    )
    assert budget == PrivacyBudget(epsilon=5.0, delta=1e-4, accountant="prv")
    assert node_budget("off", 2.0, None, proposed_epsilon=5.0) == PrivacyBudget(epsilon=2.0)


def test_an_invalid_merged_budget_names_the_value() -> None:
    with pytest.raises(PrivacyConfigError, match="max_grad_norm"):
        node_budget("required", None, None, proposed_epsilon=None, max_grad_norm=-1.0)


def test_importing_the_budget_imports_neither_torch_nor_opacus() -> None:
    code = (
        "import privacy.budget, sys; "
        "print(sorted(m for m in ('torch', 'opacus', 'flwr') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
