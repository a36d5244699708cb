"""The UCI dropout export, in its public shape, onboarded with a mapping file and no code.

tests/fixtures/uci_dropout holds a made-up export of that shape (one ``;``-separated file with a
byte-order mark, one row per student, per-semester columns, attributes and "Target"), a
mapping.toml and a contract with ``period = "semester"``.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from client.early_warning.indicators import compute_indicators, vocabulary
from shared_models.data.contract import load_spec
from shared_models.data.loader import load_cohort
from simulations.cli import app
from simulations.scoring_figures import train_risk_model

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "uci_dropout"
SPEC_PATH = FIXTURE / "spec.toml"
SPEC = load_spec(SPEC_PATH)


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE, tmp_path / "uci", ignore=shutil.ignore_patterns("*.py")))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model for the contract (as the federation would deliver), trained briefly here."""
    cohort = load_cohort(FIXTURE, SPEC)
    return train_risk_model(cohort, SPEC, tmp_path_factory.mktemp("model"), max_epochs=3)


def _targets() -> list[str]:
    with (FIXTURE / "data.csv").open(encoding="utf-8-sig", newline="") as fh:
        return [row["Target"] for row in csv.DictReader(fh, delimiter=";")]


def test_the_public_shape_has_a_bom_semicolons_and_per_semester_columns() -> None:
    raw = (FIXTURE / "data.csv").read_bytes()
    header = raw.splitlines()[0].decode("utf-8-sig")
    assert raw.startswith(b"\xef\xbb\xbf") and ";" in header
    assert "Curricular units 1st sem (approved)" in header.split(";")
    assert "Daytime/evening attendance\t" in header.split(";")  # the tab of the public file


def test_validate_accepts_the_export_with_only_its_mapping(export: Path) -> None:
    result = CliRunner().invoke(app, ["client", "validate", str(export), "--spec", str(SPEC_PATH)])
    assert result.exit_code == 0, result.output
    assert "USABLE" in result.output and "0 error(s)" in result.output
    assert "80 students" in result.output


def test_the_reshaped_cohort_holds_both_semesters_and_the_dropout_label() -> None:
    cohort = load_cohort(FIXTURE, SPEC)
    targets = _targets()
    assert len(cohort) == len(targets)
    assert cohort.dynamic.shape[1:] == (2, len(SPEC.dynamic))
    assert cohort.week_mask.all()
    expected = np.array([t == "Dropout" for t in targets], dtype=np.float32)
    assert np.array_equal(cohort.at_risk, expected)
    # Row 1's second-semester approved units, read from the file itself.
    with (FIXTURE / "data.csv").open(encoding="utf-8-sig", newline="") as fh:
        first = next(csv.DictReader(fh, delimiter=";"))
    j = cohort.dynamic_names.index("units_approved")
    row = list(cohort.student_ids).index("uci-1")
    assert cohort.dynamic[row, 1, j] == float(first["Curricular units 2nd sem (approved)"])


def test_semester_indicators_compare_the_last_semester_with_the_first() -> None:
    cohort = load_cohort(FIXTURE, SPEC)
    vocab = vocabulary(SPEC)
    assert "units_approved_last1" in vocab and "units_approved_last4" not in vocab
    assert "last semester" in vocab["units_approved_last1"].description
    values = compute_indicators(cohort, 2, recent=SPEC.recent_periods)
    j = cohort.dynamic_names.index("units_approved")
    trend = values["units_approved_trend"]
    assert not np.isnan(trend).any()  # a 4-week window would leave it empty
    assert np.array_equal(trend, cohort.dynamic[:, 1, j] - cohort.dynamic[:, 0, j])


def test_score_runs_with_a_mapping_file_and_no_code(
    export: Path, model_dir: Path, tmp_path: Path
) -> None:
    runner = CliRunner()
    args = ["client", "score", "--data", str(export), "--model", str(model_dir)]
    args += ["--spec", str(SPEC_PATH), "--db", str(tmp_path / "db.sqlite")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "scored 80 students after semester 2" in result.output

    rules = tmp_path / "rules.toml"
    init = ["client", "rules", "init", "--spec", str(SPEC_PATH), "--out", str(rules)]
    assert runner.invoke(app, init).exit_code == 0
    again = runner.invoke(app, [*args, "--rules", str(rules)])
    assert again.exit_code == 0, again.output


def test_the_report_speaks_of_semesters(export: Path, model_dir: Path, tmp_path: Path) -> None:
    args = ["client", "report", "--data", str(export), "--model", str(model_dir)]
    args += ["--spec", str(SPEC_PATH), "--out", str(tmp_path / "report")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "Scored after semester 2 of 2" in page
    assert "/week" not in page


def test_mapping_init_drafts_the_wide_mapping_and_lists_codes(tmp_path: Path) -> None:
    out = tmp_path / "mapping.toml"
    args = ["client", "mapping", "init", str(FIXTURE / "data.csv"), "--spec", str(SPEC_PATH)]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert 'periods = ["1st", "2nd"]' in text
    assert 'units_approved = "Curricular units {period} sem (approved)"' in text
    assert 'final_result = "Target"' in text
    assert "Dropout, Enrolled, Graduate" in text  # the codes of a category column
    assert '# "0" = "?"' in text  # Gender's codes, to be mapped to female/male
    again = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert again.exit_code != 0 and "exists" in again.output
