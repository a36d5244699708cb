"""Tail averaging: the run releases the mean of its last rounds' global models, trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType

from server.averaging import TailAverage, first_averaged_round
from server.checkpoints import CheckpointStore
from server.config import FederationConfig
from server.federation import global_model, run_federation
from shared_models.data.contract import default_spec
from shared_models.models.weights import load_tensors, named_weights
from tests.server.conftest import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_task")


def _config(out_dir: Path, **changes: Any) -> FederationConfig:
    base: dict[str, Any] = {
        "model_overrides": {"hidden_size": 8},
        "rounds": 4,
        "local_epochs": 1,
        "min_nodes": 2,
        "out_dir": out_dir,
        "average_rounds": 0.5,
    }
    return FederationConfig(**(base | changes))


def _weights(run_dir: Path, config: FederationConfig, server_round: int) -> dict[str, np.ndarray]:
    store = CheckpointStore(run_dir)
    checkpoint = next(c for c in store.checkpoints() if c.round == server_round)
    model = global_model(config, default_spec())
    store.load(checkpoint, model)
    return named_weights(model)


def _iterate(run_dir: Path, server_round: int) -> dict[str, np.ndarray]:
    """The un-averaged global model a checkpoint keeps in its state."""
    checkpoint = next(c for c in CheckpointStore(run_dir).checkpoints() if c.round == server_round)
    assert checkpoint.state_path is not None, f"round {server_round} kept no iterate"
    state = load_tensors(checkpoint.state_path)
    return {k.removeprefix("iterate/"): v.numpy() for k, v in state.items() if "iterate/" in k}


def _sent(grid: InProcessGrid, kind: str, server_round: int) -> dict[str, np.ndarray]:
    msg = next(
        m
        for m in grid.sent
        if m.metadata.message_type == kind and m.content["config"]["server-round"] == server_round
    )
    return {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}


@pytest.mark.parametrize(
    ("rounds", "share", "first"),
    [(10, 0.5, 6), (5, 0.5, 3), (10, 0.0, 10), (1, 0.5, 1), (4, 1.0, 1), (3, 0.1, 3)],
)
def test_the_share_of_rounds_averaged_counts_from_the_last(
    rounds: int, share: float, first: int
) -> None:
    assert first_averaged_round(rounds, share) == first


def test_a_share_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match="within 0-1"):
        first_averaged_round(10, 1.5)


def test_the_released_model_is_the_running_mean_from_the_first_averaged_round() -> None:
    average = TailAverage(first=2)
    rounds = [
        {"w": np.full(3, float(r), dtype=np.float32), "n": np.asarray(r, dtype=np.int64)}
        for r in (1, 2, 3, 4)
    ]
    released = [
        average.update(r, ArrayRecord({k: Array(v) for k, v in arrays.items()}))
        for r, arrays in enumerate(rounds, start=1)
    ]
    assert released[0]["w"].numpy().tolist() == [1.0, 1.0, 1.0]  # before it: the iterate
    assert released[1]["w"].numpy().tolist() == [2.0, 2.0, 2.0]
    assert released[3]["w"].numpy().tolist() == [3.0, 3.0, 3.0]  # mean of rounds 2-4
    assert int(released[3]["n"].numpy()) == 4  # an integer buffer is the latest, not a mean
    assert released[1]["w"].numpy().tolist() == [2.0, 2.0, 2.0], "an earlier release changed"


def test_a_federation_releases_the_mean_and_trains_on_from_the_iterate(
    exports: list[Path], tmp_path: Path
) -> None:
    config = _config(tmp_path / "run")
    assert config.first_averaged_round == 3
    grid = InProcessGrid(exports)
    run_federation(grid, config)

    # Rounds 1-2 release their own model and keep no iterate beside it.
    store = CheckpointStore(config.out_dir)
    assert store.checkpoints()[1].state_path is None
    assert store.checkpoints()[1].manifest["averaged_rounds"] is None
    # Round 3 is the first averaged: the mean of one model, the iterate itself.
    iterate3, iterate4 = _iterate(config.out_dir, 3), _iterate(config.out_dir, 4)
    for name, value in _weights(config.out_dir, config, 3).items():
        np.testing.assert_allclose(value, iterate3[name], rtol=1e-6)
    # Round 4's checkpoint is the mean of rounds 3 and 4, which differ.
    released = _weights(config.out_dir, config, 4)
    assert any(not np.allclose(iterate3[n], iterate4[n]) for n in released)
    for name, value in released.items():
        np.testing.assert_allclose(value, (iterate3[name] + iterate4[name]) / 2, rtol=1e-5)
    assert store.latest().manifest["averaged_rounds"] == [3, 4]  # type: ignore[union-attr]
    assert (
        "the mean of the global models of rounds 3-4" in (config.out_dir / "summary.md").read_text()
    )

    # The nodes train round 4 from round 3's iterate, not from the mean ...
    for name, value in _sent(grid, MessageType.TRAIN, 4).items():
        np.testing.assert_array_equal(value, iterate3[name])
    # ... and evaluate the model the round releases.
    for name, value in _sent(grid, MessageType.EVALUATE, 4).items():
        np.testing.assert_allclose(value, released[name], rtol=1e-6)


def test_without_averaging_the_last_rounds_model_is_released(
    exports: list[Path], tmp_path: Path
) -> None:
    config = _config(tmp_path / "run", rounds=3, average_rounds=0.0)
    grid = InProcessGrid(exports)
    run_federation(grid, config)
    latest = CheckpointStore(config.out_dir).latest()
    assert latest is not None and latest.state_path is None
    assert latest.manifest["averaged_rounds"] is None
    assert "Released model" not in (config.out_dir / "summary.md").read_text()
    for name, value in _sent(grid, MessageType.EVALUATE, 3).items():
        np.testing.assert_array_equal(value, _weights(config.out_dir, config, 3)[name])


def test_a_resumed_averaging_run_releases_what_an_uninterrupted_one_does(
    exports: list[Path], tmp_path: Path
) -> None:
    straight = _config(tmp_path / "straight")
    run_federation(InProcessGrid(exports), straight)

    config = _config(tmp_path / "crashed")

    def superlink_dies_in_round_4(msg: Message) -> bool:
        return msg.content["config"]["server-round"] == 4

    with pytest.raises(RuntimeError, match="SuperLink crashed"):
        run_federation(InProcessGrid(exports, crash_at=superlink_dies_in_round_4), config)
    grid = InProcessGrid(exports)
    run_federation(grid, config.model_copy(update={"resume": True}))

    # Round 4 trained from round 3's iterate (not from its checkpoint, a mean) ...
    for name, value in _sent(grid, MessageType.TRAIN, 4).items():
        np.testing.assert_array_equal(value, _iterate(config.out_dir, 3)[name])
    # ... and the released mean is that of the run that never stopped.
    uninterrupted = _weights(straight.out_dir, straight, 4)
    for name, value in _weights(config.out_dir, config, 4).items():
        np.testing.assert_allclose(value, uninterrupted[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("rounds", "averaged", "warned"), [(6, [5, 6], True), (8, [5, 8], False)])
def test_resuming_with_more_rounds_averages_the_new_last_rounds_only(
    rounds: int,
    averaged: list[int],
    warned: bool,
    exports: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = _config(tmp_path / "run")  # 4 rounds: the mean of rounds 3-4
    run_federation(InProcessGrid(exports), config)
    # 6 rounds average 4-6, but round 4 is already in a mean with round 3: start again at 5.
    # 8 rounds average 5-8, none of which has run: nothing to say.
    run_federation(
        InProcessGrid(exports), config.model_copy(update={"resume": True, "rounds": rounds})
    )
    assert ("the released mean starts again at round 5" in caplog.text) is warned
    store = CheckpointStore(config.out_dir)
    assert store.latest().manifest["averaged_rounds"] == averaged  # type: ignore[union-attr]


def test_under_dp_the_at_risk_task_averages_the_last_half_unless_the_user_says_otherwise(
    tmp_path: Path,
) -> None:
    assert FederationConfig(out_dir=tmp_path).average_rounds == 0.0
    private = FederationConfig(out_dir=tmp_path, dp_epsilon=8.0)
    assert private.average_rounds == 0.5
    assert FederationConfig(out_dir=tmp_path, dp_epsilon=8, average_rounds=0).average_rounds == 0
    back = FederationConfig.from_run_config(private.to_run_config())
    assert back.average_rounds == 0.5
    assert private.with_dp_epsilon(None).average_rounds == 0.0
    # A grade head's level is lost in a mean of rounds: such tasks release the last round's.
    for task in ("grade", "multitask"):
        assert FederationConfig(out_dir=tmp_path, dp_epsilon=8, task=task).average_rounds == 0
        own = FederationConfig(out_dir=tmp_path, dp_epsilon=8, task=task, average_rounds=0.5)
        assert own.average_rounds == 0.5
