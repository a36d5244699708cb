"""A DP federation end to end (in-process grid, real ClientApp): its outputs hold releases only.

Every figure in ``metrics.jsonl``, the checkpoints' manifests and ``summary.md`` must be a
noised release, or computed from releases, and name the entries of the run's consortium ledger
it comes from; no exact training or per-node evaluation value may appear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from privacy.ledger.entries import parse_entries
from server.checkpoints import CheckpointStore
from server.config import FederationConfig
from server.federation import run_federation
from shared_models.protocol import NUM_EXAMPLES, RISK_HIST_POS, RISK_ROC_AUC
from tests.server.conftest import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_task")

#: Keys of exact values computed on a node's data (training and evaluation).
EXACT = {"train/loss", "train/seconds", "train/steps", "loss"}


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (path, value) pair under ``node`` that is a figure or a plain number."""
    if isinstance(node, dict) and "noised" in node:
        return [(path, node)]
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in _walk(value, f"{path}/{key}")]
    return [(path, node)]


def _phases(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found = [("consortium " + phase, record[phase]) for phase in ("train", "evaluate")]
    for entry in record["institutions"]:
        found += [(f"{entry['institution']} {p}", entry.get(p, {})) for p in ("train", "evaluate")]
    return found


def test_a_dp_run_writes_only_noised_figures_each_in_the_runs_ledger(
    consortium_dir: Path, tmp_path: Path
) -> None:
    exports = [consortium_dir / f"institution_0{i}" for i in (1, 2)]
    config = FederationConfig(
        model_overrides={"hidden_size": 8},
        rounds=2,
        local_epochs=1,
        min_nodes=2,
        out_dir=tmp_path / "run",
        dp_epsilon=8.0,
        dp_evaluate_every=1,  # every round's figures checked (the default evaluates the last)
    )
    grid = InProcessGrid(exports)
    for context in grid.contexts.values():  # each institution's DP state, as a simulation's
        context.node_config["privacy-root"] = str(tmp_path / "institutions")
    result = run_federation(grid, config)

    ledger = {(e.institution, e.seq): e for e in parse_entries(config.out_dir / "ledger.jsonl")}
    run_ids = {e.run_id for e in ledger.values()}
    assert len(run_ids) == 1
    records = CheckpointStore(config.out_dir).read_metrics()
    manifests = [c.manifest for c in CheckpointStore(config.out_dir).checkpoints()]
    assert [r["round"] for r in records] == [1, 2]
    for record, manifest in zip(records, manifests, strict=True):
        assert record["release"] == "dp"
        assert manifest["train"] == record["train"]
        assert manifest["evaluate"] == record["evaluate"]
        for where, figures in _phases(record):
            assert figures, f"{where}: nothing released"
            assert not set(figures) & EXACT and not any(k.startswith("val/") for k in figures)
            for key, item in _walk(figures):
                assert isinstance(item, dict) and item["noised"], f"{where}{key}: {item!r}"
                assert item["noise_std"] > 0 and item["ledger"], f"{where}{key}: {item!r}"
                kinds = {ledger[(name, seq)].kind for name, seq in item["ledger"]}
                expected = "count" if key == f"/{NUM_EXAMPLES}" else "histogram"
                assert kinds == {expected}, f"{where}{key}: entries of kind {kinds}"
                assert all(ledger[(n, s)].run_id in run_ids for n, s in item["ledger"])
        assert len(record["evaluate"][RISK_ROC_AUC]["ledger"]) == 2  # both institutions' entries
        rounds = {ledger[tuple(ref)].round for ref in record["evaluate"][RISK_HIST_POS]["ledger"]}
        assert rounds == {record["round"]}  # this round's histograms, not an earlier round's

    text = (config.out_dir / "metrics.jsonl").read_text()
    assert not any(f'"{key}"' in text for key in EXACT) and '"val/' not in text
    summary = (config.out_dir / "summary.md").read_text()
    assert "noised" in summary and "loss" not in summary
    assert result.noised and result.released[RISK_ROC_AUC]["noised"]
    assert json.dumps(result.released)  # JSON-ready, as the runner's callers write it
