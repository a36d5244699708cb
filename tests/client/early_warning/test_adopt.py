from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from client.early_warning.adopt import ADOPTION_FILE, LATEST, MODELS, adopt, latest_adopted
from client.early_warning.calibration import CALIBRATION_FILE
from client.early_warning.report import score_and_report
from server.checkpoints import CheckpointStore
from shared_models.data.contract import default_spec
from shared_models.errors import DataContractError
from shared_models.models.registry import build_model
from shared_models.training import set_seed
from simulations.cli import app

SPEC = default_spec()
RUN_ID = "a1" * 16


def _run(run_dir: Path, *, run_id: str = RUN_ID, fingerprint: str | None = None) -> Path:
    """A federated run folder of two committed rounds (as the server writes it)."""
    store = CheckpointStore(run_dir)
    set_seed(3)
    model = build_model("lstm", SPEC.weeks, len(SPEC.dynamic), len(SPEC.static_names))
    for r in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * r)
        manifest = {
            "model": "lstm",
            "model_overrides": {},
            "task": "risk",
            "seed": 0,
            "run_id": run_id,
            "spec_fingerprint": fingerprint or SPEC.fingerprint,
        }
        store.save(r, model, manifest)
    return run_dir


def _nothing_written(home: Path) -> bool:
    models = home / MODELS
    return not models.exists() or not any(models.iterdir())


