"""An auditor attacks a federation's global model straight from its run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.config import FederationConfig
from server.federation import run_federation
from simulations.cli import app
from tests.server.conftest import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_task")


def test_audit_attack_takes_a_federated_run_folder_and_the_ledgers_claim(
    consortium_dir: Path, tmp_path: Path
) -> None:
    exports = [consortium_dir / f"institution_0{i}" for i in (1, 2, 3)]
    config = FederationConfig(
        model_overrides={"hidden_size": 8},
        rounds=1,
        local_epochs=1,
        min_nodes=3,
        out_dir=tmp_path / "run",
        dp_epsilon=4.0,
    )
    grid = InProcessGrid(exports)
    for context in grid.contexts.values():
        context.node_config["privacy-root"] = str(tmp_path / "institutions")
    run_federation(grid, config)

    data = [arg for export in exports for arg in ("--data", str(export))]
    result = CliRunner().invoke(app, ["audit", "attack", str(config.out_dir), "--json", *data])

    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    ledger = [json.loads(line) for line in (config.out_dir / "ledger.jsonl").open()]
    assert report["claimed_epsilon"] == max(e["epsilon_after"] for e in ledger) <= 4.0
    assert report["n_members"] > report["n_non_members"] > 0
    assert 0.0 <= report["auc"] <= 1.0


def test_audit_attack_on_a_folder_that_is_neither_model_nor_run_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "attack", str(tmp_path), "--data", str(tmp_path)])
    assert result.exit_code == 2
    assert "neither a trained model folder" in result.output
