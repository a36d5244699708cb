"""A malicious server against a real DP node's whole train reply: membership stays within epsilon.

The engine (`privacy.audit.channel`) is checked on known distributions; the attack itself drives
the node's own ClientApp through `simulations.channel_attack` (crafted weights, every value of
the reply, member vs non-member). On the code before the release schema it failed at epsilon 1:
``num-examples`` and the ledger's ``n_students`` told membership every time (advantage 1.00).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from privacy.audit.channel import advantage_bound, channel_attack, reply_values
from simulations.channel_attack import attack_node


def test_bound_is_the_dp_membership_advantage_cap() -> None:
    assert advantage_bound(1.0, 0.0) == pytest.approx((math.e - 1) / (math.e + 1))
    assert advantage_bound(1.0, 1e-5) == pytest.approx(0.46212, abs=1e-4)
    assert advantage_bound(8.0, 1e-5) == pytest.approx(0.99933, abs=1e-4)
    assert advantage_bound(50.0, 0.1) == 1.0


def test_engine_refutes_an_exact_count_and_not_an_independent_value() -> None:
    rng = np.random.default_rng(0)

    def trial(member: bool, i: int) -> dict[str, float]:
        return {"count": 100.0 + member, "noise": float(rng.normal())}

    result = channel_attack(trial, 48, epsilon=1.0, delta=1e-5)

    assert result.best.value == "count"
    assert result.best.advantage == 1.0
    assert result.refuted  # lower bound above 0.462
    noise = next(f for f in result.values if f.value == "noise")
    assert noise.low < result.bound


def test_engine_does_not_refute_a_count_released_at_the_claimed_epsilon() -> None:
    rng = np.random.default_rng(1)
    epsilon = 1.0

    def trial(member: bool, i: int) -> dict[str, float]:  # Laplace mechanism, sensitivity 1
        return {"count": 100.0 + member + float(rng.laplace(scale=1 / epsilon))}

    assert not channel_attack(trial, 200, epsilon=epsilon, delta=1e-5).refuted


def test_reply_values_reads_metrics_ledger_fields_and_the_update_on_each_direction() -> None:
    sent = {"w": np.zeros((2, 2))}
    records = {
        "arrays": {"w": np.array([[1.0, 2.0], [3.0, 4.0]])},
        "metrics": {"num-examples": 7, "hist": [1.5, 2.5]},
        "privacy": {"entry": '{"n_students": 81, "signature": "abc"}', "earlier": "xyz"},
    }
    directions = {"canary": {"w": np.array([[0.0, 1.0], [0.0, 0.0]])}}

    values = reply_values(records, sent, directions)

    assert values["metrics/num-examples"] == 7.0
    assert values["metrics/hist[1]"] == 2.5
    assert values["privacy/entry.n_students"] == 81.0
    assert values["len(privacy/entry.signature)"] == 3.0
    assert values["len(privacy/earlier)"] == 3.0
    assert values["update/canary"] == 2.0
    assert values["update/l2-norm"] == pytest.approx(math.sqrt(30))


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_no_value_of_a_dp_train_reply_tells_membership_beyond_epsilon(
    tmp_path: Path, epsilon: float
) -> None:
    # 48 trials: 16 members and 16 non-members test the rule chosen on the other 16; an exact
    # value (advantage 1) then has a 95 % lower bound of 0.59, above epsilon 1's 0.462. At
    # epsilon 8 the cap (0.9993) is beyond what a few dozen trials can show.
    result = attack_node(tmp_path, trials=48, epsilon=epsilon, delta=1e-5, students=60, seed=0)

    leaks = [f"{f.value}: {f.advantage:.2f} (>= {f.low:.2f})" for f in result.values[:5]]
    assert result.best.low <= result.bound, leaks
    assert all(f.low <= result.bound for f in result.values), leaks