def test_adoption_is_verified_calibrated_and_becomes_the_latest(
    consortium_dir: Path, tmp_path: Path
) -> None:
    run = _run(tmp_path / "run")
    home = tmp_path / "home"
    first = adopt(run, consortium_dir / "institution_01", SPEC, home=home, run_id=RUN_ID)
    assert first.round == 2 and first.run_id == RUN_ID
    assert {p.name for p in first.model_dir.iterdir()} == {
        "model.pt",
        "model.json",
        CALIBRATION_FILE,
        ADOPTION_FILE,
    }
    record = json.loads((first.model_dir / ADOPTION_FILE).read_text())
    assert record["run_id"] == RUN_ID and record["round"] == 2
    assert record["spec_fingerprint"] == SPEC.fingerprint
    assert latest_adopted(home) == first.model_dir

    checkpoint = run / "checkpoints" / "round-0001.json"
    second = adopt(checkpoint, consortium_dir / "institution_01", SPEC, home=home)
    assert second.round == 1 and latest_adopted(home) == second.model_dir
    assert first.model_dir.is_dir()  # one folder per adoption: the older one stays
    assert not [p for p in (home / MODELS).iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("form", ["folder", "model.pt", "run", "checkpoint", "latest"])
def test_score_takes_every_form_of_model(form: str, consortium_dir: Path, tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    data = consortium_dir / "institution_02"
    home = tmp_path / "home"
    model_dir = adopt(run, data, SPEC, out=tmp_path / "model").model_dir
    if form == "latest":
        adopt(run, data, SPEC, home=home)
    model = {
        "folder": ["--model", str(model_dir)],
        "model.pt": ["--model", str(model_dir / "model.pt")],
        "run": ["--model", str(run)],
        "checkpoint": ["--model", str(run / "checkpoints" / "round-0002.json")],
        "latest": [],
    }[form]
    args = ["client", "score", "--data", str(data), "--db", str(tmp_path / "c.sqlite")]
    result = CliRunner().invoke(app, [*args, *model, "--home", str(home)])
    assert result.exit_code == 0, result.output
    assert "(calibrated probabilities)" in result.output
    assert "scored " in result.output
    if form in ("run", "checkpoint"):  # adopted into the home on the way, and reused
        assert latest_adopted(home).is_dir()
        again = CliRunner().invoke(app, [*args, *model, "--home", str(home)])
        assert again.exit_code == 0, again.output
        assert len([p for p in (home / MODELS).iterdir() if p.is_dir()]) == 1


def test_report_uses_the_latest_adopted_model_with_its_calibration(
    consortium_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    data = consortium_dir / "institution_03"
    adopted = adopt(_run(tmp_path / "run"), data, SPEC, home=home, calibration="sigmoid")
    result = score_and_report(data, None, tmp_path / "report", home=home)
    assert result.warning.info.model_dir == str(adopted.model_dir)
    assert result.warning.calibration is not None
    page = result.html.read_text("utf-8")
    assert 'id="reliability"' in page and 'id="ece"' in page
    assert "nothing left the institution" in page


def test_without_an_adoption_score_says_how_to_adopt(consortium_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "client",
            "score",
            "--data",
            str(consortium_dir / "institution_01"),
            "--home",
            str(tmp_path / "home"),
            "--db",
            str(tmp_path / "c.sqlite"),
        ],
    )
    assert result.exit_code != 0
    assert "edufl client adopt" in result.output


def test_another_contract_is_refused_and_nothing_is_written(
    consortium_dir: Path, tmp_path: Path
) -> None:
    run = _run(tmp_path / "run", fingerprint="0" * 64)
    home = tmp_path / "home"
    with pytest.raises(DataContractError, match="contract"):
        adopt(run, consortium_dir / "institution_01", SPEC, home=home)
    assert _nothing_written(home) and not (home / MODELS / LATEST).exists()


def test_damaged_weights_are_refused_and_the_previous_adoption_stays_latest(
    consortium_dir: Path, tmp_path: Path
) -> None:
    run = _run(tmp_path / "run")
    home = tmp_path / "home"
    before = adopt(
        run / "checkpoints" / "round-0001.json", consortium_dir / "institution_01", SPEC, home=home
    ).model_dir
    weights = run / "checkpoints" / "round-0002.weights"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DataContractError, match="checksum"):
        adopt(run, consortium_dir / "institution_01", SPEC, home=home)
    assert latest_adopted(home) == before
    assert sorted(p.name for p in (home / MODELS).iterdir()) == sorted([before.name, LATEST])


def test_a_checkpoint_of_another_run_is_refused(consortium_dir: Path, tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    home = tmp_path / "home"
    with pytest.raises(DataContractError, match=f"belongs to run {RUN_ID}, not b2b2"):
        adopt(run, consortium_dir / "institution_01", SPEC, home=home, run_id="b2b2")
    assert _nothing_written(home)
    other = _run(tmp_path / "other", run_id="c3" * 16)
    (other / "checkpoints" / "round-0002.json").rename(run / "checkpoints" / "round-0003.json")
    (other / "checkpoints" / "round-0002.weights").rename(
        run / "checkpoints" / "round-0002.weights.other"
    )
    with pytest.raises(DataContractError, match="2 different runs"):
        adopt(run, consortium_dir / "institution_01", SPEC, home=home)


def test_out_refuses_a_folder_that_is_not_a_model(consortium_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataContractError, match="not a model folder"):
        adopt(_run(tmp_path / "run"), consortium_dir / "institution_01", SPEC, out=out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_model_that_is_neither_form_names_the_four(consortium_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(
        app,
        [
            "client",
            "score",
            "--data",
            str(consortium_dir / "institution_01"),
            "--model",
            str(tmp_path / "empty"),
            "--db",
            str(tmp_path / "c.sqlite"),
        ],
    )
    assert result.exit_code != 0
    assert "run folder" in result.output and "model.pt" in result.output


def test_adopt_command_prints_the_calibration_error(consortium_dir: Path, tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    result = CliRunner().invoke(
        app,
        [
            "client",
            "adopt",
            str(run),
            "--data",
            str(consortium_dir / "institution_01"),
            "--home",
            str(tmp_path / "home"),
            "--run-id",
            RUN_ID,
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"adopted round 2 of run {RUN_ID}" in result.output
    assert "ECE" in result.output and "calibrated" in result.output
