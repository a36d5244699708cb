"""The noise calibration's search: never over the budget, within 1 % of it, in few evaluations."""

from __future__ import annotations

import math

import pytest

from privacy.accountant_store import _MIN_NOISE_MULTIPLIER, _search_noise, compute_epsilon


def _bisection(epsilon, target: float) -> float:
    """The search edufl used before: doubling, then halving the bracket."""
    low, high = _MIN_NOISE_MULTIPLIER, 1.0
    while epsilon(high) > target:
        low, high = high, 2 * high
    if epsilon(low) <= target:
        return low
    while high - low > 0.002 * high and epsilon(high) < 0.99 * target:
        mid = (low + high) / 2
        low, high = (low, mid) if epsilon(mid) <= target else (mid, high)
    return high


def _counted(mechanism: str, q: float, steps: int):
    seen: set[float] = set()

    def epsilon(sigma: float) -> float:
        seen.add(sigma)
        # The node's count release (a Gaussian of std 1000, no subsampling) and the training.
        return compute_epsilon(mechanism, [(1000.0, 1.0, 1), (sigma, q, steps)], 1e-5)

    return epsilon, seen


@pytest.mark.parametrize(
    ("mechanism", "q", "steps", "target"),
    [
        ("rdp", 0.24, 60, 8.0),  # an OULAD AAA institution, batch 64, 10 rounds x 2 epochs
        ("rdp", 0.95, 20, 1.0),  # the DP logistic's batch of 256
        ("rdp", 0.05, 2000, 3.0),
        ("rdp", 0.01, 5000, 0.5),
        ("prv", 0.24, 60, 3.0),
    ],
)
def test_the_noise_found_stays_in_budget_within_one_percent_in_fewer_steps(
    mechanism: str, q: float, steps: int, target: float
):
    epsilon, seen = _counted(mechanism, q, steps)
    sigma = _search_noise(epsilon, target)
    spent = epsilon(sigma)
    assert spent <= target
    assert spent >= 0.99 * target or epsilon(sigma * 0.998) > target
    evaluations = len(seen)

    old_epsilon, old_seen = _counted(mechanism, q, steps)
    old = _bisection(old_epsilon, target)
    assert sigma == pytest.approx(old, rel=0.02)
    assert evaluations < len(old_seen)


def test_a_floor_that_already_fits_is_returned_and_infinite_epsilons_are_bisected():
    calls: list[float] = []

    def generous(sigma: float) -> float:
        calls.append(sigma)
        return 0.1 / sigma

    assert _search_noise(generous, 8.0) == _MIN_NOISE_MULTIPLIER

    def steep(sigma: float) -> float:  # infinite below 0.5: no line to draw through the low end
        return math.inf if sigma < 0.5 else 4.0 / sigma**3

    sigma = _search_noise(steep, 2.0)
    assert steep(sigma) <= 2.0
    assert steep(sigma) >= 0.99 * 2.0 or steep(sigma * 0.998) > 2.0


def test_the_search_gives_up_where_no_finite_noise_fits():
    assert _search_noise(lambda sigma: 1.0 + 1.0 / sigma, 1.0) is None


def test_a_budget_the_releases_alone_exceed_is_refused_with_what_to_change():
    from privacy.accountant_store import calibrate_noise
    from privacy.budget import DPPlan, PrivacyBudget, PrivacyConfigError

    plan = DPPlan(
        n_students=270, sample_rate=0.5, steps_per_round=4, planned_rounds=10,
        planned_evaluations=10, histogram_noise_std=1.0,
    )  # fmt: skip
    with pytest.raises(PrivacyConfigError, match="raise epsilon or plan fewer evaluations"):
        calibrate_noise(PrivacyBudget(epsilon=1.0, delta=1e-5), plan)
    # The same releases under a budget they fit: a noise is found, and it fits.
    assert calibrate_noise(PrivacyBudget(epsilon=200.0, delta=1e-5), plan) > 0
