"""`edufl audit ...` and the pseudonymize command, through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from privacy.budget import DPPlan, PrivacyBudget
from privacy.ledger.entries import LEDGER_FILE
from privacy.pseudonymize_cli import pseudonymize
from shared_models.data.cohort import Normalizer
from shared_models.data.contract import default_spec
from shared_models.data.loader import load_cohort
from shared_models.data.splits import split_cohort
from shared_models.models.artifact import save_trained
from shared_models.models.registry import build_model
from shared_models.training import FitConfig, fit, set_seed
from simulations.cli import app
from tests.privacy.conftest import RunRound

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), prog_name="edufl")
    return result.exit_code, result.output


@pytest.fixture
def ledger_dir(tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound) -> Path:
    for r in (1, 2):
        run_round(tmp_path, budget, plan, r)
    return tmp_path


@pytest.mark.parametrize(
    "command", [["audit"], ["audit", "verify"], ["audit", "budget"], ["audit", "attack"]]
)
def test_every_audit_command_has_help_with_an_example(command: list[str]) -> None:
    code, out = _invoke(*command, "--help")
    assert code == 0 and "Example" in out and "edufl audit" in out


def test_pseudonymize_command_has_help_with_an_example() -> None:
    client = typer.Typer()
    client.command()(pseudonymize)
    client.command("other")(lambda: None)  # a group, as in `edufl client`

    result = runner.invoke(client, ["pseudonymize", "--help"], prog_name="edufl client")

    assert result.exit_code == 0 and "edufl client pseudonymize" in result.output


def test_verify_passes_an_intact_ledger_and_names_the_first_bad_entry(ledger_dir: Path) -> None:
    ledger, keys = ledger_dir / LEDGER_FILE, ledger_dir / "keys"
    received = ledger_dir / "received.jsonl"  # the server's copy: where the chain must end
    received.write_bytes(ledger.read_bytes())
    heads = ("--heads", str(received))
    code, out = _invoke("audit", "verify", str(ledger), "--keys", str(keys), *heads)
    assert code == 0 and "=> INTACT" in out and "registered keys" in out

    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text(lines[0] + lines[1].replace('"round":2', '"round":3'))
    code, out = _invoke("audit", "verify", str(ledger), "--keys", str(keys), *heads)

    assert code == 1
    assert "first bad entry: line 2 (uni_a seq 1): signature does not match" in out


def test_verify_refuses_a_missing_ledger_with_exit_2(tmp_path: Path) -> None:
    code, out = _invoke("audit", "verify", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "no such ledger file" in out


def test_budget_writes_the_report_and_exits_0_when_claims_hold(
    ledger_dir: Path, tmp_path: Path
) -> None:
    code, out = _invoke("audit", "budget", str(ledger_dir / LEDGER_FILE), "--out", str(tmp_path))

    assert code == 0, out
    assert "| uni_a | 2 | 2.0000 |" in out
    assert json.loads((tmp_path / "budget.json").read_text())["ok"] is True
    assert (tmp_path / "epsilon.png").exists()


@pytest.fixture
def model_dir(consortium_dir: Path, tmp_path: Path) -> Path:
    spec = default_spec()
    cohort = load_cohort(consortium_dir / "institution_01", spec)
    split = split_cohort(cohort, seed=3)
    norm = Normalizer(spec.target.grade_min, spec.target.grade_max).fit(cohort.subset(split.train))
    set_seed(3)
    model = build_model("lstm", spec.weeks, cohort.n_dynamic, cohort.n_static, {"hidden_size": 8})
    fit(model, norm.transform(cohort.subset(split.train)), None, "risk", FitConfig(max_epochs=2))
    extra = {"split": {"mode": "random", "seed": 3}, "dp": {"epsilon": 8.0, "delta": 1e-5}}
    save_trained(
        tmp_path / "model", model, name="lstm", task="risk", spec=spec, normalizer=norm, extra=extra
    )
    return tmp_path / "model"


def test_attack_reports_empirical_privacy_next_to_the_claim(
    model_dir: Path, consortium_dir: Path
) -> None:
    data = str(consortium_dir / "institution_01")

    code, out = _invoke("audit", "attack", str(model_dir), "--data", data, "--json")

    assert code == 0, out
    result = json.loads(out)
    assert result["claimed_epsilon"] == 8.0 and 0 <= result["advantage"] <= 1
    assert result["n_members"] > 2 * result["n_non_members"] > 0  # 70 % vs 15 %


def test_attack_refuses_a_split_that_is_not_the_models(
    model_dir: Path, consortium_dir: Path
) -> None:
    data = str(consortium_dir / "institution_01")

    code, out = _invoke("audit", "attack", str(model_dir), "--data", data, "--seed", "4")

    assert code == 2 and "training split is not the random split (seed 4)" in out


def test_attack_takes_a_model_normalised_with_the_contracts_constants(
    consortium_dir: Path, tmp_path: Path
) -> None:
    """An adopted model's normaliser comes from the contract: the split rests on the seed."""
    spec = default_spec()
    cohort = load_cohort(consortium_dir / "institution_01", spec)
    split = split_cohort(cohort, seed=3)
    norm = Normalizer.from_contract(spec)
    set_seed(3)
    model = build_model("lstm", spec.weeks, cohort.n_dynamic, cohort.n_static, {"hidden_size": 8})
    fit(model, norm.transform(cohort.subset(split.train)), None, "risk", FitConfig(max_epochs=1))
    extra = {"split": {"mode": "random", "seed": 3}}
    out = tmp_path / "adopted"
    save_trained(out, model, name="lstm", task="risk", spec=spec, normalizer=norm, extra=extra)
    data = str(consortium_dir / "institution_01")

    code, text = _invoke("audit", "attack", str(out), "--data", data, "--json")

    assert code == 0, text
    assert json.loads(text)["n_members"] == len(split.train)


def test_pseudonymize_command_writes_the_export_and_reports(
    export_copy: Path, tmp_path: Path
) -> None:
    client = typer.Typer()
    client.command()(pseudonymize)
    client.command("other")(lambda: None)
    out, secret = tmp_path / "out", tmp_path / "secret"

    result = runner.invoke(
        client, ["pseudonymize", str(export_copy), str(out), "--secret", str(secret), "--k", "3"]
    )

    assert result.exit_code == 0, result.output
    assert "students pseudonymised" in result.output and "k-anonymity (k=3)" in result.output
    assert secret.read_text().strip() not in result.output
    assert (out / "students.csv").exists()
