"""Every CLI example in the help texts and the README runs, through typer's CliRunner."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from simulations.cli import app

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), prog_name="edufl")
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["client"],
        ["client", "validate"],
        ["client", "spec"],
        ["client", "spec", "show"],
        ["client", "spec", "init"],
        ["simulate"],
        ["simulate", "synth"],
    ],
)
def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    code, out = _invoke(*command, "--help")
    assert code == 0
    assert "Example" in out
    assert "edufl " in out


def test_synth_then_validate_reports_usable(tmp_path: Path) -> None:
    code, out = _invoke(
        "simulate",
        "synth",
        str(tmp_path),
        "--institutions",
        "2",
        "--students",
        "120",
        "--seed",
        "1",
    )
    assert code == 0, out
    for name in ("institution_01", "institution_02"):
        code, out = _invoke("client", "validate", str(tmp_path / name))
        assert code == 0, out
        assert "=> USABLE" in out and "completeness per feature" in out


def test_validate_refuses_a_damaged_export_with_exit_1(export_copy: Path) -> None:
    with (export_copy / "students.csv").open("a") as fh:
        fh.write("s-new,2025-autumn,female,17-20,stem,full_time,no,not-a-gpa\n")
    code, out = _invoke("client", "validate", str(export_copy))
    assert code == 1
    assert "students.csv line" in out and "column 'prior_gpa'" in out
    assert "=> NOT USABLE" in out


def test_validate_json_output(export_copy: Path) -> None:
    import json

    code, out = _invoke("client", "validate", str(export_copy), "--json")
    assert code == 0
    assert json.loads(out)["usable"] is True


def test_user_errors_are_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "spec.toml"
    bad.write_text("weeks = 'x'\n")
    code, out = _invoke("client", "validate", str(tmp_path), "--spec", str(bad))
    assert code == 2
    assert "error:" in out and "Traceback" not in out


def test_spec_show_and_init(tmp_path: Path) -> None:
    code, fingerprint = _invoke("client", "spec", "show", "--fingerprint")
    assert code == 0 and len(fingerprint.strip()) == 64
    target = tmp_path / "consortium.toml"
    code, _ = _invoke("client", "spec", "init", str(target))
    assert code == 0
    code, again = _invoke("client", "spec", "show", "--fingerprint", "--spec", str(target))
    assert again == fingerprint
    code, out = _invoke("client", "spec", "init", str(target))
    assert code == 2 and "exists" in out


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_and_says_where_to_look(tmp_path: Path) -> None:
    code, out = _invoke("demo", "--out", str(tmp_path), "--rounds", "2")
    assert code == 0, out
    assert "usable" in out and "federated test ROC-AUC" in out
    assert "Where to look:" in out
    assert (tmp_path / "federated" / "summary.md").is_file()
    reports = sorted(tmp_path.glob("institutions/*/report/report.html"))
    assert len(reports) == 4
