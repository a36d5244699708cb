"""The ClientApp, called with real Flower messages: what it sends back, and what it refuses."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)

from client.app import app
from server.config import FederationConfig
from server.federation import global_model
from server.strategies import build_strategy
from shared_models.data.contract import default_spec
from shared_models.data.loader import load_cohort
from shared_models.data.node import prepare_node_data
from shared_models.errors import DataContractError
from shared_models.models.weights import named_weights

SPEC = default_spec()


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def node(export_copy: Path) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(export_copy), "institution": "uni_north"},
        state=RecordDict(),
        run_config={},
    )


def _config(**changes: Any) -> FederationConfig:
    return FederationConfig(
        **({"model_overrides": {"hidden_size": 8}, "local_epochs": 1} | changes)
    )


def _global_weights(config: FederationConfig) -> dict[str, np.ndarray]:
    return named_weights(global_model(config, SPEC))


def _message(
    message_type: str,
    config: FederationConfig,
    weights: dict[str, np.ndarray],
    **extra: bool | int | float | str,
) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
            "config": ConfigRecord(
                config.train_config(SPEC.fingerprint) | {"server-round": 1, **extra}
            ),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def _all_values(content: RecordDict) -> list[Any]:
    values: list[Any] = []
    for record in content.values():
        values += list(record.values())
    return values


def test_train_reply_holds_only_the_weights_and_aggregate_metrics(
    node: Context, export_copy: Path
) -> None:
    config = _config()
    weights = _global_weights(config)
    reply = app(_message(MessageType.TRAIN, config, weights), node)

    assert not reply.has_error()
    assert set(reply.content) == {"arrays", "metrics", "node"}
    arrays = reply.content["arrays"]
    assert {k: v.shape for k, v in arrays.items()} == {k: v.shape for k, v in weights.items()}
    metrics = reply.content["metrics"]
    assert all(isinstance(v, int | float) for v in metrics.values()), "scalars only, no lists"
    split = prepare_node_data(export_copy, SPEC, seed=config.seed, institution="uni_north")
    assert metrics["num-examples"] == len(split.train)
    # Without DP (the server proposes none, the node sets no policy) the exact metrics stay;
    # under DP they never leave (test_app_privacy: only released values).
    assert {"train/loss", "val/loss", "val/risk/roc_auc"} <= set(metrics)
    assert dict(reply.content["node"]) == {"institution": "uni_north"}

    # No student identifier anywhere in the reply, and no array beyond the model's own weights
    # (checked above: same names, same shapes), so no per-student prediction can ride along.
    student_ids = {str(s) for s in load_cohort(export_copy, SPEC).student_ids}
    strings = {v for v in _all_values(reply.content) if isinstance(v, str)}
    assert strings == {"uni_north"}
    assert not student_ids & strings


def test_train_changes_the_weights_it_was_sent(node: Context) -> None:
    config = _config()
    weights = _global_weights(config)
    reply = app(_message(MessageType.TRAIN, config, weights), node)
    moved = sum(
        float(np.abs(reply.content["arrays"][k].numpy() - v).sum()) for k, v in weights.items()
    )
    assert moved > 0


def test_evaluate_reply_holds_test_split_metrics_only(node: Context, export_copy: Path) -> None:
    config = _config()
    reply = app(_message(MessageType.EVALUATE, config, _global_weights(config)), node)

    assert set(reply.content) == {"metrics", "node"}
    metrics = reply.content["metrics"]
    split = prepare_node_data(export_copy, SPEC, seed=config.seed, institution="uni_north")
    assert metrics["num-examples"] == len(split.test)
    assert {"loss", "risk/roc_auc", "risk/accuracy", "risk/f1"} <= set(metrics)
    assert 0.0 <= float(metrics["risk/accuracy"]) <= 1.0


def _update_norm(node: Context, strategy: str, mu: float) -> float:
    """Train once with the strategy's own train message; how far the weights moved."""
    config = _config(local_epochs=3)
    weights = _global_weights(config)
    chosen = build_strategy(strategy, proximal_mu=mu, min_nodes=1)
    arrays = ArrayRecord({k: Array(v) for k, v in weights.items()})
    config_record = ConfigRecord(config.train_config(SPEC.fingerprint))
    (sent,) = chosen.configure_train(1, arrays, config_record, _Grid())
    message = Message(content=sent.content, metadata=_message("train", config, weights).metadata)
    reply = app(message, node)
    squared = sum(
        float(((reply.content["arrays"][k].numpy() - v) ** 2).sum()) for k, v in weights.items()
    )
    return squared**0.5


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [7]


@pytest.fixture
def flower_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_fedprox_mu_reaches_the_local_loss_and_holds_the_update_near_the_global_model(
    node: Context, flower_identity: None
) -> None:
    plain = _update_norm(node, "fedavg", 0.0)
    proximal = _update_norm(node, "fedprox", 50.0)
    assert proximal < 0.5 * plain


def test_node_refuses_a_server_with_another_data_contract(node: Context) -> None:
    config = _config()
    msg = _message(
        MessageType.TRAIN, config, _global_weights(config), **{"spec-fingerprint": "f" * 64}
    )
    with pytest.raises(DataContractError, match="fingerprint ffffffffffff"):
        app(msg, node)


def test_node_without_a_data_path_says_how_to_set_one(node: Context) -> None:
    del node.node_config["data-path"]
    config = _config()
    with pytest.raises(DataContractError, match="--node-config 'data-path="):
        app(_message(MessageType.TRAIN, config, _global_weights(config)), node)


def test_weights_of_another_architecture_are_refused_by_name(node: Context) -> None:
    config = _config()
    weights = _global_weights(config)
    weights["_module.rnn.weight"] = weights.pop(next(iter(weights)))
    with pytest.raises(ValueError, match=re.escape("unexpected ['_module.rnn.weight']")):
        app(_message(MessageType.TRAIN, config, weights), node)
