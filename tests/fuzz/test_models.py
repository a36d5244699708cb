"""Hostile trained-model folders (model.json + model.pt) and federation checkpoints.

Weights are only ever read with ``torch.load(weights_only=True)``; a file carrying a pickled
object whose ``__reduce__`` would run a command must be refused with a clear error *and the
command must not run* (a marker file it would create stays absent). Through `load_trained`,
`edufl client score --model` (whose store must be untouched when it refuses) and the
checkpoint store a resumed federation reads.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from client.early_warning.store import Store
from server.checkpoints import CheckpointStore
from shared_models.data.contract import default_spec
from shared_models.models.artifact import load_trained
from shared_models.models.registry import build_model
from shared_models.models.weights import load_tensors
from tests.fuzz.harness import assert_unchanged, call, cli, digests, fuzz
from tests.fuzz.mutations import byte_damage, wrong_document

SPEC = default_spec()
MODEL_CONFIG = {"hidden_size": 8, "targets": ["risk"]}


class _Payload:
    """Unpickling this runs ``touch MARKER``: what a poisoned model file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def _poisoned(path: Path, marker: Path, valid: dict[str, torch.Tensor], how: str) -> None:
    """Write a weights file that would create ``marker`` if it were ever unpickled."""
    if how == "zip, payload as a tensor":
        name = sorted(valid)[0]
        torch.save({**valid, name: _Payload(marker)}, path)
    elif how == "zip, payload beside the tensors":
        torch.save({**valid, "__extra__": _Payload(marker)}, path)
    elif how == "zip, payload alone":
        torch.save(_Payload(marker), path)
    elif how == "legacy torch format":
        torch.save({"x": _Payload(marker)}, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle named model.pt
        path.write_bytes(pickle.dumps({"x": _Payload(marker)}))


POISON = (
    "zip, payload as a tensor",
    "zip, payload beside the tensors",
    "zip, payload alone",
    "legacy torch format",
    "plain pickle",
)


def _hostile_tensors(valid: dict[str, torch.Tensor]) -> st.SearchStrategy[Any]:
    name = sorted(valid)[0]
    return st.sampled_from(
        (
            {},
            {**valid, "extra.weight": torch.zeros(2)},
            {k: v for k, v in valid.items() if k != name},
            {**valid, name: torch.zeros(3, 3)},
            {**valid, name: torch.full_like(valid[name], float("nan"))},
            {**valid, name: torch.full_like(valid[name], float("inf"))},
            {**valid, name: valid[name].to(torch.complex64)},
            {**valid, name: valid[name].to(torch.int64)},
            {**valid, name: valid[name].to_sparse()},
            {**valid, name: [1.0, 2.0]},
            {**valid, name: "weights"},
            {**valid, 7: valid[name]},
            [valid[name]],
            valid[name],
            {"nested": valid},
            None,
        )
    )


@pytest.fixture(scope="module")
def valid_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_tensors(model_dir / "model.pt")


@st.composite
def hostile_model_folder(
    draw: st.DrawFn, model_dir: Path, tensors: dict[str, torch.Tensor], folder: Path
) -> str:
    """Damage model.json or model.pt inside ``folder`` (a copy); returns the file's name."""
    card = json.loads((model_dir / "model.json").read_text())
    target = draw(st.sampled_from(("model.json", "model.json", "model.pt", "model.pt")))
    if target == "model.json":
        if draw(st.booleans()):
            data = draw(byte_damage((model_dir / "model.json").read_bytes()))
            (folder / target).write_bytes(data)
        else:
            wrong = draw(wrong_document(card))
            (folder / target).write_text(json.dumps(wrong, default=str), "utf-8")
        return target
    how = draw(st.sampled_from(("bytes", "tensors", "tensors")))
    if how == "bytes":
        data = draw(byte_damage((model_dir / "model.pt").read_bytes()))
        (folder / target).write_bytes(data)
    else:
        torch.save(draw(_hostile_tensors(tensors)), folder / target)
    return target


@fuzz(90)
@given(data=st.data())
def test_hostile_model_folders_are_refused_with_the_file_named(
    model_dir: Path, valid_tensors: dict[str, torch.Tensor], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(model_dir, Path(tmp) / "model"))
        name = data.draw(hostile_model_folder(model_dir, valid_tensors, folder), label="damage")
        call("model folder", lambda: load_trained(folder, SPEC), names=[name])


@fuzz(8)
@given(data=st.data())
def test_score_refuses_a_hostile_model_and_keeps_the_store(
    model_dir: Path, export_dir: Path, valid_tensors: dict[str, torch.Tensor], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(model_dir, Path(tmp) / "model"))
        name = data.draw(hostile_model_folder(model_dir, valid_tensors, folder), label="damage")
        db = Path(tmp) / "store.sqlite"
        Store(db).close()
        before = digests(db)
        args = ["client", "score", "--data", str(export_dir), "--model", str(folder)]
        result = cli("model folder", [*args, "--db", str(db)], names=[name])
        if result.exit_code != 0:
            assert_unchanged("model folder", before, db)


@pytest.mark.parametrize("how", POISON)
def test_a_pickle_payload_in_model_pt_is_refused_and_never_runs(
    model_dir: Path,
    export_dir: Path,
    valid_tensors: dict[str, torch.Tensor],
    tmp_path: Path,
    how: str,
) -> None:
    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    marker = tmp_path / "PWNED"
    _poisoned(folder / "model.pt", marker, valid_tensors, how)
    error = call("pickle payload", lambda: load_trained(folder, SPEC), names=["model.pt"])
    assert not marker.exists(), "the payload ran"
    assert (
        "pickle" in str(error) or "Python objects" in str(error) or "not a weights" in str(error)
    ), error
    db = tmp_path / "store.sqlite"
    args = ["client", "score", "--data", str(export_dir), "--model", str(folder)]
    cli("pickle payload", [*args, "--db", str(db)], names=["model.pt"], codes=(2,), count=False)
    assert not marker.exists(), "the payload ran"
    assert not db.exists(), "a refused model must not create a store"


# --- federation checkpoints ------------------------------------------------------------------


def _model() -> torch.nn.Module:
    return build_model("lstm", SPEC.weeks, len(SPEC.dynamic), len(SPEC.static_names), MODEL_CONFIG)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A federated run with two committed rounds (FedAdam-like state) and a metrics log."""
    run = tmp_path_factory.mktemp("fuzz-run")
    store = CheckpointStore(run)
    for server_round in (1, 2):
        store.save(
            server_round,
            _model(),
            {"model": "lstm", "strategy": "fedadam", "spec_fingerprint": SPEC.fingerprint},
            state={"m": np.zeros(4, np.float32), "v": np.ones(4, np.float32)},
            metrics_record={"round": server_round, "train": {"loss": 0.5}},
        )
    return run


CHECKPOINT_FILES = (
    "checkpoints/round-0002.json",
    "checkpoints/round-0002.weights",
    "checkpoints/round-0002.state",
    "metrics.jsonl",
)


def _resume(run: Path) -> None:
    """What a resumed federation does with its run folder (server/federation.py)."""
    store = CheckpointStore(run)
    last = store.latest()
    assert last is not None
    store.load(last, _model())
    store.trim_metrics(last.round)


@fuzz(80)
@given(target=st.sampled_from(CHECKPOINT_FILES), data=st.data())
def test_hostile_checkpoints_are_refused_and_the_metrics_log_survives(
    run_dir: Path, target: str, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(shutil.copytree(run_dir, Path(tmp) / "run"))
        path = run / target
        valid = path.read_bytes()
        kind = data.draw(st.sampled_from(("bytes", "document", "tensors")), label="how")
        if kind == "document" and path.suffix == ".json":
            wrong = data.draw(wrong_document(json.loads(valid)), label="document")
            path.write_text(json.dumps(wrong, default=str), "utf-8")
        elif kind == "document" and path.suffix == ".jsonl":
            *first, last = valid.splitlines()
            wrong = data.draw(wrong_document(json.loads(last)), label="document")
            path.write_bytes(b"\n".join([*first, json.dumps(wrong, default=str).encode()]))
        elif kind == "tensors" and path.suffix in (".weights", ".state"):
            torch.save(data.draw(_hostile_tensors(load_tensors(path)), label="tensors"), path)
            _rehash(run, path)  # a forger updates the manifest's hash too
        else:
            path.write_bytes(data.draw(byte_damage(valid), label="bytes"))
        metrics = run / "metrics.jsonl"
        before = digests(metrics)
        result = call("checkpoint", lambda: _resume(run), names=[path.name, "round-0002"])
        if result is not None:  # refused: the log must be as it was
            assert_unchanged("checkpoint", before, metrics)


def _rehash(run: Path, path: Path) -> None:
    import hashlib

    manifest_path = run / "checkpoints/round-0002.json"
    manifest = json.loads(manifest_path.read_text())
    key = "weights_sha256" if path.suffix == ".weights" else "state_sha256"
    manifest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("how", POISON)
@pytest.mark.parametrize("target", ["round-0002.weights", "round-0002.state"])
def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(
    run_dir: Path, tmp_path: Path, how: str, target: str
) -> None:
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    path = run / "checkpoints" / target
    marker = tmp_path / "PWNED"
    _poisoned(path, marker, load_tensors(path), how)
    _rehash(run, path)
    error = call("pickle payload", lambda: _resume(run), names=[target])
    assert error is not None and not marker.exists(), "the payload ran"
