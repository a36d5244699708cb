"""`edufl client start` refuses a DP budget that differs from the one its state folder accounts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.node.cli import _check_recorded_budget
from privacy.accountant_store import AccountantState, AccountantStore
from simulations.cli import app


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "privacy"
    AccountantStore(folder).save(
        AccountantState(
            institution="institution_01",
            accountant="rdp",
            delta=1e-5,
            epsilon_budget=8.0,
            epsilon_spent=2.5,
        )
    )
    return folder


@pytest.mark.parametrize(("flag", "value"), [("--dp-delta", "1e-6"), ("--dp-epsilon", "4")])
def test_client_start_refuses_a_budget_other_than_the_recorded_one_in_one_line(
    export_copy: Path, state_dir: Path, flag: str, value: str
) -> None:
    result = CliRunner().invoke(
        app,
        ["client", "start", "--data", str(export_copy), "--superlink", "127.0.0.1:9",
         "--insecure", "--privacy-state", str(state_dir), flag, value],
        prog_name="edufl",
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert f"{flag} {float(value):g} differs from the budget recorded in" in message
    assert "--dp-epsilon 8 --dp-delta 1e-05" in message  # the recorded values, to restart with
    assert "new --privacy-state" in message
    assert "Traceback" not in result.output
    assert "started" not in result.output  # refused before any node process


def test_recorded_budget_check_accepts_the_same_values_unset_flags_and_a_fresh_folder(
    state_dir: Path, tmp_path: Path
) -> None:
    _check_recorded_budget(state_dir, 8.0, 1e-5)
    _check_recorded_budget(state_dir, None, None)  # the server's proposal may lower defaults
    _check_recorded_budget(tmp_path / "fresh", 2.0, 1e-6)  # nothing recorded yet
