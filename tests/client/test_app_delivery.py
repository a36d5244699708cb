"""The final model's delivery to a node: verified, adopted into its home, or refused."""

from __future__ import annotations

import json
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
from client.early_warning.adopt import ADOPTION_FILE, MODELS, DeliveryRefused, latest_adopted
from privacy.ledger.institution import record_non_private_round
from server.config import FederationConfig
from server.federation import global_model
from shared_models.data.contract import default_spec
from shared_models.models.artifact import CARD_FILE, WEIGHTS_FILE
from shared_models.models.weights import load_tensors, named_weights
from shared_models.protocol import (
    Delivery,
    DeliveryError,
    RoundSettings,
    read_acknowledgement,
    weights_sha256,
)

SPEC = default_spec()
RUN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """The node's privacy state: its ledger shows it trained rounds 1 and 2 of ``RUN``."""
    folder = tmp_path / "privacy"
    for server_round in (1, 2):
        record_non_private_round(
            folder,
            institution="uni_north",
            run_id=RUN,
            server_round=server_round,
            node="7",
            n_students=200,
            steps=3,
        )
    return folder


@pytest.fixture
def node(export_copy: Path, state: Path, tmp_path: Path) -> Context:
    return _context(export_copy, state, tmp_path / "home")


def _context(export: Path, state: Path, home: Path | None) -> Context:
    config = {"data-path": str(export), "institution": "uni_north", "privacy-state": str(state)}
    if home is not None:
        config["home-path"] = str(home)
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    config = FederationConfig(model_overrides={"hidden_size": 8}, seed=seed)
    return named_weights(global_model(config, SPEC))


def _delivery(
    weights: dict[str, np.ndarray],
    *,
    checksum: str | None = None,
    server_round: int = 2,
    **changes: Any,
) -> Message:
    config = FederationConfig(model_overrides={"hidden_size": 8})
    settings = RoundSettings.from_config(
        config.train_config(changes.pop("fingerprint", SPEC.fingerprint), changes.pop("run", RUN))
        | {"server-round": server_round}
    )
    record = Delivery(settings, checksum or weights_sha256(weights)).to_config()
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
            "delivery": ConfigRecord(record | changes),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id="d1",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="delivery-2",
        created_at=time.time(),
        ttl=3600,
        message_type=MessageType.QUERY,
    )
    return Message(content=content, metadata=metadata)


def _models(home: Path) -> list[str]:
    return sorted(p.name for p in (home / MODELS).iterdir() if p.is_dir())


def test_valid_delivery_is_adopted_into_the_home_and_acknowledged_with_nothing_else(
    node: Context, tmp_path: Path
) -> None:
    weights = _weights()
    reply = app(_delivery(weights), node)

    assert not reply.has_error(), reply.error
    # Only the acknowledgement and the institution's name leave the node.
    assert set(reply.content) == {"delivery", "node"}
    assert dict(reply.content["delivery"]) == {
        "adopted": True,
        "weights-sha256": weights_sha256(weights),
    }
    ack = read_acknowledgement(reply.content.config_records)
    assert ack.adopted and ack.institution == "uni_north"

    home = tmp_path / "home"
    folder = latest_adopted(home)
    assert (folder / CARD_FILE).is_file() and (folder / "calibration.json").is_file()
    adopted = {k: v.numpy() for k, v in load_tensors(folder / WEIGHTS_FILE).items()}
    assert adopted.keys() == weights.keys()
    assert all(np.array_equal(adopted[k], weights[k]) for k in weights)
    record = json.loads((folder / ADOPTION_FILE).read_text())
    assert record["run_id"] == RUN and record["round"] == 2
    assert record["delivered_sha256"] == weights_sha256(weights)
    assert record["spec_fingerprint"] == SPEC.fingerprint

    # The server asking again (a lost acknowledgement) adopts nothing twice.
    again = app(_delivery(weights), node)
    assert dict(again.content["delivery"])["adopted"] is True
    assert _models(home) == [folder.name]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"checksum": "0" * 64}, "do not match the checksum"),
        ({"fingerprint": "f" * 64}, "trained on contract ffffffffffff"),
        ({"run": "another-run"}, "did not take part in that run"),
        ({"server_round": 1}, "trained round 2 of the run"),
    ],
)
def test_delivery_failing_a_check_is_refused_and_the_previous_model_stays_latest(
    node: Context, tmp_path: Path, change: dict[str, Any], why: str
) -> None:
    home = tmp_path / "home"
    app(_delivery(_weights()), node)
    previous = latest_adopted(home)

    with pytest.raises(DeliveryRefused, match=why) as refused:
        app(_delivery(_weights(seed=1), **change), node)

    assert "keeps its previous model" in str(refused.value)
    assert latest_adopted(home) == previous
    assert _models(home) == [previous.name]


def test_weights_altered_on_the_way_are_refused(node: Context, tmp_path: Path) -> None:
    weights = _weights()
    altered = {k: v.copy() for k, v in weights.items()}
    first = sorted(altered)[0]
    altered[first].flat[0] += 1.0
    with pytest.raises(DeliveryRefused, match="checksum"):
        app(_delivery(altered, checksum=weights_sha256(weights)), node)
    assert not (tmp_path / "home" / MODELS).exists()


def test_node_without_a_ledger_of_the_run_refuses(export_copy: Path, tmp_path: Path) -> None:
    node = _context(export_copy, tmp_path / "empty-state", tmp_path / "home")
    with pytest.raises(DeliveryRefused, match="keeps no ledger"):
        app(_delivery(_weights()), node)


def test_node_without_a_home_acknowledges_but_adopts_nothing(
    export_copy: Path, state: Path
) -> None:
    weights = _weights()
    reply = app(_delivery(weights), _context(export_copy, state, None))
    assert dict(reply.content["delivery"]) == {
        "adopted": False,
        "weights-sha256": weights_sha256(weights),
    }


def test_delivery_without_a_checksum_is_not_one_the_node_can_verify(node: Context) -> None:
    message = _delivery(_weights())
    del message.content["delivery"]["weights-sha256"]
    with pytest.raises(DeliveryError, match="lacks weights-sha256"):
        app(message, node)
