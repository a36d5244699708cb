"""The node's own DP policy: DP-SGD by default in a deployment; opting out is explicit, recorded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, MessageType, RecordDict

from client.app import app, privacy_budget
from privacy.budget import PrivacyConfigError
from privacy.ledger.consortium import EARLIER_KEY, REPLY_KEY, ConsortiumLedger, decode_entry
from privacy.ledger.entries import parse_entries
from shared_models.errors import PrivacyBudgetExceeded
from shared_models.protocol import RoundSettings
from tests.client.test_app import _config, _global_weights, _message


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _node(export: Path, state: Path, **config: str | float) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={
            "data-path": str(export),
            "institution": "uni_north",
            "privacy-state": str(state),
            **config,
        },
        state=RecordDict(),
        run_config={},
    )


def _entry(reply: object) -> dict[str, object]:
    assert not reply.has_error(), reply.error  # type: ignore[attr-defined]
    record = reply.content["privacy"]  # type: ignore[attr-defined]
    return decode_entry(str(record[REPLY_KEY]))


def test_node_requiring_dp_trains_privately_even_when_the_server_asks_for_none(
    export_copy: Path, tmp_path: Path
) -> None:
    config = _config(rounds=3)  # the server proposes no DP
    node = _node(export_copy, tmp_path / "privacy", dp="required")

    reply = app(_message(MessageType.TRAIN, config, _global_weights(config)), node)

    entry = _entry(reply)
    assert entry["private"] is True
    assert entry["epsilon_budget"] == 8.0  # the institution's default budget
    assert 0 < float(entry["epsilon_after"]) <= 8.0  # type: ignore[arg-type]
    assert float(entry["noise_multiplier"]) > 0  # type: ignore[arg-type]
    assert len(parse_entries(tmp_path / "privacy" / "ledger.jsonl")) == 1


def test_institutions_own_budget_wins_over_the_servers_proposal(
    export_copy: Path, tmp_path: Path
) -> None:
    settings = RoundSettings.from_config(_config(dp_epsilon=8.0).train_config(""))
    own = _node(export_copy, tmp_path, **{"dp": "required", "dp-epsilon": 2.0, "dp-delta": 1e-6})
    budget = privacy_budget(own, settings)
    assert (budget.epsilon, budget.delta) == (2.0, 1e-6)

    # Without a budget of its own the node holds 8: a server may ask for less, never more.
    required = _node(export_copy, tmp_path, dp="required")
    for proposed, expected in ((20.0, 8.0), (3.0, 3.0)):
        asked = RoundSettings.from_config(
            _config(dp_epsilon=proposed, dp_delta=1e-3).train_config("")
        )
        budget = privacy_budget(required, asked)
        assert (budget.epsilon, budget.delta) == (expected, 1e-5)

    # Without the key (a simulation) the server's proposal decides, DP or not.
    simulated = _node(export_copy, tmp_path)
    assert privacy_budget(simulated, settings).epsilon == 8.0
    no_dp = RoundSettings.from_config(_config().train_config(""))
    assert privacy_budget(simulated, no_dp) is None


def test_node_opting_out_records_each_round_without_dp_in_the_signed_ledger(
    export_copy: Path, tmp_path: Path
) -> None:
    config = _config(rounds=3)
    node = _node(export_copy, tmp_path / "privacy", dp="off")

    reply = app(
        _message(MessageType.TRAIN, config, _global_weights(config), **{"run-id": "r1"}), node
    )

    entry = _entry(reply)
    assert entry["private"] is False
    assert entry["epsilon_after"] is None  # unbounded: no epsilon may be claimed
    assert entry["run_id"] == "r1"  # the server's own run id, stable across restarts
    assert float(entry["steps"]) > 0  # type: ignore[arg-type]
    # The server accepts it into the consortium ledger like any signed entry.
    assert ConsortiumLedger(tmp_path / "consortium.jsonl").receive(entry)

    # Once a round went without DP, the node refuses to claim DP in this state folder.
    dp_config = _config(rounds=3, dp_epsilon=8.0)
    with pytest.raises(PrivacyBudgetExceeded, match="trained without DP in round 1"):
        app(_message(MessageType.TRAIN, dp_config, _global_weights(dp_config)), node)


def test_node_with_an_invalid_dp_mode_says_which_values_are_valid(
    export_copy: Path, tmp_path: Path
) -> None:
    config = _config()
    node = _node(export_copy, tmp_path, dp="maybe")
    with pytest.raises(PrivacyConfigError, match="'required' or 'off'"):
        app(_message(MessageType.TRAIN, config, _global_weights(config)), node)


def test_retried_round_resends_the_released_update_without_spending_again(
    export_copy: Path, tmp_path: Path
) -> None:
    """A server that crashed before committing round 1 asks for it again after its restart."""
    config = _config(rounds=3, dp_epsilon=8.0)
    weights = _global_weights(config)
    node = _node(export_copy, tmp_path / "privacy")
    first = app(_message(MessageType.TRAIN, config, weights, **{"run-id": "r1"}), node)
    again = app(_message(MessageType.TRAIN, config, weights, **{"run-id": "r1"}), node)

    assert _entry(again) == _entry(first)  # the same signed entry: the round counted once
    for name, array in first.content["arrays"].items():
        assert np.array_equal(array.numpy(), again.content["arrays"][name].numpy())
    ledger = parse_entries(tmp_path / "privacy" / "ledger.jsonl")
    assert [(e.run_id, e.round) for e in ledger] == [("r1", 1)]

    # Other global weights for the same round are a new release: trained and spent.
    moved = {k: v + 0.01 for k, v in weights.items()}
    third = app(_message(MessageType.TRAIN, config, moved, **{"run-id": "r1"}), node)
    assert _entry(third)["seq"] == 1
    assert float(_entry(third)["epsilon_after"]) > float(_entry(first)["epsilon_after"])


def test_server_ledger_fills_a_gap_from_the_earlier_entries_a_reply_carries(
    export_copy: Path, tmp_path: Path
) -> None:
    config = _config(rounds=3, dp_epsilon=8.0)
    node = _node(export_copy, tmp_path / "privacy")
    weights = _global_weights(config)
    app(_message(MessageType.TRAIN, config, weights, **{"run-id": "r1"}), node)  # reply lost
    moved = {k: v + 0.01 for k, v in weights.items()}
    reply = app(
        _message(MessageType.TRAIN, config, moved, **{"run-id": "r1", "server-round": 2}), node
    )

    record = reply.content["privacy"]
    server = ConsortiumLedger(tmp_path / "consortium.jsonl")
    assert server.receive_text(str(record[REPLY_KEY]), earlier=str(record[EARLIER_KEY]))
    assert [(e.seq, e.round) for e in server.entries()] == [(0, 1), (1, 2)]


def test_dp_noise_is_not_fixed_by_the_federation_seed_the_server_knows(
    export_copy: Path, tmp_path: Path
) -> None:
    """Same export, same seed, same round: a server that knows the seed still cannot redraw
    the noise (or the Poisson sample) and subtract it from an update."""
    config = _config(rounds=3, dp_epsilon=8.0)
    weights = _global_weights(config)
    updates = []
    for twin in ("a", "b"):
        node = _node(export_copy, tmp_path / twin)
        reply = app(_message(MessageType.TRAIN, config, weights, **{"run-id": twin}), node)
        updates.append({k: v.numpy() for k, v in reply.content["arrays"].items()})
    assert any(not np.array_equal(updates[0][k], updates[1][k]) for k in updates[0])
