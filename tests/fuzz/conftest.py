"""Small valid files of every kind a user hands edufl, for the fuzz tests to damage.

Everything here is built once per session in a temporary folder and treated as read-only: a
test copies what it damages. At the end of the session the tally of hostile inputs tried is
printed (and written as JSON to ``$EDUFL_FUZZ_REPORT`` when set, for scripts/fuzz_report.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared_models.data.cohort import Normalizer
from shared_models.data.contract import default_spec
from shared_models.models.artifact import save_trained
from shared_models.models.registry import build_model
from tests.fuzz import harness

SPEC = default_spec()
INSTITUTIONS = ("uni_a", "uni_b")


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One institution's export: 20 students, 15 weeks, CSV (about 15 kB)."""
    from simulations.synthetic import write_consortium

    root = tmp_path_factory.mktemp("fuzz-consortium")
    (folder,) = write_consortium(root, institutions=1, students=20, seed=3)
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained at-risk LSTM saved as edufl saves a trained one (model.pt + model.json)."""
    torch.manual_seed(0)
    model = build_model(
        "lstm",
        SPEC.weeks,
        len(SPEC.dynamic),
        len(SPEC.static_names),
        {"hidden_size": 8, "targets": ["risk"]},
    )
    n_static = len(SPEC.static_names)
    normalizer = Normalizer(
        SPEC.target.grade_min,
        SPEC.target.grade_max,
        dyn_mean=np.zeros(len(SPEC.dynamic)),
        dyn_std=np.ones(len(SPEC.dynamic)),
        static_mean=np.zeros(n_static),
        static_std=np.ones(n_static),
    )
    out = tmp_path_factory.mktemp("fuzz-model")
    save_trained(out, model, name="lstm", task="risk", spec=SPEC, normalizer=normalizer)
    return out


@pytest.fixture(scope="session")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from privacy.keys import init_institution_keys

    keys = tmp_path_factory.mktemp("fuzz-keys")
    for name in INSTITUTIONS:
        init_institution_keys(keys, name)
    return keys


def ledger_fields(server_round: int) -> dict[str, Any]:
    return {
        "node": "17",
        "run_id": "run-1",
        "round": server_round,
        "private": True,
        "accountant": "rdp",
        "noise_multiplier": 1.1,
        "sample_rate": 0.125,
        "steps": 8,
        "max_grad_norm": 1.0,
        "delta": 1e-5,
        "n_students": 640,
        # What dp-accounting's RDP gives for 8 and 16 such steps, so the ledger audits clean.
        "epsilon_after": {1: 3.152, 2: 3.915}[server_round],
        "epsilon_budget": 8.0,
    }


@pytest.fixture(scope="session")
def ledger_path(keys_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A consortium ledger: two institutions, two rounds each, signed and chained."""
    from privacy.ledger.consortium import ConsortiumLedger
    from privacy.ledger.institution import InstitutionLedger

    root = tmp_path_factory.mktemp("fuzz-ledger")
    own = {n: InstitutionLedger(root / n, n, keys_dir / n) for n in INSTITUTIONS}
    consortium = ConsortiumLedger(root / "ledger.jsonl")
    for server_round in (1, 2):
        for ledger in own.values():
            entry = ledger.sign_next(ledger_fields(server_round))
            ledger.append(entry)
            assert consortium.receive(entry)
    return consortium.path


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and lose a lot when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    rows = harness.summary_rows()
    if not rows:
        return
    terminalreporter.section("hostile inputs tried (tests/fuzz)")
    terminalreporter.write_line(harness.render_table(rows))
    target = os.environ.get("EDUFL_FUZZ_REPORT")
    if target:
        Path(target).write_text(json.dumps(rows, indent=2), "utf-8")
