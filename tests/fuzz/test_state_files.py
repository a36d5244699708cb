"""Hostile state files edufl keeps for a user: accountant state, institution registry, store.

None of them may be silently reset: a damaged accountant state would forget spent privacy
budget, a damaged registry would forget who is enrolled, a damaged store would lose advisors'
records. Each is refused with the file named, and a command that refuses leaves it untouched.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.early_warning.reasons import Reason
from client.early_warning.rules import Recommendation
from client.early_warning.scoring import RiskThresholds, Scores, assign_tiers
from client.early_warning.store import RunInfo, Store
from privacy.accountant_store import AccountantState, AccountantStore, compute_epsilon
from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from privacy.keys import load_node_public_key, public_key_line
from server.institutions import REGISTRY_FILE, Registry, load_registry, save_registry
from tests.fuzz.conftest import INSTITUTIONS
from tests.fuzz.harness import assert_unchanged, call, cli, digests, fuzz
from tests.fuzz.mutations import byte_damage, hostile_toml, wrong_document

BUDGET = PrivacyBudget(epsilon=8.0, delta=1e-3, max_grad_norm=1.0, accountant="rdp")
PLAN = DPPlan(n_students=64, sample_rate=0.125, steps_per_round=8, planned_rounds=3)

# --- accountant state -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dir(keys_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An institution's state folder after one DP round (accountant.json)."""
    folder = tmp_path_factory.mktemp("fuzz-state")
    history = [(1.2, PLAN.sample_rate, PLAN.steps_per_round)]
    state = AccountantState(
        institution=INSTITUTIONS[0],
        accountant="rdp",
        delta=BUDGET.delta,
        epsilon_budget=BUDGET.epsilon,
        noise_multiplier=1.2,
        plan=PLAN,
        history=history,
        rounds_done=1,
        epsilon_spent=compute_epsilon("rdp", history, BUDGET.delta),
    )
    AccountantStore(folder).save(state)
    return folder


@fuzz(60)
@given(data=st.data())
def test_a_damaged_accountant_state_is_refused_never_reset(
    state_dir: Path, keys_dir: Path, data: st.DataObject
) -> None:
    valid = (state_dir / "accountant.json").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(state_dir, Path(tmp) / "state"))
        path = folder / "accountant.json"
        if data.draw(st.booleans(), label="as bytes"):
            path.write_bytes(data.draw(byte_damage(valid), label="bytes"))
        else:
            wrong = data.draw(wrong_document(json.loads(valid)), label="document")
            path.write_text(json.dumps(wrong, default=str), "utf-8")
        before = digests(path)
        kind = "accountant state JSON"
        state = call(kind, lambda: AccountantStore(folder).load(), names=[str(path)])
        if isinstance(state, AccountantState):  # loaded: a node must be able to open it
            key = keys_dir / INSTITUTIONS[0]
            call(
                kind,
                lambda: DPSession.open(folder, BUDGET, PLAN, institution="uni_a", signing_key=key),
                names=[str(path), "uni_a", "delta"],
                count=False,
            )
        else:
            assert_unchanged(kind, before, path)


# --- institution registry ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_state(keys_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz-server-state")
    line = public_key_line(load_node_public_key(keys_dir / f"{INSTITUTIONS[0]}.pub"))
    registry = Registry().with_institution(INSTITUTIONS[0], line)
    save_registry(folder, registry)
    return folder


@fuzz(60)
@given(data=st.data())
def test_a_damaged_registry_is_refused_and_enrolment_leaves_it_untouched(
    server_state: Path, keys_dir: Path, data: st.DataObject
) -> None:
    valid = (server_state / REGISTRY_FILE).read_bytes()
    doc = tomllib.loads(valid.decode())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(server_state, Path(tmp) / "state"))
        path = folder / REGISTRY_FILE
        path.write_bytes(data.draw(hostile_toml(valid, doc), label="registry"))
        before = digests(path)
        kind = "institution registry TOML"
        if data.draw(st.booleans(), label="through the CLI"):
            pub = keys_dir / f"{INSTITUTIONS[1]}.pub"
            args = ["server", "enrol", str(pub), "--name", INSTITUTIONS[1], "--state", str(folder)]
            result = cli(kind, args, names=[str(path)])
            if result.exit_code != 0:
                assert_unchanged(kind, before, path)
        else:
            call(kind, lambda: load_registry(folder), names=[str(path)])


# --- the local SQLite store -------------------------------------------------------------------


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding one scoring run of three students and one advisor action."""
    db = tmp_path_factory.mktemp("fuzz-store") / "client.sqlite"
    p = np.array([0.1, 0.55, 0.9], np.float32)
    scores = Scores(
        student_ids=np.array(["s000", "s001", "s002"], dtype=object),
        terms=np.full(3, "2025-autumn", dtype=object),
        probability=p,
        grade=np.full(3, np.nan, np.float32),
        tier=assign_tiers(p),
        observed_weeks=6,
        thresholds=RiskThresholds(),
    )
    reasons = [[Reason("attendance_rate", "last4", 0.1, "Attendance fell")]] * 3
    recs = [[Recommendation("meet", 1, "advisor", "Meet", "")]] * 3
    with Store(db) as store:
        store.save_run(RunInfo("export", "model", "lstm", "default rules"), scores, reasons, recs)
        store.record_action("s002", "contacted", note="left a voicemail")
    return db


@fuzz(60)
@given(command=st.sampled_from(("list", "record")), data=st.data())
def test_a_damaged_store_is_refused_and_left_as_it_was(
    store_path: Path, command: str, data: st.DataObject
) -> None:
    valid = store_path.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "client.sqlite"
        db.write_bytes(data.draw(byte_damage(valid), label="database"))
        before = digests(Path(tmp))
        if command == "list":
            args = ["client", "actions", "list", "--db", str(db)]
        else:
            args = ["client", "actions", "record", "s001", "--action", "referred", "--db", str(db)]
        result = cli("SQLite store", args, names=[str(db)])
        if result.exit_code != 0:
            assert_unchanged("SQLite store", before, Path(tmp))


def test_another_programs_database_is_refused_not_extended(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "other.sqlite"
    with sqlite3.connect(db) as other:
        other.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    before = digests(db)
    cli("SQLite store", ["client", "actions", "list", "--db", str(db)], names=[str(db)], codes=(2,))
    assert_unchanged("SQLite store", before, db)
