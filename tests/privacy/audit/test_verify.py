"""The auditor recomputes every claimed epsilon with dp-accounting and flags what does not hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privacy.audit.budget import recompute_budget
from privacy.audit.report import write_budget_report
from privacy.budget import DPPlan, PrivacyBudget
from privacy.ledger.entries import LEDGER_FILE, parse_entries
from privacy.ledger.institution import InstitutionLedger, record_non_private_round
from tests.privacy.conftest import RunRound


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_recomputed_epsilon_matches_the_claim_within_one_percent(
    tmp_path: Path, plan: DPPlan, run_round: RunRound, accountant: str
) -> None:
    budget = PrivacyBudget(epsilon=2.0, delta=1e-3, accountant=accountant)  # type: ignore[arg-type]
    for r in (1, 2, 3):
        run_round(tmp_path, budget, plan, r)

    report = recompute_budget(parse_entries(tmp_path / LEDGER_FILE))

    assert report.ok and [row.status for row in report.rows] == ["ok"] * 3
    for row in report.rows:
        assert row.claimed is not None
        if accountant == "rdp":
            assert row.claimed == pytest.approx(row.recomputed, rel=0.01)
        else:
            # Opacus' PRV claims the upper end of its +-0.01 error window; never below PLD.
            assert row.recomputed * 0.99 <= row.claimed <= row.recomputed * 1.01 + 0.01
    last = report.rows[-1]
    assert report.summaries[0].remaining == pytest.approx(
        budget.epsilon - max(last.claimed, last.recomputed)  # type: ignore[type-var]
    )


def test_an_understated_claim_fails_the_audit(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound
) -> None:
    honest = run_round(tmp_path, budget, plan, 1)
    ledger = InstitutionLedger(tmp_path, "uni_a")  # the institution's own key signs the lie
    fields = {k: v for k, v in honest.items() if k not in ("signature", "seq", "prev_hash")}
    ledger.append(ledger.sign_next(fields | {"round": 2, "epsilon_after": honest["epsilon_after"]}))

    report = recompute_budget(parse_entries(tmp_path / LEDGER_FILE))

    assert [row.status for row in report.rows] == ["ok", "UNDERSTATED"]
    assert not report.ok


def test_rounds_without_dp_are_reported_as_not_private(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound
) -> None:
    run_round(tmp_path, budget, plan, 1)
    record_non_private_round(
        tmp_path,
        institution="uni_a",
        run_id="run-1",
        server_round=2,
        node="node-7",
        n_students=plan.n_students,
        steps=8,
    )

    report = recompute_budget(parse_entries(tmp_path / LEDGER_FILE))

    assert [row.status for row in report.rows] == ["ok", "NOT PRIVATE"]
    assert not report.ok


def test_budget_report_has_a_row_per_round_and_a_plot(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound
) -> None:
    for institution in ("uni_a", "uni_b"):
        for r in (1, 2):
            run_round(tmp_path / institution, budget, plan, r, institution=institution)
    entries = [e for n in ("uni_a", "uni_b") for e in parse_entries(tmp_path / n / LEDGER_FILE)]

    written = write_budget_report(recompute_budget(entries), tmp_path / "audit")

    data = json.loads(written["json"].read_text())
    assert [i["institution"] for i in data["institutions"]] == ["uni_a", "uni_b"]
    assert len(data["rounds"]) == 4 and data["ok"] is True
    assert "| uni_b | run-1 | 2 |" in written["markdown"].read_text()
    assert written["plot"].read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"epsilon_budget": 0.999999}, "OVER BUDGET"),  # no tolerance on the budget
        ({"delta": 1 / 64}, "DELTA NOT BELOW 1/N"),  # n_students is 64
        ({"sample_rate": 0.3}, "SAMPLE RATE INCONSISTENT"),  # not 1 / a number of batches
        ({"sample_rate": 1 / 60}, "SAMPLE RATE INCONSISTENT"),  # 64 students: never 60 batches
        ({"sample_rate": 1 / 100}, "SAMPLE RATE INCONSISTENT"),  # more batches than students
    ],
    ids=[
        "epsilon-above-budget",
        "delta-not-below-1-over-n",
        "rate-not-1-over-k",
        "rate-no-batch-size-gives",
        "rate-below-1-over-n",
    ],
)
def test_an_entry_breaking_what_its_accounting_assumes_fails(
    tmp_path: Path,
    budget: PrivacyBudget,
    plan: DPPlan,
    run_round: RunRound,
    change: dict[str, float],
    status: str,
) -> None:
    run_round(tmp_path, budget, plan, 1)
    (entry,) = parse_entries(tmp_path / LEDGER_FILE)
    if "epsilon_budget" in change:  # just below what the round claims spent
        assert entry.epsilon_after is not None
        change = {"epsilon_budget": entry.epsilon_after * change["epsilon_budget"]}

    report = recompute_budget([entry.model_copy(update=change)])

    assert [row.status for row in report.rows] == [status] and not report.ok


def test_a_duplicated_entry_is_never_counted_twice(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound
) -> None:
    run_round(tmp_path, budget, plan, 1)
    entries = parse_entries(tmp_path / LEDGER_FILE)

    report = recompute_budget([*entries, *entries])

    assert [row.status for row in report.rows] == ["ok", "DUPLICATE"] and not report.ok
    assert report.rows[0].recomputed == pytest.approx(report.rows[0].claimed, rel=0.01)
