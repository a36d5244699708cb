"""The RDP accountant's stored per-step curves: the same epsilon as Opacus, and a cache only."""

from __future__ import annotations

import json
import os
import random

import pytest

from privacy import accountant_store
from privacy.accountant_store import (
    CURVES_FILE,
    AccountantState,
    AccountantStore,
    compute_epsilon,
    load_curves,
    make_accountant,
    rdp_epsilon,
)


def _fresh(history, delta):
    return float(make_accountant("rdp", history).get_epsilon(delta))


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_rdp_epsilon_equals_a_fresh_opacus_accountant_bit_for_bit():
    rng = random.Random(7)
    for _ in range(40):
        history = [
            (rng.choice([0.6, 1.1, 2.5, 15.0]), rng.choice([0.02, 0.1, 1.0]), rng.randint(1, 400))
            for _ in range(rng.randint(1, 4))
        ]
        delta = rng.choice([1e-5, 1e-6])
        assert rdp_epsilon(history, delta) == _fresh(history, delta)


def test_rounds_read_back_the_stored_curves_and_give_the_same_epsilon(tmp_path, monkeypatch):
    store = AccountantStore(tmp_path)
    history = [(3.0, 1.0, 1), (1.1, 0.05, 60)]
    state = AccountantState(
        institution="uni", accountant="rdp", delta=1e-5, epsilon_budget=8.0, history=history
    )
    store.save(state)
    saved = json.loads((tmp_path / CURVES_FILE).read_text())
    assert set(saved["curves"]) == {"3.0|1.0", "1.1|0.05"}
    assert os.stat(tmp_path / CURVES_FILE).st_mode & 0o777 == 0o600

    next_round = [(3.0, 1.0, 1), (1.1, 0.05, 120)]
    expected = _fresh(next_round, 1e-5)
    # A new message's process: no curve in memory, and none may be computed again.
    monkeypatch.setattr(accountant_store, "_curves", {})
    accountant_store._epsilon.cache_clear()
    store.load()
    monkeypatch.setattr(
        accountant_store.rdp_analysis,
        "compute_rdp",
        lambda **_: pytest.fail("a stored curve was computed again"),
    )
    assert compute_epsilon("rdp", next_round, 1e-5) == expected
    accountant_store._epsilon.cache_clear()


def test_a_damaged_or_foreign_curves_file_is_ignored_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setattr(accountant_store, "_curves", {})
    (tmp_path / CURVES_FILE).write_text("{not json")
    assert load_curves(tmp_path) == 0
    n = len(accountant_store.RDP_ORDERS)
    bad = {"1.1|0.05": [-1.0] * n, "2.0|0.1": [float("nan")] * n, "3.0|1.0": [0.1] * (n - 1)}
    (tmp_path / CURVES_FILE).write_text(
        json.dumps({"orders": list(accountant_store.RDP_ORDERS), "curves": bad})
    )
    assert load_curves(tmp_path) == 0
    foreign = {"orders": [2.0, 3.0], "curves": {"1.1|0.05": [0.1, 0.2]}}
    (tmp_path / CURVES_FILE).write_text(json.dumps(foreign))
    assert load_curves(tmp_path) == 0
    assert accountant_store._curves == {}
