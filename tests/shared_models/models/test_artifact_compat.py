"""A model card written before a config field existed rebuilds the model it was trained as."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shared_models.data.cohort import Normalizer
from shared_models.data.contract import default_spec, load_spec
from shared_models.errors import DataContractError
from shared_models.models.artifact import load_trained, save_trained, trained_config
from shared_models.models.registry import build_model
from shared_models.training import set_seed


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("cnn-lstm", "static_scale"),
        ("multitask", "static_scale"),
    ],
)
def test_a_card_without_a_scale_was_trained_unscaled(name: str, field: str, tmp_path: Path) -> None:
    spec = default_spec()
    n_dynamic, n_static = len(spec.dynamic), len(spec.static_names)
    set_seed(0)
    old = build_model(name, spec.weeks, n_dynamic, n_static, {field: 1.0})
    folder = tmp_path / name
    save_trained(
        folder, old, name=name, task="multitask", spec=spec,
        normalizer=Normalizer.from_contract(spec),
    )  # fmt: skip
    card_path = folder / "model.json"
    card = json.loads(card_path.read_text())
    del card["config"][field]  # as an edufl before issue 19 wrote it
    card_path.write_text(json.dumps(card))

    loaded, _, restored = load_trained(folder, spec)
    assert restored.config[field] == 1.0
    # The default would have built another model: the test would fail without the fallback.
    assert build_model(name, spec.weeks, n_dynamic, n_static).config.model_dump()[field] != 1.0
    dynamic, mask = torch.rand(3, spec.weeks, n_dynamic), torch.ones(3, spec.weeks)
    static = torch.rand(3, n_static)
    with torch.no_grad():
        expected, got = old.eval()(dynamic, mask, static), loaded.eval()(dynamic, mask, static)
    for head in expected:
        torch.testing.assert_close(got[head], expected[head], rtol=0, atol=0)


def test_a_current_card_and_models_without_the_field_are_left_as_they_are() -> None:
    assert trained_config("cnn-lstm", {"static_scale": 0.1})["static_scale"] == 0.1
    assert "static_scale" not in trained_config("lstm", {})
    assert trained_config("cnn", {})["static_scale"] == 1.0


OULAD_SPEC = Path(__file__).resolve().parents[3] / "simulations/datasets/oulad/spec.toml"


@pytest.mark.parametrize("bad", [[True], "yes", [1] * 23, [True] * 24])
def test_a_card_with_a_malformed_log1p_mask_is_refused_with_the_field_named(
    bad: object, tmp_path: Path
) -> None:
    spec = load_spec(OULAD_SPEC)  # its clicks are log1p (contract 1.3.0)
    n_dynamic, n_static = len(spec.dynamic), len(spec.static_names)
    model = build_model("lstm", spec.weeks, n_dynamic, n_static)
    save_trained(
        tmp_path, model, name="lstm", task="risk", spec=spec,
        normalizer=Normalizer.from_contract(spec),
    )  # fmt: skip
    card_path = tmp_path / "model.json"
    card = json.loads(card_path.read_text())
    assert card["normalizer"]["dyn_log1p"][:20] == [True] * 20  # the card carries the transform
    _, normalizer, _ = load_trained(tmp_path, spec)
    assert normalizer.dyn_log1p is not None and normalizer.dyn_log1p.sum() == 20
    card["normalizer"]["dyn_log1p"] = bad
    card_path.write_text(json.dumps(card))
    with pytest.raises(DataContractError, match=r"model.json: normalizer.dyn_log1p must be 23"):
        load_trained(tmp_path, spec)
