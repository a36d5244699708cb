from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from client.early_warning.reasons import Reason
from client.early_warning.rules import Recommendation
from client.early_warning.scoring import RiskThresholds, Scores, assign_tiers
from client.early_warning.store import SCHEMA_VERSION, RunInfo, Store, StoreError
from simulations.cli import app

INFO = RunInfo("exports/uni-a", "models/global-v3", "lstm", "default rules")


def _scores(probability: list[float], ids: list[str] | None = None) -> Scores:
    p = np.array(probability, np.float32)
    return Scores(
        student_ids=np.array(ids or [f"s{i:03d}" for i in range(len(p))], dtype=object),
        terms=np.full(len(p), "2025-autumn", dtype=object),
        probability=p,
        grade=np.full(len(p), np.nan, np.float32),
        tier=assign_tiers(p),
        observed_weeks=6,
        thresholds=RiskThresholds(),
    )


def _reasons(n: int) -> list[list[Reason]]:
    return [[Reason("attendance_rate", "last4", 0.12, "Attendance over the last 4 weeks")]] * n


def _recs(n: int) -> list[list[Recommendation]]:
    return [[Recommendation("meet", 1, "advisor", "Meet", "Attendance 40%")]] * n


def _save(store: Store, probability: list[float]) -> int:
    n = len(probability)
    return store.save_run(INFO, _scores(probability), _reasons(n), _recs(n), unscored=2)


def test_recorded_actions_survive_closing_and_reopening_the_store(tmp_path: Path) -> None:
    db = tmp_path / "client.sqlite"
    with Store(db) as store:
        run_id = _save(store, [0.1, 0.55, 0.9])
        store.record_action("s002", "contacted", note="left a voicemail")
        store.record_action("s001", "dismissed-incorrect", note="on approved leave")

    with Store(db) as reopened:  # a new connection, as after a restart
        actions = reopened.actions()
        assert [(a.student_id, a.action) for a in actions] == [
            ("s002", "contacted"),
            ("s001", "dismissed-incorrect"),
        ]
        first = actions[0]
        assert first.note == "left a voicemail" and first.run_id == run_id
        assert first.tier == "high" and first.probability == pytest.approx(0.9)
        assert first.recorded_at.endswith("+00:00")
        assert [a.action for a in reopened.actions("s001")] == ["dismissed-incorrect"]


def test_a_run_is_stored_whole_with_scores_reasons_and_recommendations(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        run_id = _save(store, [0.1, 0.5, 0.8])
        (run,) = store.runs()
    assert run["run_id"] == run_id and run["n_scored"] == 3 and run["n_unscored"] == 2
    assert run["observed_weeks"] == 6 and run["threshold_high"] == pytest.approx(0.7)
    db = sqlite3.connect(tmp_path / "s.sqlite")
    tiers = db.execute("SELECT tier FROM scores ORDER BY student_id").fetchall()
    assert [t for (t,) in tiers] == ["low", "moderate", "high"]
    assert db.execute("SELECT COUNT(*) FROM reasons").fetchone() == (3,)
    assert db.execute("SELECT COUNT(*) FROM recommendations").fetchone() == (3,)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


def test_a_failed_write_leaves_no_half_written_run(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    duplicate = [[Recommendation("meet", 1, "advisor", "Meet", "")] * 2] * 2  # same key twice
    with Store(db) as store:
        with pytest.raises(sqlite3.IntegrityError):
            store.save_run(INFO, _scores([0.2, 0.9]), _reasons(2), duplicate)
        assert store.runs() == []
    counts = sqlite3.connect(db).execute(
        "SELECT (SELECT COUNT(*) FROM scores) + (SELECT COUNT(*) FROM reasons)"
    )
    assert counts.fetchone() == (0,)


def test_an_action_attaches_to_the_students_latest_run(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        _save(store, [0.9, 0.2])
        second = _save(store, [0.3, 0.2])
        record = store.record_action("s000", "referred")
    assert record.run_id == second and record.tier == "low"


def test_unknown_students_and_actions_are_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        _save(store, [0.5])
        with pytest.raises(StoreError, match="no scoring run has scored student 'typo'"):
            store.record_action("typo", "contacted")
        with pytest.raises(StoreError, match="unknown action 'called'"):
            store.record_action("s000", "called")
        assert store.actions() == []


def test_a_store_from_a_newer_edufl_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    Store(db).close()
    raw = sqlite3.connect(db)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(StoreError, match="newer edufl"):
        Store(db)


def test_a_file_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "notes.sqlite"
    junk.write_text("not a database at all, just some text " * 40)
    with pytest.raises(StoreError, match="not an edufl store"):
        Store(junk)


def test_actions_commands_record_and_list_across_invocations(tmp_path: Path) -> None:
    db = tmp_path / "client.sqlite"
    with Store(db) as store:
        _save(store, [0.95, 0.1])
    runner = CliRunner()
    record = ["client", "actions", "record", "s000", "--action", "contacted", "--db", str(db)]
    result = runner.invoke(app, [*record, "--note", "met on Tuesday"])
    assert result.exit_code == 0, result.output
    assert "s000 contacted (was high" in result.output

    listed = runner.invoke(app, ["client", "actions", "list", "--db", str(db)])
    assert listed.exit_code == 0
    assert "s000" in listed.output and "met on Tuesday" in listed.output

    bad = runner.invoke(app, [*record[:3], "s999", *record[4:]])
    assert bad.exit_code == 2 and "no scoring run has scored student 's999'" in bad.output


def test_actions_commands_refuse_a_store_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "elsewhere.sqlite"
    result = CliRunner().invoke(app, ["client", "actions", "list", "--db", str(missing)])
    assert result.exit_code == 2 and "no store here" in result.output
    assert not missing.exists()
