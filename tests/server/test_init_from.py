"""``init_from``: a federated run that starts from a public prior's weights, checked first."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from server.checkpoints import CheckpointStore
from server.config import FederationConfig, FederationConfigError
from server.federation import check_out_dir, global_model, run_federation
from shared_models.data.cohort import Normalizer
from shared_models.data.contract import FeatureSpec, default_spec
from shared_models.models.artifact import save_trained
from shared_models.models.checkpoints import write_checkpoint
from shared_models.models.registry import build_model
from shared_models.models.weights import named_weights
from tests.server.conftest import InProcessGrid

SPEC = default_spec()
SMALL = {"hidden_size": 8}


def _config(**changes: Any) -> FederationConfig:
    base: dict[str, Any] = {"model_overrides": SMALL, "rounds": 1, "local_epochs": 1}
    return FederationConfig(**(base | changes))


def _trained(name: str = "lstm", overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """A model whose weights differ from every seeded start (as a trained prior's do)."""
    torch.manual_seed(1234)
    model = build_model(name, SPEC.weeks, len(SPEC.dynamic), len(SPEC.static_names), overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)
    return model


def _model_folder(
    folder: Path,
    *,
    name: str = "lstm",
    overrides: dict[str, Any] | None = None,
    spec: FeatureSpec = SPEC,
) -> Path:
    model = _trained(name, SMALL if overrides is None else overrides)
    save_trained(
        folder, model, name=name, task="risk", spec=spec, normalizer=Normalizer.from_contract(spec)
    )
    return folder


def _run_folder(folder: Path, *, name: str = "lstm", spec: FeatureSpec = SPEC) -> Path:
    manifest = {
        "model": name,
        "model_overrides": SMALL,
        "task": "risk",
        "seed": 0,
        "spec_fingerprint": spec.fingerprint,
        "run_id": "public",
    }
    write_checkpoint(folder / "checkpoints", 1, _trained(name, SMALL), manifest)
    return folder


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.fixture
def prior_folder(tmp_path: Path) -> Path:
    return _model_folder(tmp_path / "public-model")


@pytest.fixture
def prior_run(tmp_path: Path) -> Path:
    return _run_folder(tmp_path / "public-run")


@pytest.mark.parametrize(
    "form",
    [
        "model folder",
        "model.pt",
        "model.json",
        "run folder",
        "checkpoints folder",
        "round-0001.json",
        "round-0001.weights",
    ],
)
def test_each_form_of_a_prior_gives_the_initial_global_weights(
    form: str, prior_folder: Path, prior_run: Path
) -> None:
    path = {
        "model folder": prior_folder,
        "model.pt": prior_folder / "model.pt",
        "model.json": prior_folder / "model.json",
        "run folder": prior_run,
        "checkpoints folder": prior_run / "checkpoints",
        "round-0001.json": prior_run / "checkpoints" / "round-0001.json",
        "round-0001.weights": prior_run / "checkpoints" / "round-0001.weights",
    }[form]
    started = named_weights(global_model(_config(init_from=path), SPEC))
    _assert_same(started, named_weights(_trained("lstm", SMALL)))
    seeded = named_weights(global_model(_config(), SPEC))
    assert not np.array_equal(started["rnn.weight_ih_l0"], seeded["rnn.weight_ih_l0"])


def test_a_prior_of_another_model_is_refused_with_the_fix(tmp_path: Path) -> None:
    prior = _model_folder(tmp_path / "gru", name="gru")
    with pytest.raises(FederationConfigError) as err:
        global_model(_config(init_from=prior), SPEC)
    message = str(err.value)
    assert message.startswith(f"--init-from {prior}: model 'gru' but this run trains 'lstm'")
    assert "pass --model gru" in message


def test_a_prior_of_another_width_names_the_setting_that_differs(tmp_path: Path) -> None:
    prior = _model_folder(tmp_path / "wide", overrides={"hidden_size": 16})
    with pytest.raises(FederationConfigError) as err:
        global_model(_config(init_from=prior), SPEC)
    message = str(err.value)
    assert str(prior) in message and "shape" in message
    assert "hidden_size 16 (this run 8)" in message and "model_overrides" in message


@pytest.mark.parametrize("form", ["model folder", "run folder"])
def test_a_prior_of_another_contract_is_refused(form: str, tmp_path: Path) -> None:
    other = SPEC.model_copy(update={"version": "2.0.0"})
    make = _model_folder if form == "model folder" else _run_folder
    prior = make(tmp_path / "other", spec=other)
    with pytest.raises(FederationConfigError) as err:
        global_model(_config(init_from=prior), SPEC)
    message = str(err.value)
    assert str(prior) in message and f"trained on contract {other.fingerprint[:12]}" in message
    assert SPEC.short_fingerprint in message and "--spec" in message


def test_a_missing_prior_is_named(tmp_path: Path) -> None:
    with pytest.raises(FederationConfigError, match=r"--init-from .*nowhere: no such file"):
        global_model(_config(init_from=tmp_path / "nowhere"), SPEC)


def test_a_folder_that_is_no_model_says_which_forms_are_taken(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FederationConfigError, match="not a model — pass a model folder"):
        global_model(_config(init_from=tmp_path / "empty"), SPEC)


def test_a_model_folder_without_its_weights_is_refused(prior_folder: Path) -> None:
    (prior_folder / "model.pt").unlink()
    with pytest.raises(FederationConfigError, match=r"model\.pt: cannot read weights"):
        global_model(_config(init_from=prior_folder), SPEC)


@pytest.mark.parametrize("form", ["model folder", "run folder"])
def test_damaged_prior_weights_fail_their_checksum(
    form: str, prior_folder: Path, prior_run: Path
) -> None:
    if form == "model folder":
        target, path = prior_folder / "model.pt", prior_folder
    else:
        target, path = prior_run / "checkpoints" / "round-0001.weights", prior_run
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(FederationConfigError) as err:
        global_model(_config(init_from=path), SPEC)
    assert str(target) in str(err.value)
    assert "does not match" in str(err.value) or "checksum" in str(err.value)


@pytest.mark.parametrize("form", ["model folder", "run folder"])
def test_non_finite_prior_weights_are_refused(form: str, tmp_path: Path) -> None:
    model = _trained("lstm", SMALL)
    with torch.no_grad():
        model.head.heads.risk.weight[0, 0] = float("nan")
    if form == "model folder":
        path = tmp_path / "nan"
        save_trained(
            path, model, name="lstm", task="risk", spec=SPEC,
            normalizer=Normalizer.from_contract(SPEC),
        )  # fmt: skip
    else:
        path = tmp_path / "nan-run"
        manifest = {"model": "lstm", "model_overrides": SMALL, "spec_fingerprint": SPEC.fingerprint}
        write_checkpoint(path / "checkpoints", 1, model, manifest)
    with pytest.raises(
        FederationConfigError, match=r"'head\.heads\.risk\.weight' holds NaN or infinite"
    ):
        global_model(_config(init_from=path), SPEC)


def test_init_from_survives_the_run_config_round_trip(tmp_path: Path) -> None:
    config = _config(init_from=tmp_path / "prior")
    run_config = config.to_run_config()
    assert run_config["init-from"] == str(tmp_path / "prior")
    assert FederationConfig.from_run_config(run_config) == config
    none = _config()
    assert none.to_run_config()["init-from"] == ""
    assert FederationConfig.from_run_config(none.to_run_config()).init_from is None


@pytest.mark.usefixtures("flower_task")
def test_a_run_starts_from_the_prior_records_it_and_a_resume_does_not_reapply_it(
    consortium_dir: Path, prior_folder: Path, tmp_path: Path
) -> None:
    exports = [consortium_dir / f"institution_0{i}" for i in (1, 2)]
    config = _config(init_from=prior_folder, out_dir=tmp_path / "run", min_nodes=2)
    grid = InProcessGrid(exports)
    run_federation(grid, config)

    first = grid.sent[0].content["arrays"].to_numpy_ndarrays(keep_input=True)
    names = list(grid.sent[0].content["arrays"].keys())
    _assert_same(dict(zip(names, first, strict=True)), named_weights(_trained("lstm", SMALL)))
    store = CheckpointStore(config.out_dir)
    recorded = store.latest().manifest["init_from"]  # type: ignore[union-attr]
    digest = hashlib.sha256((prior_folder / "model.pt").read_bytes()).hexdigest()
    assert recorded["path"] == str(prior_folder) and recorded["weights_sha256"] == digest
    assert recorded["kind"] == "model"
    summary = (config.out_dir / "summary.md").read_text()
    assert "## Initial weights" in summary and digest in summary

    # The prior is gone: a resumed run never reads it, goes on from round 1's weights, and
    # keeps the record of what the run started from.
    after_round_1 = store.latest()
    shutil.rmtree(prior_folder)
    resumed = config.model_copy(update={"rounds": 2, "resume": True})
    check_out_dir(resumed)
    grid = InProcessGrid(exports)
    run_federation(grid, resumed)
    sent = grid.sent[0].content["arrays"]
    weights = dict(zip(sent.keys(), sent.to_numpy_ndarrays(keep_input=True), strict=True))
    model = global_model(_config(), SPEC)
    store.load(after_round_1, model)  # type: ignore[arg-type]
    _assert_same(weights, named_weights(model))
    assert store.latest().manifest["init_from"] == recorded  # type: ignore[union-attr]


@pytest.mark.usefixtures("flower_task")
def test_a_run_without_prior_records_none_and_summary_says_nothing_of_one(
    consortium_dir: Path, tmp_path: Path
) -> None:
    exports = [consortium_dir / f"institution_0{i}" for i in (1, 2)]
    config = _config(out_dir=tmp_path / "run", min_nodes=2)
    run_federation(InProcessGrid(exports), config)
    manifest_path = tmp_path / "run" / "checkpoints" / "round-0001.json"
    assert json.loads(manifest_path.read_text())["init_from"] is None
    assert "Initial weights" not in (tmp_path / "run" / "summary.md").read_text()


def test_simulate_refuses_a_bad_prior_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulations.cli import app

    monkeypatch.chdir(tmp_path)
    prior = _model_folder(tmp_path / "gru", name="gru")
    result = CliRunner().invoke(
        app,
        ["simulate", "run", "--data", ".", "--out", "x", "--min-nodes", "1",
         "--init-from", str(prior)],
        prog_name="edufl",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"--init-from {prior}: model 'gru' but this run trains 'lstm'" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_server_and_simulate_help_say_what_a_prior_must_not_have_seen() -> None:
    from simulations.cli import app

    for command in (["server", "start"], ["simulate", "run"]):
        result = CliRunner().invoke(
            app, [*command, "--help"], prog_name="edufl", env={"COLUMNS": "200"}
        )
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        assert "--init-from" in text and "no private record" in text
