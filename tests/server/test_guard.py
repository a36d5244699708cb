"""The update guard: bad replies never reach aggregation, and the log names who sent them."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg, FedMedian

from server.guard import GuardConfig, GuardedStrategy
from server.strategies import weighted_metrics
from tests.server.conftest import reply

GLOBAL = {
    "rnn.weight": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "head.bias": np.array([0.1], dtype=np.float32),
}


def _update(seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        k: v + scale * rng.standard_normal(v.shape).astype(np.float32) for k, v in GLOBAL.items()
    }


def _good_replies() -> list[Message]:
    return [
        reply(node, _update(node), num_examples=10 * node, institution=f"uni_{node}")
        for node in (1, 2, 3)
    ]


def _guarded(config: GuardConfig | None = None, inner: FedAvg | None = None) -> GuardedStrategy:
    strategy = GuardedStrategy(inner or FedAvg(train_metrics_aggr_fn=weighted_metrics), config)
    # configure_train records the round's global arrays: the guard's reference.
    strategy.configure_train(
        1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), _cfg(), _NoGrid()
    )
    return strategy


def _cfg() -> ConfigRecord:
    return ConfigRecord({})


class _NoGrid:
    """Sampling needs node ids only; no message leaves this test."""

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3, 13]


def _arrays(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    assert record is not None
    return {k: v.numpy() for k, v in record.items()}


def _nan(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays["rnn.weight"][0, 0] = np.nan
    return arrays


def _reshaped(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays["rnn.weight"] = arrays["rnn.weight"].reshape(4, 3)
    return arrays


def _renamed(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays["_module.head.bias"] = arrays.pop("head.bias")
    return arrays


def _huge(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v * 1000 for k, v in arrays.items()}


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_nan, "non-finite"),
        (_reshaped, "wrong shape"),
        (_renamed, "wrong keys"),
        (_huge, "update norm"),
    ],
)
def test_guard_rejects_a_bad_update_names_the_node_and_aggregates_only_the_good_ones(
    damage: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    reason: str,
    flower_task: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = reply(13, damage(_update(13)), num_examples=30, institution="uni_rogue")
    with caplog.at_level(logging.WARNING, logger="server.guard"):
        arrays, metrics = _guarded().aggregate_train(1, [*_good_replies(), bad])

    expected, expected_metrics = FedAvg(train_metrics_aggr_fn=weighted_metrics).aggregate_train(
        1, _good_replies()
    )
    for name, value in _arrays(expected).items():
        np.testing.assert_allclose(_arrays(arrays)[name], value, rtol=1e-6)
    assert metrics is not None and expected_metrics is not None
    assert metrics["num-examples"] == expected_metrics["num-examples"] == 60
    assert "node 13 (uni_rogue)" in caplog.text
    assert reason in caplog.text


def test_guard_records_every_rejection_of_the_round(flower_task: None) -> None:
    strategy = _guarded()
    replies = [
        *_good_replies(),
        reply(11, _nan(_update(11))),
        reply(12, _reshaped(_update(12)), institution="uni_12"),
    ]
    strategy.aggregate_train(1, replies)
    assert [(r.node_id, r.institution) for r in strategy.rejections] == [(11, ""), (12, "uni_12")]


def test_absolute_norm_cap_rejects_a_huge_update_even_with_two_nodes(flower_task: None) -> None:
    # With two replies the median cannot single one out; the absolute cap must.
    strategy = _guarded(GuardConfig(max_update_norm=5.0))
    arrays, _ = strategy.aggregate_train(1, [_good_replies()[0], reply(13, _huge(_update(13)))])
    np.testing.assert_allclose(_arrays(arrays)["head.bias"], _update(1)["head.bias"], rtol=1e-6)
    assert [r.node_id for r in strategy.rejections] == [13]


def test_a_normal_spread_of_updates_passes_the_guard(flower_task: None) -> None:
    strategy = _guarded()
    replies = [reply(n, _update(n, scale=0.01 * n)) for n in range(1, 7)]
    strategy.aggregate_train(1, replies)
    assert strategy.rejections == []


def test_guard_rejects_a_reply_claiming_no_examples(flower_task: None) -> None:
    strategy = _guarded()
    strategy.aggregate_train(1, [*_good_replies(), reply(13, _update(13), num_examples=0)])
    assert [r.node_id for r in strategy.rejections] == [13]
    assert "num-examples" in strategy.rejections[0].reason


def test_reply_with_other_metric_keys_is_rejected_instead_of_aborting_the_round(
    flower_task: None,
) -> None:
    # Flower refuses to aggregate replies whose metric keys differ; one bad node must not
    # cost the whole round.
    odd = reply(13, _update(13), metrics={"accuracy": 0.9})
    arrays, _ = _guarded().aggregate_train(1, [*_good_replies(), odd])
    assert arrays is not None
    evaluation = _guarded().aggregate_evaluate(
        1,
        [
            reply(1, None, metrics={"loss": 0.4}, message_type="evaluate"),
            reply(2, None, metrics={"loss": 0.6}, message_type="evaluate"),
            reply(13, None, metrics={"auc": 1.0}, message_type="evaluate"),
        ],
    )
    assert evaluation is not None and evaluation["loss"] == pytest.approx(0.5)


def test_when_every_update_is_rejected_the_model_is_left_unchanged(flower_task: None) -> None:
    arrays, _ = _guarded().aggregate_train(1, [reply(1, _nan(_update(1)))])
    assert arrays is None


def test_guard_works_in_front_of_a_robust_strategy(flower_task: None) -> None:
    strategy = _guarded(inner=FedMedian(train_metrics_aggr_fn=weighted_metrics))
    arrays, _ = strategy.aggregate_train(1, [*_good_replies(), reply(13, _nan(_update(13)))])
    median = np.median(np.stack([_update(n)["rnn.weight"] for n in (1, 2, 3)]), axis=0)
    np.testing.assert_allclose(_arrays(arrays)["rnn.weight"], median, rtol=1e-6)


def test_guard_refuses_to_aggregate_before_a_round_was_configured() -> None:
    with pytest.raises(RuntimeError, match="configure_train"):
        GuardedStrategy(FedAvg()).aggregate_train(1, _good_replies())


def test_update_replayed_from_an_earlier_round_is_rejected_and_named(flower_task: None) -> None:
    strategy = _guarded()
    strategy.aggregate_train(1, _good_replies())
    assert not strategy.rejections

    # Round 2: node 2 sends its round-1 update again; the others train afresh.
    strategy.configure_train(
        2, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), _cfg(), _NoGrid()
    )
    replies = [
        reply(1, _update(11), num_examples=10, institution="uni_1"),
        reply(2, _update(2), num_examples=20, institution="uni_2"),  # the round-1 bytes
        reply(3, _update(13), num_examples=30, institution="uni_3"),
    ]
    strategy.aggregate_train(2, replies)
    assert [(r.node_id, r.institution) for r in strategy.rejections] == [(2, "uni_2")]
    assert "replayed update" in strategy.rejections[0].reason
    assert "round 1" in strategy.rejections[0].reason


def test_one_update_sent_by_two_nodes_in_a_round_is_kept_once(flower_task: None) -> None:
    strategy = _guarded()
    copied = _update(1)
    replies = [
        reply(1, copied, num_examples=10, institution="uni_1"),
        reply(2, {k: v.copy() for k, v in copied.items()}, num_examples=10, institution="uni_2"),
        reply(3, _update(3), num_examples=10, institution="uni_3"),
    ]
    strategy.aggregate_train(1, replies)
    assert [r.node_id for r in strategy.rejections] == [2]
    assert "node 1" in strategy.rejections[0].reason


ENROLLED = {1: "uni_1", 2: "uni_2", 3: "uni_3", 13: "uni_13"}


def _enrolled_guard() -> GuardedStrategy:
    strategy = GuardedStrategy(
        FedAvg(train_metrics_aggr_fn=weighted_metrics), None, lambda: ENROLLED
    )
    strategy.configure_train(
        1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), _cfg(), _NoGrid()
    )
    return strategy


def test_a_node_claiming_10_to_the_12_examples_weighs_at_most_its_bounded_share(
    flower_task: None, caplog: pytest.LogCaptureFixture
) -> None:
    target = _update(99, scale=0.05)  # where the attacker wants the model
    attack = reply(13, target, num_examples=10**12, institution="uni_13")
    with caplog.at_level(logging.WARNING, logger="server.guard"):
        arrays, _ = _enrolled_guard().aggregate_train(1, [*_good_replies(), attack])
    # Its weight is cut to 3 x the median of the others' claims (20): 60 of 120.
    bounded = reply(13, target, num_examples=60, institution="uni_13")
    expected, _ = FedAvg(train_metrics_aggr_fn=weighted_metrics).aggregate_train(
        1, [*_good_replies(), bounded]
    )
    for name, value in _arrays(expected).items():
        np.testing.assert_allclose(_arrays(arrays)[name], value, rtol=1e-6)
    honest = _arrays(FedAvg().aggregate_train(1, _good_replies())[0])
    distance = sum(np.linalg.norm(_arrays(arrays)[k] - target[k]) for k in target)
    start = sum(np.linalg.norm(honest[k] - target[k]) for k in target)
    assert distance >= 0.45 * start  # not the attacker's model (unbounded: distance ~0)
    assert "node 13 (uni_13) claimed 1000000000000 examples" in caplog.text


def test_a_reply_naming_another_institution_or_from_an_unenrolled_node_is_rejected(
    flower_task: None,
) -> None:
    strategy = _enrolled_guard()
    impostor = reply(13, _update(13), num_examples=30, institution="uni_1")
    stranger = reply(14, _update(14), num_examples=30, institution="uni_14")
    arrays, _ = strategy.aggregate_train(1, [*_good_replies(), impostor, stranger])
    expected, _ = FedAvg().aggregate_train(1, _good_replies())
    for name, value in _arrays(expected).items():
        np.testing.assert_allclose(_arrays(arrays)[name], value, rtol=1e-6)
    assert [(r.node_id, r.institution) for r in strategy.rejections] == [(13, "uni_13"), (14, "")]
    assert "claims to come from 'uni_1'" in strategy.rejections[0].reason
    assert "not the node of any enrolled institution" in strategy.rejections[1].reason
    # The registry names the sender, whatever the reply says.
    assert strategy.institution(reply(2, None, institution="uni_9")) == "uni_2"


def test_without_a_registry_weights_and_names_are_taken_as_claimed(flower_task: None) -> None:
    strategy = _guarded()
    _, metrics = strategy.aggregate_train(
        1, [*_good_replies(), reply(13, _update(13), num_examples=600, institution="uni_x")]
    )
    assert metrics is not None and metrics["num-examples"] == 660
    assert strategy.institution(reply(13, None, institution="uni_x")) == "uni_x"
