"""A run folder's files are the server user's only: checkpoints, metrics log, ledger (``stat``)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import torch

from privacy.ledger.entries import append_entry
from server.checkpoints import CheckpointStore
from shared_models.models.registry import build_model


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_checkpoints_metrics_and_ledger_are_0600_in_0700_folders(tmp_path: Path) -> None:
    run = tmp_path / "run"
    store = CheckpointStore(run)
    old_umask = os.umask(0o022)  # the usual umask, which would leave files 0644
    try:
        torch.manual_seed(0)
        state = {"m": np.zeros(3, dtype=np.float32)}
        store.save(1, build_model("lstm", 5, 3, 2), {"strategy": "fedadam"}, state=state,
                   metrics_record={"round": 1})  # fmt: skip
        append_entry(run / "ledger.jsonl", {"round": 1})
    finally:
        os.umask(old_umask)
    files = sorted(p for p in run.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {
        "round-0001.weights",
        "round-0001.state",
        "round-0001.json",
        "metrics.jsonl",
        "ledger.jsonl",
    }
    assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
    assert (_mode(run), _mode(run / "checkpoints")) == (0o700, 0o700)


def test_an_existing_run_folder_keeps_its_mode_but_checkpoints_are_narrowed(
    tmp_path: Path,
) -> None:
    run = tmp_path / "shared-results"
    (run / "checkpoints").mkdir(parents=True, mode=0o755)
    run.chmod(0o755)
    (run / "checkpoints").chmod(0o755)
    CheckpointStore(run).save(1, build_model("lstm", 5, 3, 2), {"strategy": "fedavg"})
    assert _mode(run) == 0o755  # the operator's own folder (--out)
    assert _mode(run / "checkpoints") == 0o700
    assert all(_mode(p) == 0o600 for p in (run / "checkpoints").iterdir())
