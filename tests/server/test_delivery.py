"""After the last round every node receives the final model; who adopted it is logged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from client.early_warning.adopt import latest_adopted
from server.checkpoints import CheckpointStore
from server.config import FederationConfig
from server.delivery import DELIVERY_FILE, delivery_summary
from server.federation import global_model, run_federation
from shared_models.data.contract import default_spec
from shared_models.models.artifact import WEIGHTS_FILE
from shared_models.models.weights import load_tensors, named_weights
from shared_models.protocol import NodeConfig, weights_sha256
from tests.server.conftest import InProcessGrid

pytestmark = pytest.mark.usefixtures("flower_task")


def test_every_node_with_a_home_adopts_the_final_checkpoint_and_the_server_logs_who(
    consortium_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exports = [consortium_dir / f"institution_0{i}" for i in (1, 2, 3)]
    grid = InProcessGrid(exports)
    homes = {}
    for node_id, export in zip((1, 2), exports, strict=False):
        homes[export.name] = tmp_path / "homes" / export.name
        own = NodeConfig(
            data_path=str(export),
            privacy_state=str(tmp_path / "privacy" / export.name),
            dp="off",  # recorded in the node's ledger: the run it took part in
            home_path=str(homes[export.name]),
        )
        grid.contexts[node_id].node_config.update(own.to_node_config())
    # Node 3 trains in the run too, but keeps no home: it is told, and keeps nothing.
    config = FederationConfig(
        model_overrides={"hidden_size": 8},
        rounds=1,
        local_epochs=1,
        min_nodes=3,
        out_dir=tmp_path / "run",
    )

    with caplog.at_level(logging.INFO, logger="server.delivery"):
        run_federation(grid, config, deliver=True)

    last = CheckpointStore(config.out_dir).latest()
    assert last is not None
    model = global_model(config, default_spec())
    CheckpointStore(config.out_dir).load(last, model)
    final = named_weights(model)
    report = json.loads((config.out_dir / DELIVERY_FILE).read_text())
    assert report["adopted"] == sorted(homes)
    assert report["round"] == 1 and report["run_id"] == last.manifest["run_id"]
    assert report["weights_sha256"] == weights_sha256(final)
    assert list(report["not_adopted"]) == ["institution_03"]
    assert "no home" in report["not_adopted"]["institution_03"]
    assert "adopted by 2 of 3 node(s): institution_01, institution_02" in caplog.text
    # What `edufl server start` prints after the run, from delivery.json.
    assert delivery_summary(config.out_dir) == [
        f"final model (round 1, sha256 {weights_sha256(final)[:12]}) adopted by 2 of 3 "
        "node(s): institution_01, institution_02",
        "  not adopted by institution_03: the node keeps no models (no home)",
    ]
    for home in homes.values():
        adopted = load_tensors(latest_adopted(home) / WEIGHTS_FILE)
        assert all(np.array_equal(adopted[k].numpy(), final[k]) for k in final)


def test_simulated_runs_deliver_nothing(consortium_dir: Path, tmp_path: Path) -> None:
    exports = [consortium_dir / f"institution_0{i}" for i in (1, 2)]
    grid = InProcessGrid(exports)
    config = FederationConfig(
        model_overrides={"hidden_size": 8}, rounds=1, min_nodes=2, out_dir=tmp_path / "run"
    )
    run_federation(grid, config)
    assert {m.metadata.message_type for m in grid.sent} == {"train", "evaluate"}
    assert not (config.out_dir / DELIVERY_FILE).exists()
