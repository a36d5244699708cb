"""``edufl simulate run --dp-epsilon``: DP-SGD at every virtual institution, with the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privacy.audit.verify import verify_ledger
from privacy.ledger.entries import parse_entries
from simulations.cli import app

runner = CliRunner()


@pytest.mark.slow  # ~45 s: Ray start-up and two DP rounds at two institutions
def test_dp_simulation_keeps_budgets_and_a_verifiable_ledger(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "simulate", "run", "--synthetic", "2", "--students", "200", "--rounds", "2",
            "--local-epochs", "1", "--dp-epsilon", "8", "--out", str(out), "--engine", "ray",
        ],
        prog_name="edufl",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    progress = [line for line in result.output.splitlines() if line.startswith("round ")]
    assert len(progress) == 2 and all("epsilon max" in line for line in progress)
    # Under DP the federation is evaluated after its last round only (--dp-evaluate-every).
    assert "not evaluated this round" in progress[0] and "ROC-AUC" not in progress[0]
    assert "federated ROC-AUC" in progress[1] and "noised" in progress[1]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    entries = parse_entries(out / "ledger.jsonl")
    held = {(e.institution, e.seq) for e in entries}
    for record in records:
        assert record["failures"] == []
        assert 0 < record["epsilon_max"] <= 8.0
        assert all(0 < e["epsilon"] <= 8.0 for e in record["institutions"])
        # Released figures only, each traced to entries of the run's ledger.
        assert record["release"] == "dp"
        last = record["round"] == 2
        assert record["evaluated"] is last and bool(record["evaluate"]) is last
        for figures in (record["train"], record["evaluate"]) if last else (record["train"],):
            assert figures and all(f["noised"] for f in figures.values())
            assert all({tuple(ref) for ref in f["ledger"]} <= held for f in figures.values())
    text = (out / "metrics.jsonl").read_text()
    assert not any(f'"{k}"' in text for k in ("train/loss", "train/seconds", "train/steps", "loss"))
    done = next(line for line in result.output.splitlines() if line.startswith("done in"))
    assert "noised" in done  # the final ROC-AUC is said to come from noised histograms

    by_institution: dict[str, list[float]] = {}
    for entry in entries:
        assert entry.private
        if entry.kind == "histogram":
            assert entry.round == 2  # the one planned evaluation
        if entry.kind == "train":  # count and histogram releases have entries of their own
            by_institution.setdefault(entry.institution, []).append(entry.epsilon_after)
    assert sorted(by_institution) == ["institution_01", "institution_02"]
    for epsilons in by_institution.values():
        assert len(epsilons) == 2  # one training entry per round
        assert epsilons == sorted(epsilons) and epsilons[-1] <= 8.0
    # Each institution's state lives apart, under the run directory (a resume keeps counting).
    assert sorted(p.name for p in (out / "privacy").iterdir()) == sorted(by_institution)

    report = verify_ledger(out / "ledger.jsonl")
    assert report.ok, report.problems
    verify = runner.invoke(app, ["audit", "verify", str(out / "ledger.jsonl")], prog_name="edufl")
    assert verify.exit_code == 0, verify.output
