from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.global_model import adopt_global_model
from server.checkpoints import CheckpointStore
from shared_models.data.contract import default_spec
from shared_models.data.node import node_normalizer, split_node
from shared_models.errors import DataContractError
from shared_models.models.artifact import load_trained
from shared_models.models.checkpoints import latest_checkpoint
from shared_models.models.registry import build_model
from shared_models.training import set_seed

SPEC = default_spec()


def _checkpoint(run_dir: Path, rounds: int = 2, fingerprint: str | None = None) -> torch.nn.Module:
    store = CheckpointStore(run_dir)
    set_seed(3)
    model = build_model("lstm", SPEC.weeks, len(SPEC.dynamic), len(SPEC.static_names))
    for r in range(1, rounds + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * r)
        store.save(
            r,
            model,
            {
                "model": "lstm",
                "model_overrides": {},
                "task": "risk",
                "seed": 0,
                "spec_fingerprint": fingerprint or SPEC.fingerprint,
            },
        )
    return model


def test_adopted_model_holds_the_last_rounds_weights_and_local_normalisation(
    consortium_dir: Path, tmp_path: Path
) -> None:
    final = _checkpoint(tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run").name == "round-0002.json"
    data = consortium_dir / "institution_02"
    model, normalizer, card = load_trained(
        adopt_global_model(tmp_path / "run", data, SPEC, tmp_path / "model"), SPEC
    )
    for (name, got), want in zip(model.named_parameters(), final.parameters(), strict=True):
        assert torch.equal(got, want), name
    # the normaliser the node trained with: the contract's constants (issue 16)
    train = split_node(data, SPEC, seed=0).train
    assert normalizer.state() == node_normalizer(SPEC, train).state()
    assert normalizer.method == "contract"
    assert card.extra["federated_round"] == 2


def test_tampered_weights_or_another_contract_are_refused(
    consortium_dir: Path, tmp_path: Path
) -> None:
    _checkpoint(tmp_path / "run")
    weights = tmp_path / "run" / "checkpoints" / "round-0002.weights"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DataContractError, match="checksum"):
        adopt_global_model(
            tmp_path / "run", consortium_dir / "institution_01", SPEC, tmp_path / "m"
        )
    _checkpoint(tmp_path / "other", fingerprint="0" * 64)
    with pytest.raises(DataContractError, match="contract"):
        adopt_global_model(
            tmp_path / "other", consortium_dir / "institution_01", SPEC, tmp_path / "m"
        )
    with pytest.raises(DataContractError, match="no federated checkpoint"):
        adopt_global_model(tmp_path, consortium_dir / "institution_01", SPEC, tmp_path / "m")
