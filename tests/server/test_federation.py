"""A whole federation on an in-process grid with the real ClientApp: checkpoints, log, resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from server.checkpoints import CheckpointError, CheckpointStore
from server.config import FederationConfig
from server.federation import FederationError, global_model, run_federation
from shared_models.data.contract import default_spec
from shared_models.models.weights import named_weights
from tests.server.conftest import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_task")


def _config(out_dir: Path, **changes: Any) -> FederationConfig:
    base: dict[str, Any] = {
        "model_overrides": {"hidden_size": 8},
        "rounds": 2,
        "local_epochs": 1,
        "min_nodes": 2,
        "out_dir": out_dir,
    }
    return FederationConfig(**(base | changes))


def _final_weights(run_dir: Path, config: FederationConfig) -> dict[str, np.ndarray]:
    store = CheckpointStore(run_dir)
    model = global_model(config, default_spec())
    store.load(store.latest(), model)  # type: ignore[arg-type]
    return named_weights(model)


def test_every_round_commits_a_checkpoint_and_each_institutions_metrics(
    exports: list[Path], tmp_path: Path
) -> None:
    config = _config(tmp_path / "run")
    result = run_federation(InProcessGrid(exports), config)

    store = CheckpointStore(config.out_dir)
    assert [c.round for c in store.checkpoints()] == [1, 2]
    manifest = store.latest().manifest  # type: ignore[union-attr]
    assert manifest["strategy"] == "fedavg" and manifest["model"] == "lstm"
    assert manifest["spec_fingerprint"] == default_spec().fingerprint
    assert manifest["evaluate"]["risk/roc_auc"] == pytest.approx(result.evaluate["risk/roc_auc"])

    records = store.read_metrics()
    assert [r["round"] for r in records] == [1, 2]
    institutions = {e["institution"] for e in records[-1]["institutions"]}
    assert institutions == {"institution_01", "institution_02", "institution_03"}
    for entry in records[-1]["institutions"]:
        assert entry["train"]["num-examples"] > entry["evaluate"]["num-examples"] > 0
        assert 0.0 <= entry["evaluate"]["risk/accuracy"] <= 1.0
    assert (config.out_dir / "summary.md").read_text().count("institution_0") >= 3
    assert (config.out_dir / "rounds.png").stat().st_size > 1000


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_resume_after_a_crash_continues_at_the_next_round_as_if_never_interrupted(
    strategy: str, exports: list[Path], tmp_path: Path
) -> None:
    params = {"eta": 0.01} if strategy == "fedadam" else {}
    straight = _config(tmp_path / "straight", rounds=3, strategy=strategy, strategy_params=params)
    run_federation(InProcessGrid(exports), straight)

    config = _config(tmp_path / "crashed", rounds=3, strategy=strategy, strategy_params=params)

    def superlink_dies_in_round_3(msg: Message) -> bool:
        return msg.content["config"]["server-round"] == 3

    with pytest.raises(RuntimeError, match="SuperLink crashed"):
        run_federation(InProcessGrid(exports, crash_at=superlink_dies_in_round_3), config)
    assert [r["round"] for r in CheckpointStore(config.out_dir).read_metrics()] == [1, 2]

    grid = InProcessGrid(exports)
    result = run_federation(grid, config.model_copy(update={"resume": True}))
    assert result.first_round == 3
    assert {m.content["config"]["server-round"] for m in grid.sent} == {3}
    assert [r["round"] for r in CheckpointStore(config.out_dir).read_metrics()] == [1, 2, 3]
    resumed, uninterrupted = (
        _final_weights(config.out_dir, config),
        _final_weights(straight.out_dir, straight),
    )
    for name, value in uninterrupted.items():
        np.testing.assert_allclose(resumed[name], value, rtol=1e-5, atol=1e-6)


def test_a_run_directory_with_checkpoints_is_not_overwritten_without_resume(
    exports: list[Path], tmp_path: Path
) -> None:
    config = _config(tmp_path / "run", rounds=1)
    run_federation(InProcessGrid(exports), config)
    with pytest.raises(CheckpointError, match="--resume"):
        run_federation(InProcessGrid(exports), config)


def test_resuming_with_a_different_model_is_refused(exports: list[Path], tmp_path: Path) -> None:
    config = _config(tmp_path / "run", rounds=1)
    run_federation(InProcessGrid(exports), config)
    other = config.model_copy(update={"resume": True, "rounds": 2, "model": "gru"})
    with pytest.raises(CheckpointError, match=r"different run.*model"):
        run_federation(InProcessGrid(exports), other)


def test_resuming_a_finished_run_runs_no_round(exports: list[Path], tmp_path: Path) -> None:
    config = _config(tmp_path / "run", rounds=1)
    run_federation(InProcessGrid(exports), config)
    grid = InProcessGrid(exports)
    result = run_federation(grid, config.model_copy(update={"resume": True}))
    assert grid.sent == [] and result.first_round == 2


def test_a_failing_node_does_not_stop_the_round(exports: list[Path], tmp_path: Path) -> None:
    config = _config(tmp_path / "run", rounds=1)
    result = run_federation(InProcessGrid(exports, failing={2}), config)
    record = CheckpointStore(config.out_dir).read_metrics()[0]
    assert {f["node_id"] for f in record["failures"]} == {2}
    assert "lost its disk" in record["failures"][0]["error"]
    assert len(record["institutions"]) == 2
    assert result.evaluate["num-examples"] > 0


def test_when_every_node_fails_the_run_stops_without_committing_the_round(
    exports: list[Path], tmp_path: Path
) -> None:
    config = _config(tmp_path / "run", rounds=2)
    with pytest.raises(FederationError, match=r"every node failed.*lost its disk"):
        run_federation(InProcessGrid(exports[:2], failing={1, 2}), config)
    assert CheckpointStore(config.out_dir).latest() is None


def test_a_node_with_another_data_contract_is_refused_and_says_why(
    exports: list[Path], tmp_path: Path
) -> None:
    config = _config(tmp_path / "run", rounds=1)
    grid = InProcessGrid(exports)
    grid.contexts[3].node_config["spec-path"] = str(_other_spec(tmp_path))
    run_federation(grid, config)
    failures = CheckpointStore(config.out_dir).read_metrics()[0]["failures"]
    assert [f["node_id"] for f in failures] == [3, 3]  # train and evaluate
    assert "fingerprint" in failures[0]["error"]


def _other_spec(tmp_path: Path) -> Path:
    spec = default_spec().model_copy(update={"version": "1.0.1"})
    path = tmp_path / "spec.toml"
    path.write_text(spec.to_toml())
    return path


def test_dp_run_resumed_after_a_crash_mid_round_counts_that_round_once_in_every_ledger(
    exports: list[Path], tmp_path: Path
) -> None:
    """The nodes trained and spent round 2, then the server died before committing it."""
    from privacy.ledger.entries import parse_entries

    # Evaluated every round: the server dies at round 2's evaluation, after its training.
    config = _config(tmp_path / "run", rounds=3, dp_epsilon=8.0, dp_evaluate_every=1)
    privacy_root = str(tmp_path / "institutions")  # each institution's own disk, kept

    def grid(**kwargs: Any) -> InProcessGrid:
        in_process = InProcessGrid(exports, **kwargs)
        for context in in_process.contexts.values():
            context.node_config["privacy-root"] = privacy_root
        return in_process

    def dies_after_training_round_2(msg: Message) -> bool:
        return (
            msg.metadata.message_type == "evaluate" and msg.content["config"]["server-round"] == 2
        )

    with pytest.raises(RuntimeError, match="SuperLink crashed"):
        run_federation(grid(crash_at=dies_after_training_round_2), config)
    resumed = grid()
    run_federation(resumed, config.model_copy(update={"resume": True}))

    assert {m.content["config"]["server-round"] for m in resumed.sent} == {2, 3}
    run_ids = {c.manifest["run_id"] for c in CheckpointStore(config.out_dir).checkpoints()}
    assert len(run_ids) == 1, "the run keeps its id across the restart"
    consortium = parse_entries(config.out_dir / "ledger.jsonl")
    for institution in ("institution_01", "institution_02", "institution_03"):
        own = parse_entries(tmp_path / "institutions" / institution / "ledger.jsonl")
        # Training entries; the count and histogram releases have entries of their own.
        assert [e.round for e in own if e.kind == "train"] == [1, 2, 3]
        theirs = [e for e in consortium if e.institution == institution]
        assert [e.round for e in theirs if e.kind == "train"] == [1, 2, 3]
    assert {e.run_id for e in consortium} == run_ids
