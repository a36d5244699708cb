"""Strategies by name, NaN-aware metric averaging, and strategy state that survives a restart."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.exception import AggregationError

from server.strategies import (
    STRATEGY_NAMES,
    UnknownStrategyError,
    build_strategy,
    restore_strategy_state,
    strategy_state,
    weighted_metrics,
)
from tests.server.conftest import reply

FLOWER_CLASS = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedadagrad": "FedAdagrad",
    "fedavgm": "FedAvgM",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
    "krum": "Krum",
    "multikrum": "MultiKrum",
}


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_each_strategy_name_builds_flowers_own_class_with_the_sampling_settings(name: str) -> None:
    strategy = build_strategy(name, fraction_train=0.5, fraction_evaluate=0.25, min_nodes=3)
    assert isinstance(strategy, getattr(flwr_strategies, FLOWER_CLASS[name]))
    assert (strategy.fraction_train, strategy.fraction_evaluate) == (0.5, 0.25)
    assert strategy.min_available_nodes == strategy.min_train_nodes == 3


def test_the_required_strategies_are_all_available() -> None:
    required = {"fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg"}
    assert required <= set(STRATEGY_NAMES)


def test_unknown_strategy_name_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownStrategyError) as err:
        build_strategy("fedaverage")
    assert "'fedaverage'" in str(err.value)
    for name in STRATEGY_NAMES:
        assert name in str(err.value)


def test_unknown_strategy_parameter_lists_the_accepted_ones() -> None:
    with pytest.raises(UnknownStrategyError, match="accepts: eta, eta_l, beta_1, beta_2, tau"):
        build_strategy("fedadam", params={"learning_rate": 0.1})


def test_strategy_parameters_reach_the_strategy() -> None:
    strategy = build_strategy("fedtrimmedavg", params={"beta": 0.1})
    assert strategy.beta == 0.1  # type: ignore[attr-defined]


def test_fedprox_carries_its_mu_in_every_train_message(flower_task: None) -> None:
    strategy = build_strategy("fedprox", proximal_mu=0.3, min_nodes=1)
    arrays = ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({}), _Grid()))
    assert [m.content["config"]["proximal-mu"] for m in messages] == [0.3, 0.3]


def test_proximal_mu_is_refused_for_a_strategy_that_would_ignore_it() -> None:
    with pytest.raises(UnknownStrategyError, match="fedprox"):
        build_strategy("fedavg", proximal_mu=0.1)


class _Grid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _record(weight: float, **metrics: float) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"num-examples": weight, **metrics})})


def test_weighted_metrics_skip_a_node_whose_metric_is_undefined() -> None:
    records = [_record(10, auc=0.8, loss=1.0), _record(30, auc=math.nan, loss=2.0)]
    merged = weighted_metrics(records, "num-examples")
    assert merged["auc"] == pytest.approx(0.8)  # not NaN: the other node had one class
    assert merged["loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert merged["num-examples"] == 40


def test_weighted_metrics_stay_nan_when_no_node_defines_them() -> None:
    merged = weighted_metrics([_record(5, auc=math.nan)], "num-examples")
    assert math.isnan(float(merged["auc"]))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimizer_state_survives_a_save_and_restore(name: str, flower_task: None) -> None:
    params = {"server_momentum": 0.9} if name == "fedavgm" else {}
    strategy = build_strategy(name, min_nodes=1, params=params)
    start = {"w": np.zeros(3, dtype=np.float32)}
    strategy.configure_train(1, ArrayRecord({"w": Array(start["w"])}), ConfigRecord({}), _Grid())
    strategy.aggregate_train(1, [reply(1, {"w": np.ones(3, dtype=np.float32)})])
    state = strategy_state(strategy)
    assert state, f"{name} keeps server-side state between rounds"

    fresh = build_strategy(name, min_nodes=1, params=params)
    assert strategy_state(fresh) == {}
    restore_strategy_state(fresh, {k: v.copy() for k, v in state.items()})
    restored = strategy_state(fresh)
    assert restored.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(restored[key], value)


def test_stateless_strategies_have_no_state_to_save() -> None:
    assert strategy_state(build_strategy("fedavg")) == {}


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_server_optimizers_pair_arrays_by_name_whatever_order_the_nodes_send(
    name: str, flower_task: None
) -> None:
    """Under DP an LSTM node sends weight_ih, weight_hh, bias_ih, bias_hh; the global model
    holds weight_ih, bias_ih, weight_hh, bias_hh. Flower's FedAvgM paired them by position."""
    params = {"server_momentum": 0.5} if name == "fedavgm" else {}
    strategy = build_strategy(name, min_nodes=1, params=params)
    start = {
        "rnn.weight_ih_l0": np.zeros((8, 2), dtype=np.float32),
        "rnn.bias_ih_l0": np.zeros(8, dtype=np.float32),
        "rnn.weight_hh_l0": np.zeros((8, 2), dtype=np.float32),
        "rnn.bias_hh_l0": np.zeros(8, dtype=np.float32),
    }
    start_record = ArrayRecord({k: Array(v) for k, v in start.items()})
    strategy.configure_train(1, start_record, ConfigRecord({}), _Grid())
    order = ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"]
    sent = {k: np.full_like(start[k], i + 1.0) for i, k in enumerate(order)}
    arrays, _ = strategy.aggregate_train(1, [reply(1, sent)])
    assert arrays is not None and list(arrays.keys()) == list(start)
    for key in arrays:
        value = arrays[key].numpy()
        assert value.shape == start[key].shape
        moved = np.sign(value - start[key])
        assert (moved == np.sign(sent[key] - start[key])).all(), key


def test_a_reply_with_other_array_names_is_refused_by_the_server_step(flower_task: None) -> None:
    strategy = build_strategy("fedavgm", min_nodes=1, params={"server_momentum": 0.5})
    start = ArrayRecord({"a": Array(np.zeros(2, dtype=np.float32))})
    strategy.configure_train(1, start, ConfigRecord({}), _Grid())
    with pytest.raises(AggregationError, match=r"missing \['a'\], unexpected \['b'\]"):
        strategy.aggregate_train(1, [reply(1, {"b": np.ones(2, dtype=np.float32)})])
