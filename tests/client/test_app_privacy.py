"""The node's own DP policy: DP-SGD by default in a deployment; opting out is explicit, recorded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, MessageType, RecordDict

from client.app import app, privacy_budget
from privacy.budget import PrivacyConfigError, histogram_noise_std
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
    record = reply.content["node"]  # type: ignore[attr-defined]
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
    # The run's student count is released (noised) first, then the round: both accounted.
    ledger = parse_entries(tmp_path / "privacy" / "ledger.jsonl")
    assert [e.kind for e in ledger] == ["count", "train"]


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
    assert dict(again.content["metrics"]) == dict(first.content["metrics"])
    ledger = parse_entries(tmp_path / "privacy" / "ledger.jsonl")
    assert [(e.run_id, e.round, e.kind) for e in ledger] == [("r1", 1, "count"), ("r1", 1, "train")]

    # Other global weights for the same round are a new release: trained and spent (the
    # count is not released again in the same run).
    moved = {k: v + 0.01 for k, v in weights.items()}
    third = app(_message(MessageType.TRAIN, config, moved, **{"run-id": "r1"}), node)
    assert _entry(third)["seq"] == 2
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

    record = reply.content["node"]
    server = ConsortiumLedger(tmp_path / "consortium.jsonl")
    assert server.receive_text(str(record[REPLY_KEY]), earlier=str(record[EARLIER_KEY]))
    assert [(e.seq, e.round, e.kind) for e in server.entries()] == [
        (0, 1, "count"),
        (1, 1, "train"),
        (2, 2, "train"),
    ]


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


def test_dp_train_reply_carries_only_the_update_the_released_count_and_ledger_entries(
    export_copy: Path, tmp_path: Path
) -> None:
    """The audit's finding 1: an exact train/loss told a crafted-weights server whether a
    student trained. Under DP nothing exact may leave: no loss, time, steps or val/ metric."""
    config = _config(rounds=3, dp_epsilon=8.0)
    reply = app(
        _message(MessageType.TRAIN, config, _global_weights(config), **{"run-id": "r1"}),
        _node(export_copy, tmp_path / "privacy"),
    )

    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"num-examples", "noise/count-std"}
    assert metrics["noise/count-std"] == 20.0
    count, train = parse_entries(tmp_path / "privacy" / "ledger.jsonl")
    # The aggregation weight and the ledger's n are the released count, marked as noised.
    assert metrics["num-examples"] == count.n_students == train.n_students
    assert (count.kind, count.n_noised, count.noise_multiplier) == ("count", True, 20.0)
    assert (count.sample_rate, count.steps) == (1.0, 1)
    assert train.neighbouring == "add-remove-one-student" and train.n_noised
    # The count entry rides along as an earlier entry of the run; the round's as the entry.
    earlier = reply.content["node"][EARLIER_KEY]
    assert '"kind":"count"' in str(earlier)
    assert _entry(reply)["kind"] == "train"


def test_dp_evaluation_answers_with_noised_histograms_accounted_in_the_ledger(
    export_copy: Path, tmp_path: Path
) -> None:
    config = _config(rounds=3, dp_epsilon=8.0)
    node = _node(export_copy, tmp_path / "privacy")
    weights = _global_weights(config)
    train = app(_message(MessageType.TRAIN, config, weights, **{"run-id": "r1"}), node)
    message = _message(MessageType.EVALUATE, config, weights, **{"run-id": "r1"})
    reply = app(message, node)

    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"num-examples", "risk/hist-pos", "risk/hist-neg", "noise/hist-std"}
    assert len(metrics["risk/hist-pos"]) == len(metrics["risk/hist-neg"]) == 10
    # One evaluation planned (the config's default): the per-evaluation std of privacy.budget.
    assert metrics["noise/hist-std"] == histogram_noise_std(config.planned_evaluations)
    # The same released count as training: one count release per run.
    assert metrics["num-examples"] == train.content["metrics"]["num-examples"]
    entry = _entry(reply)
    assert (entry["kind"], entry["sample_rate"], entry["steps"]) == ("histogram", 1.0, 1)
    assert float(entry["epsilon_after"]) > float(_entry(train)["epsilon_after"])
    kinds = [e.kind for e in parse_entries(tmp_path / "privacy" / "ledger.jsonl")]
    assert kinds == ["count", "train", "histogram"]

    # A retried evaluation of the same weights re-sends the release: no second draw or spend.
    again = app(message, node)
    assert dict(again.content["metrics"]) == metrics
    assert len(parse_entries(tmp_path / "privacy" / "ledger.jsonl")) == 3


def test_node_declines_a_round_whose_noise_is_above_its_ceiling_in_one_line(
    export_copy: Path, tmp_path: Path
) -> None:
    config = _config(rounds=3, dp_epsilon=8.0)
    node = _node(export_copy, tmp_path / "privacy", **{"dp-max-noise": 0.1})

    with pytest.raises(PrivacyBudgetExceeded, match=r"above this node's ceiling 0\.1") as caught:
        app(_message(MessageType.TRAIN, config, _global_weights(config)), node)

    assert "\n" not in str(caught.value)
    kinds = [e.kind for e in parse_entries(tmp_path / "privacy" / "ledger.jsonl")]
    assert kinds == ["count"]  # no round trained or spent


def test_an_error_reply_carries_no_value_of_the_export(export_copy: Path, tmp_path: Path) -> None:
    """Error replies are releases too: a failure that may quote the export keeps its text home."""
    import pandas as pd

    from client.app import NodeTaskFailed
    from shared_models.data.contract import load_spec
    from shared_models.data.loader import load_cohort
    from shared_models.errors import DataContractError

    activity = export_copy / "activity.csv"
    frame = pd.read_csv(activity)
    column = load_spec(None).dynamic[0].name
    frame[column] = frame[column].astype(object)
    frame.loc[3, column] = "SECRET-31337"
    frame.to_csv(activity, index=False)
    with pytest.raises(DataContractError, match="SECRET-31337"):  # what the node's log says
        load_cohort(export_copy, load_spec(None))
    config = _config()
    node = _node(export_copy, tmp_path / "privacy", dp="required")
    with pytest.raises(NodeTaskFailed) as failed:
        app(_message(MessageType.TRAIN, config, _global_weights(config)), node)
    assert "SECRET-31337" not in str(failed.value)
    assert "node's log" in str(failed.value)
