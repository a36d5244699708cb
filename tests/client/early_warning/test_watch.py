"""`edufl client watch`: re-scoring on a changed export or a due schedule, with real files."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from client.early_warning.report import CSV_NAME, HTML_NAME
from client.early_warning.store import Store
from client.early_warning.watch import (
    CHANGES_CSV,
    LATEST,
    WatchConfig,
    WatchError,
    check,
    latest_report,
    parse_duration,
    tier_changes,
    watch,
)
from shared_models.data.cohort import CohortArrays
from shared_models.data.contract import default_spec
from simulations.cli import app
from simulations.scoring_figures import train_risk_model

SPEC = default_spec()


@pytest.fixture(scope="module")
def model_dir(consortium_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shared_models.data.loader import load_cohort

    train = CohortArrays.concatenate(
        [load_cohort(consortium_dir / f"institution_0{k}", SPEC) for k in (1, 2)]
    )
    return train_risk_model(train, SPEC, tmp_path_factory.mktemp("model"), max_epochs=6)


@pytest.fixture
def export(consortium_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(consortium_dir / "institution_03", dst)
    return dst


def _config(export: Path, model_dir: Path, tmp_path: Path, **kw: object) -> WatchConfig:
    return WatchConfig(
        data_dir=export,
        reports_dir=tmp_path / "reports",
        db_path=tmp_path / "client.sqlite",
        model=model_dir,
        **kw,  # type: ignore[arg-type]
    )


def _report_folders(reports: Path) -> list[str]:
    return sorted(p.name for p in reports.iterdir() if p.is_dir() and not p.name.startswith("."))


def _store_runs(db: Path) -> int:
    with Store(db) as store:
        return len(store.runs())


def _disengage_half(export: Path) -> None:
    """Half the students stop attending and submitting from week 6: risk should rise."""
    activity = pd.read_csv(export / "activity.csv")
    ids = sorted(activity["student_id"].unique())[::2]
    late = activity["student_id"].isin(ids) & (activity["week"] >= 6)
    for column in ("attendance_rate", "quiz_submitted", "quiz_score", "lms_logins"):
        activity.loc[late, column] = 0
    activity.to_csv(export / "activity.csv", index=False, lineterminator="\n")


def test_unchanged_export_is_not_rescored(export: Path, model_dir: Path, tmp_path: Path) -> None:
    config = _config(export, model_dir, tmp_path)
    first = check(config, now=1000.0)
    assert first.outcome == "scored" and first.reason == "first scoring"
    assert first.report_dir is not None
    assert {p.name for p in first.report_dir.iterdir()} == {HTML_NAME, CSV_NAME, CHANGES_CSV}
    assert latest_report(config.reports_dir) == first.report_dir

    again = check(config, now=1000.0 + 3600)  # an hour later, nothing touched
    assert again.outcome == "unchanged" and again.report_dir == first.report_dir
    assert _report_folders(config.reports_dir) == [first.report_dir.name]
    assert _store_runs(config.db_path) == 1

    # Rewriting the same bytes (a nightly export job) changes mtimes, not digests.
    for f in export.iterdir():
        f.write_bytes(f.read_bytes())
    assert check(config, now=1000.0 + 7200).outcome == "unchanged"
    assert _store_runs(config.db_path) == 1


def test_changed_export_gives_a_new_report_with_students_moved_up_first(
    export: Path, model_dir: Path, tmp_path: Path
) -> None:
    config = _config(export, model_dir, tmp_path)
    first = check(config, now=1000.0)
    assert first.report_dir is not None
    _disengage_half(export)
    second = check(config, now=2000.0)
    assert second.outcome == "scored" and "activity.csv" in second.reason
    assert second.report_dir is not None and second.report_dir != first.report_dir
    assert first.report_dir.is_dir()  # the previous report is kept
    assert latest_report(config.reports_dir) == second.report_dir
    assert (config.reports_dir / LATEST).read_text().strip() == second.report_dir.name
    assert _store_runs(config.db_path) == 2

    # changes.csv agrees with the two reports' own student lists, movers up first.
    changes = pd.read_csv(second.report_dir / CHANGES_CSV, dtype={"student_id": str})
    before = pd.read_csv(first.report_dir / CSV_NAME, dtype={"student_id": str})
    after = pd.read_csv(second.report_dir / CSV_NAME, dtype={"student_id": str})
    rank = {"low": 0, "moderate": 1, "high": 2}
    merged = after.merge(before, on="student_id", suffixes=("", "_before"))
    moved_up = merged[merged["tier"].map(rank) > merged["tier_before"].map(rank)]
    assert len(moved_up) > 0, "disengaging half the cohort moved nobody up a tier"
    assert set(changes.loc[changes["change"] == "up", "student_id"]) == set(moved_up["student_id"])
    order = changes["change"].map({"up": 0, "new": 1, "down": 2, "left": 3})
    assert order.is_monotonic_increasing and changes["change"].iloc[0] == "up"
    up = changes[changes["change"] == "up"]
    jump = up["tier"].map(rank) - up["previous_tier"].map(rank)
    assert jump.is_monotonic_decreasing

    html = (second.report_dir / HTML_NAME).read_text("utf-8")
    assert 'id="changes"' in html and f"Since report {first.report_dir.name}" in html
    first_row = html.split('id="changes-table"', 1)[1].split("<tr data-change=", 1)[1]
    assert first_row.startswith('"up"') and changes["student_id"].iloc[0] in first_row
    first_html = (first.report_dir / HTML_NAME).read_text("utf-8")
    assert "The first report of this watch" in first_html


def test_corrupt_export_is_a_clear_error_and_the_previous_report_stays(
    export: Path, model_dir: Path, tmp_path: Path
) -> None:
    config = _config(export, model_dir, tmp_path)
    first = check(config, now=1000.0)
    assert first.report_dir is not None
    original = (export / "activity.csv").read_bytes()
    (export / "activity.csv").write_bytes(b"\x00\xff garbage, not a table\n\x00")

    failed = check(config, now=2000.0)
    assert failed.outcome == "failed" and failed.error is not None
    assert "activity.csv" in failed.error and str(first.report_dir) in failed.error
    assert latest_report(config.reports_dir) == first.report_dir
    assert _report_folders(config.reports_dir) == [first.report_dir.name]
    assert _store_runs(config.db_path) == 1
    # The same broken export is not retried on every check...
    still = check(config, now=2060.0)
    assert still.outcome == "unchanged" and still.error == failed.error
    # ...but a fixed one is.
    (export / "activity.csv").write_bytes(original)
    fixed = check(config, now=2120.0)
    assert fixed.outcome == "scored" and _store_runs(config.db_path) == 2


def test_schedule_rescores_an_unchanged_export_when_due(
    export: Path, model_dir: Path, tmp_path: Path
) -> None:
    config = _config(export, model_dir, tmp_path, every=0.05, poll=0.01)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    results = watch(config, max_runs=2, sleep=sleep)
    scored = [r for r in results if r.outcome == "scored"]
    assert len(scored) == 2 and scored[1].reason.startswith("scheduled")
    assert all(0 <= s <= 0.01 for s in slept)
    assert len(_report_folders(config.reports_dir)) == 2
    assert scored[1].changes is not None and scored[1].changes.empty  # same data, same tiers


def test_cli_once_scores_then_skips_then_fails_on_a_corrupt_export(
    export: Path, model_dir: Path, tmp_path: Path
) -> None:
    reports, db = tmp_path / "reports", tmp_path / "client.sqlite"
    args = ["client", "watch", "--data", str(export), "--reports", str(reports)]
    args += ["--model", str(model_dir), "--db", str(db), "--once"]
    runner = CliRunner()
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "re-scored (first scoring)" in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "no re-scoring: export and model unchanged" in second.output
    (export / "students.csv").write_text("student_id\n", "utf-8")
    third = runner.invoke(app, args)
    assert third.exit_code == 2
    assert (
        "error: re-scoring" in third.output and "previous report stays the latest" in third.output
    )
    assert len(_report_folders(reports)) == 1


def test_tier_changes_orders_up_new_down_left() -> None:
    before = pd.DataFrame(
        {
            "student_id": ["a", "b", "c", "d", "e"],
            "term": "t",
            "tier": ["low", "low", "high", "moderate", "low"],
            "probability": [0.1, 0.2, 0.8, 0.5, 0.1],
        }
    )
    after = pd.DataFrame(
        {
            "student_id": ["a", "b", "c", "d", "f"],
            "term": "t",
            "tier": ["moderate", "high", "moderate", "moderate", "high"],
            "probability": [0.5, 0.9, 0.6, 0.55, 0.75],
        }
    )
    changes = tier_changes(before, after)
    assert changes[["student_id", "change"]].values.tolist() == [
        ["b", "up"],  # two tiers up before one
        ["a", "up"],
        ["f", "new"],
        ["c", "down"],
        ["e", "left"],
    ]
    assert np.isnan(changes.loc[changes["student_id"] == "f", "previous_probability"]).all()
    assert len(tier_changes(None, after)) == len(after)


@pytest.mark.parametrize(("text", "seconds"), [("7d", 604800), ("90", 90), ("1.5h", 5400)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "weekly", "-1d", "3y"])
def test_bad_durations_say_what_is_accepted(text: str) -> None:
    with pytest.raises(WatchError, match="unit s, m, h, d or w"):
        parse_duration(text)


def test_no_adopted_model_says_how_to_get_one_and_waits_a_poll(
    export: Path, tmp_path: Path
) -> None:
    config = WatchConfig(
        data_dir=export,
        reports_dir=tmp_path / "reports",
        db_path=tmp_path / "client.sqlite",
        home=tmp_path / "empty-home",
        poll=30.0,
    )
    slept: list[float] = []
    results = watch(config, max_runs=2, sleep=slept.append)
    assert [r.outcome for r in results] == ["failed", "failed"]
    assert results[0].error is not None and "edufl client adopt" in results[0].error
    assert slept == [30.0]  # not a busy loop
    assert latest_report(config.reports_dir) is None
