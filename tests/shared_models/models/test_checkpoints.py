"""One checkpoint format: what the server commits and adoption, audit and reproductions read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_models.data.contract import default_spec
from shared_models.models.checkpoints import (
    CheckpointError,
    checkpoint_model,
    checkpoint_seed,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from shared_models.models.registry import build_model
from shared_models.training import set_seed

SPEC = default_spec()
IDENTITY = {"model": "gru", "model_overrides": {"hidden_size": 8}, "seed": 7}


def _model(seed: int) -> torch.nn.Module:
    set_seed(seed)
    return build_model(
        "gru", SPEC.weeks, len(SPEC.dynamic), len(SPEC.static_names), {"hidden_size": 8}
    )


def _commit(folder: Path, rounds: int = 2, **manifest: object) -> torch.nn.Module:
    for server_round in range(1, rounds + 1):
        model = _model(server_round)
        write_checkpoint(
            folder,
            server_round,
            model,
            {**IDENTITY, "spec_fingerprint": SPEC.fingerprint, **manifest},
            state={"m": np.arange(3, dtype=np.float32)},
        )
    return model


def test_the_model_a_checkpoint_holds_is_rebuilt_from_its_manifest_alone(tmp_path: Path) -> None:
    final = _commit(tmp_path / "checkpoints")
    checkpoint = read_checkpoint(latest_checkpoint(tmp_path))
    assert [c.round for c in list_checkpoints(tmp_path / "checkpoints")] == [1, 2]
    assert checkpoint.round == 2 and checkpoint_seed(checkpoint) == 7
    model = checkpoint_model(checkpoint, SPEC)
    for got, want in zip(model.state_dict().values(), final.state_dict().values(), strict=True):
        assert torch.equal(got, want)


def test_the_manifest_is_written_last_after_the_callers_step(tmp_path: Path) -> None:
    seen: list[bool] = []
    folder = tmp_path / "checkpoints"
    write_checkpoint(
        folder,
        1,
        _model(0),
        IDENTITY,
        before_commit=lambda: seen.append((folder / "round-0001.json").exists()),
    )
    assert seen == [False]
    assert json.loads((folder / "round-0001.json").read_text())["round"] == 1


def test_another_contract_is_refused_with_the_manifest_named(tmp_path: Path) -> None:
    _commit(tmp_path / "checkpoints", spec_fingerprint="0" * 64)
    checkpoint = read_checkpoint(latest_checkpoint(tmp_path))
    with pytest.raises(
        CheckpointError, match=r"round-0002\.json: trained on contract 000000000000"
    ):
        checkpoint_model(checkpoint, SPEC)


def test_replaced_weights_are_refused_before_they_are_loaded(tmp_path: Path) -> None:
    _commit(tmp_path / "checkpoints")
    checkpoint = read_checkpoint(latest_checkpoint(tmp_path))
    checkpoint.weights_path.write_bytes(b"not the committed weights")
    with pytest.raises(CheckpointError, match="do not match the manifest's checksum"):
        checkpoint_model(checkpoint, SPEC)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": "../model.pt"}, "weights must name a file next to the manifest"),
        ({"round": -1}, "round must be a whole number"),
        ({"model": 3}, "cannot build its model"),
        ({"model_overrides": {"hidden_size": -1}}, "cannot build its model"),
        ({"seed": 2**40}, "seed must be a whole number"),
        ({"seed": "7"}, "seed must be a whole number"),
    ],
)
def test_a_malformed_manifest_is_refused_with_its_name(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    _commit(tmp_path / "checkpoints", rounds=1)
    path = tmp_path / "checkpoints" / "round-0001.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(CheckpointError, match=message) as caught:
        checkpoint = read_checkpoint(path)
        checkpoint_seed(checkpoint)
        checkpoint_model(checkpoint, SPEC)
    assert "round-0001.json" in str(caught.value)
