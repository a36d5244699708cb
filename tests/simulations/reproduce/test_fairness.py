"""Fairness tables of a reproduction: alignment with the test students, one row per group+mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from shared_models.data.contract import default_spec
from shared_models.data.loader import load_cohort
from simulations.cli import app
from simulations.reproduce import fairness
from simulations.reproduce.runs import Outcome, Scored

SPEC = default_spec()
OULAD_SAMPLE = Path(__file__).resolve().parents[3].parent / "shared/datasets/oulad_sample_AAA"


def _scored(test_at_risk: np.ndarray, prob: np.ndarray) -> Scored:
    scores = {"at_risk": test_at_risk, "prob": prob}
    return Scored({}, None, 10, len(prob), {}, scores)


def test_attach_adds_one_entry_per_protected_attribute(consortium_dir: Path) -> None:
    test = load_cohort(consortium_dir / "institution_01", SPEC)
    prob = np.random.default_rng(0).random(len(test))
    scored = _scored(test.at_risk, prob)
    fairness.attach(scored, test, SPEC, seed=0)
    found = scored.details[fairness.DETAIL]
    assert [a["attribute"] for a in found] == ["gender", "age_band", "first_generation"]
    assert all(sum(g["n"] for g in a["groups"]) == len(test) for a in found)
    json.dumps(found)  # results.json must be able to hold it


def test_attach_refuses_predictions_of_other_students(consortium_dir: Path) -> None:
    test = load_cohort(consortium_dir / "institution_01", SPEC)
    scored = _scored(test.at_risk[::-1].copy() * 0 + 1, np.zeros(len(test)))
    fairness.attach(scored, test, SPEC, seed=0)
    assert fairness.DETAIL not in scored.details


def test_markdown_shows_each_group_once_per_mode_and_only_the_first_repeat(
    consortium_dir: Path,
) -> None:
    test = load_cohort(consortium_dir / "institution_01", SPEC)
    outcomes = []
    for mode, eps, repeat in [("centralized", None, 0), ("federated-dp", 8.0, 0),
                              ("centralized", None, 1)]:  # fmt: skip
        prob = np.random.default_rng(repeat).random(len(test))
        scored = _scored(test.at_risk, prob)
        fairness.attach(scored, test, SPEC, seed=0)
        outcomes.append(Outcome("LSTM", "model", mode, repeat, repeat, None, eps, 1.0, scored))
    md = "\n".join(fairness.markdown(outcomes))
    gender = md.split("**gender**", 1)[1].split("**age_band**", 1)[0]
    rows = [line for line in gender.splitlines() if line.startswith("| ") and "LSTM" in line]
    cells = [r.split(" | ")[:3] for r in rows]
    groups = sorted({c[0].strip("| ") for c in cells})
    assert len(groups) >= 2 and len(cells) == 2 * len(groups)  # repeat 1 is not shown
    for k in range(0, len(cells), 2):  # each group: centralized then federated-DP, adjacent
        assert cells[k][0] == cells[k + 1][0]
        assert [cells[k][2], cells[k + 1][2]] == ["centralized", "federated-dp (ε=8)"]


def test_markdown_is_empty_without_fairness_details() -> None:
    scored = Scored({}, None, 1, 1, {}, {})
    outcome = Outcome("x", "baseline", "centralized", 0, 0, None, None, 0, scored)
    assert fairness.markdown([outcome]) == []


@pytest.mark.slow  # a quick OULAD reproduction in every mode: several minutes on two cores
@pytest.mark.skipif(not OULAD_SAMPLE.is_dir(), reason="../shared/datasets is not present")
def test_oulad_reproduction_reports_fairness_for_the_four_protected_attributes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["reproduce", "at-risk-lstm", "--dataset", "oulad", "--data", str(OULAD_SAMPLE),
         "--out", str(out), "--quick"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    md = (out / "results.md").read_text("utf-8").split("## Fairness by group", 1)[1]
    for attribute in ("gender", "disability", "imd_band", "age_band"):
        assert f"**{attribute}**" in md
    for mode in ("centralized", "federated", "federated-dp (ε=8)"):
        assert f"| F | LSTM | {mode} |" in md and f"| Y | LSTM | {mode} |" in md
