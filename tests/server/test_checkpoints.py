"""Checkpoints and the metrics log: reload bit for bit, refuse damage, never half-write."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from server.checkpoints import CheckpointError, CheckpointStore
from shared_models.models.registry import build_model
from shared_models.models.weights import named_weights
from shared_models.training import set_seed


def _model(seed: int) -> torch.nn.Module:
    set_seed(seed)
    return build_model("lstm", 5, 3, 2)


def test_checkpoint_reloads_the_same_weights_and_state(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    saved = _model(1)
    state = {"m_t/rnn.weight_ih_l0": np.arange(6, dtype=np.float32)}
    store.save(1, _model(0), {"strategy": "fedadam"})
    store.save(2, saved, {"strategy": "fedadam"}, state=state)

    latest = store.latest()
    assert latest is not None and latest.round == 2
    assert latest.manifest["strategy"] == "fedadam"
    target = _model(5)
    restored_state = store.load(latest, target)
    for name, value in named_weights(saved).items():
        np.testing.assert_array_equal(named_weights(target)[name], value)
    np.testing.assert_array_equal(
        restored_state["m_t/rnn.weight_ih_l0"], state["m_t/rnn.weight_ih_l0"]
    )
    assert [c.round for c in store.checkpoints()] == [1, 2]
    assert not list(tmp_path.rglob("*.tmp")), "no temporary file is left behind"


def test_damaged_checkpoint_weights_are_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    checkpoint = store.save(1, _model(0), {})
    data = bytearray(checkpoint.weights_path.read_bytes())
    data[-10] ^= 0xFF
    checkpoint.weights_path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match the manifest"):
        store.load(checkpoint, _model(0))


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    checkpoint = store.save(1, _model(0), {})
    set_seed(0)
    with pytest.raises(CheckpointError, match=r"missing|shape"):
        store.load(checkpoint, build_model("gru", 5, 3, 2))


def test_metrics_log_is_strict_json_lines(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.append_metrics({"round": 1, "evaluate": {"risk/roc_auc": math.nan, "loss": 0.5}})
    store.append_metrics({"round": 2, "evaluate": {"risk/roc_auc": 0.7, "loss": 0.4}})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(line, parse_constant=pytest.fail) for line in lines]
    assert [r["round"] for r in parsed] == [1, 2]
    assert parsed[0]["evaluate"]["risk/roc_auc"] is None


def test_trimming_drops_only_rounds_that_were_never_committed(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save(1, _model(0), {}, metrics_record={"round": 1})
    store.append_metrics({"round": 2})  # the crash came before round 2's manifest
    assert store.trim_metrics(store.latest().round) == 1  # type: ignore[union-attr]
    assert [r["round"] for r in store.read_metrics()] == [1]
