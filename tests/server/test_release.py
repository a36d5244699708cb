"""DP releases on the server: summed, never averaged; written as noised figures with their ledger.

Replies are hand-built in the DP wire format (`shared_models.protocol`): a train reply carries
only its noised count and that count's noise std, an evaluate reply only noised histograms of
predicted risk and their noise std.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord

from privacy.ledger.consortium import encode_entry
from server.federation import progress_line, round_record
from server.guard import Rejection
from server.report import render_summary
from server.rounds import NodeResult, RoundReport
from server.strategies import build_strategy
from shared_models.metrics import histogram_metrics
from shared_models.protocol import (
    NOISE_COUNT_STD,
    NOISE_HIST_STD,
    NUM_EXAMPLES,
    RISK_HIST_NEG,
    RISK_HIST_POS,
    RISK_ROC_AUC,
)
from tests.server.conftest import reply

pytestmark = pytest.mark.usefixtures("flower_task")

POS_A = [0.4, -1.2, 2.0, 3.1, 1.0, 4.2, 6.0, 5.5, 7.9, 3.0]
NEG_A = [9.0, 8.2, 7.5, 6.0, 3.3, 2.0, -0.7, 1.0, 0.4, 0.0]
POS_B = [1.0, 0.0, 1.5, 2.0, 2.6, 3.0, 4.4, 6.0, 5.0, 4.0]
NEG_B = [6.0, 7.0, 5.1, 4.0, 4.0, 1.9, 1.0, 0.2, -1.1, 0.0]
#: Keys no DP run's outputs may hold: exact values computed on a node's data.
EXACT_KEYS = ("train/loss", "train/seconds", "train/steps", "loss")


def _evaluate_reply(node_id: int, pos: list[float], neg: list[float], std: float) -> Any:
    metrics = {RISK_HIST_POS: pos, RISK_HIST_NEG: neg, NOISE_HIST_STD: std}
    return reply(node_id, None, num_examples=40.0, metrics=metrics, message_type="evaluate")


def test_noised_histograms_are_summed_and_the_figures_computed_from_the_sum() -> None:
    strategy = build_strategy("fedavg", min_nodes=2)
    replies = [_evaluate_reply(1, POS_A, NEG_A, 3.0), _evaluate_reply(2, POS_B, NEG_B, 4.0)]
    merged = strategy.aggregate_evaluate(1, replies)
    assert merged is not None
    assert merged[RISK_HIST_POS] == pytest.approx(np.add(POS_A, POS_B).tolist())
    assert merged[RISK_HIST_NEG] == pytest.approx(np.add(NEG_A, NEG_B).tolist())
    assert merged[NOISE_HIST_STD] == pytest.approx(5.0)  # sqrt(3² + 4²), not their average
    expected = histogram_metrics(np.add(POS_A, POS_B), np.add(NEG_A, NEG_B), noise_std=5.0)
    assert merged[RISK_ROC_AUC] == pytest.approx(expected["roc_auc"])
    assert merged["risk/recall@0.40"] == pytest.approx(expected["at"]["0.40"]["recall"])
    assert merged["risk/n"] == pytest.approx(expected["n"])
    # Not the weighted average of per-node figures, which a default aggregation would give.
    own = [histogram_metrics(POS_A, NEG_A)["roc_auc"], histogram_metrics(POS_B, NEG_B)["roc_auc"]]
    assert merged[RISK_ROC_AUC] != pytest.approx(sum(own) / 2)


def test_noised_counts_weigh_the_updates_and_are_summed_with_their_noise() -> None:
    strategy = build_strategy("fedavg", min_nodes=2)
    replies = [
        reply(1, {"w": np.zeros(3)}, num_examples=30.5, metrics={NOISE_COUNT_STD: 6.0}),
        reply(2, {"w": np.ones(3)}, num_examples=91.5, metrics={NOISE_COUNT_STD: 8.0}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    assert arrays["w"].numpy() == pytest.approx(np.full(3, 91.5 / 122.0))
    assert dict(metrics) == pytest.approx({NUM_EXAMPLES: 122.0, NOISE_COUNT_STD: 10.0})


def _entry(institution: str, seq: int, kind: str) -> SimpleNamespace:
    return SimpleNamespace(institution=institution, seq=seq, run_id="run-1", kind=kind)


def _signed_text(institution: str, seq: int, epsilon: float) -> str:
    # Only what the server reads back from a reply's entry; signatures are the ledger's business.
    return encode_entry({"institution": institution, "seq": seq, "epsilon_after": epsilon})


def _dp_round(extra_train: dict[str, float] | None = None) -> tuple[RoundReport, list[Any]]:
    strategy = build_strategy("fedavg", min_nodes=2)
    evaluate = strategy.aggregate_evaluate(
        2, [_evaluate_reply(1, POS_A, NEG_A, 3.0), _evaluate_reply(2, POS_B, NEG_B, 4.0)]
    )
    train_nodes = [
        NodeResult(
            i,
            name,
            {NUM_EXAMPLES: n, NOISE_COUNT_STD: 5.0, **(extra_train or {})},
            privacy=_signed_text(name, 3, 1.5),
        )
        for i, name, n in ((1, "uni_a", 30.5), (2, "uni_b", 91.5))
    ]
    evaluate_nodes = [
        NodeResult(
            i,
            name,
            {NUM_EXAMPLES: 40.0, RISK_HIST_POS: pos, RISK_HIST_NEG: neg, NOISE_HIST_STD: std},
            privacy=_signed_text(name, 4, 1.75),
        )
        for i, name, pos, neg, std in (
            (1, "uni_a", POS_A, NEG_A, 3.0),
            (2, "uni_b", POS_B, NEG_B, 4.0),
        )
    ]
    report = RoundReport(
        server_round=2,
        seconds=1.0,
        arrays=ArrayRecord(),
        train={NUM_EXAMPLES: 122.0, NOISE_COUNT_STD: math.sqrt(50.0)},
        evaluate=dict(evaluate or {}),
        train_nodes=train_nodes,
        evaluate_nodes=evaluate_nodes,
    )
    ledger = [
        _entry("uni_a", 0, "count"),
        _entry("uni_b", 0, "count"),
        *(
            _entry(name, seq, kind)
            for name in ("uni_a", "uni_b")
            for seq, kind in ((1, "train"), (2, "histogram"), (3, "train"), (4, "histogram"))
        ),
        _entry("uni_a", 9, "count"),
    ]
    ledger[-1].run_id = "an earlier run"  # another run's count is not this run's release
    return report, ledger


def _figures(node: Any) -> list[dict[str, Any]]:
    """Every released figure under ``node`` (a record's JSON)."""
    if isinstance(node, dict):
        if "noised" in node:
            return [node]
        return [f for value in node.values() for f in _figures(value)]
    if isinstance(node, list):
        return [f for value in node for f in _figures(value)]
    return []


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for value in node.values() for k in _keys(value)}
    if isinstance(node, list):
        return {k for value in node for k in _keys(value)}
    return set()


def test_a_dp_round_record_holds_released_figures_only_each_traced_to_its_entries() -> None:
    report, ledger = _dp_round()
    record = json.loads(
        json.dumps(round_record(report, "fedavg", ledger_entries=ledger, run_id="run-1"))
    )
    assert record["release"] == "dp"
    assert not _keys(record) & set(EXACT_KEYS)
    assert not any(k.startswith("val/") for k in _keys(record))
    assert set(record["train"]) == {NUM_EXAMPLES}
    assert record["train"][NUM_EXAMPLES] == {
        "value": 122.0,
        "noised": True,
        "noise_std": pytest.approx(math.sqrt(50.0)),
        "ledger": [["uni_a", 0], ["uni_b", 0]],  # the count entries of this run only
    }
    auc = record["evaluate"][RISK_ROC_AUC]
    assert auc["noise_std"] == pytest.approx(5.0)
    assert auc["ledger"] == [["uni_a", 4], ["uni_b", 4]]  # the round's histogram entries
    # Every value written for the consortium or an institution is a released figure.
    for phase in ("train", "evaluate"):
        assert all(isinstance(v, dict) and v["noised"] for v in record[phase].values())
        for institution in record["institutions"]:
            assert all(v["noised"] for v in institution[phase].values())
    a = next(e for e in record["institutions"] if e["institution"] == "uni_a")
    assert a["evaluate"][RISK_ROC_AUC]["value"] == pytest.approx(
        histogram_metrics(POS_A, NEG_A)["roc_auc"]  # from its own histogram only
    )
    assert a["evaluate"][RISK_ROC_AUC]["noise_std"] == 3.0
    assert a["evaluate"][RISK_ROC_AUC]["ledger"] == [["uni_a", 4]]
    assert a["train"][NUM_EXAMPLES]["ledger"] == [["uni_a", 0]]
    assert a["epsilon"] == 1.75  # after its latest release, the histogram
    assert all(f["ledger"] for f in _figures(record))


def test_exact_values_a_dp_reply_should_not_carry_are_not_written() -> None:
    report, ledger = _dp_round(extra_train={"train/loss": 0.69, "train/seconds": 3.0})
    record = round_record(report, "fedavg", ledger_entries=ledger, run_id="run-1")
    assert not _keys(record) & set(EXACT_KEYS)


def test_a_rejected_evaluation_is_not_among_the_consortium_figures_entries() -> None:
    report, ledger = _dp_round()
    rejected = RoundReport(**{**vars(report), "rejected": [Rejection(2, "uni_b", "evaluation: x")]})
    record = round_record(rejected, "fedavg", ledger_entries=ledger, run_id="run-1")
    assert record["evaluate"][RISK_ROC_AUC]["ledger"] == [["uni_a", 4]]


def test_the_dp_progress_line_and_summary_show_noised_figures_and_no_exact_value() -> None:
    report, ledger = _dp_round()
    line = progress_line(report, 3)
    assert "train loss" not in line and "test loss" not in line
    assert "n 122 (noised, std 7.1)" in line
    assert "(noised histograms, count std 5.0)" in line and "epsilon max 1.750" in line
    record = json.loads(
        json.dumps(round_record(report, "fedavg", ledger_entries=ledger, run_id="run-1"))
    )
    summary = render_summary([record])
    assert "differential privacy" in summary and "noised" in summary
    assert "uni_a#4, uni_b#4" in summary  # the ledger entries of the final ROC-AUC
    assert "train loss" not in summary and "test loss" not in summary


def test_an_exact_run_keeps_todays_plain_metrics() -> None:
    report = RoundReport(
        server_round=1,
        seconds=1.0,
        arrays=ArrayRecord(),
        train={NUM_EXAMPLES: 100, "train/loss": 0.5},
        evaluate={NUM_EXAMPLES: 40, RISK_ROC_AUC: 0.7, "loss": 0.6},
        train_nodes=[NodeResult(1, "uni_a", {NUM_EXAMPLES: 100, "train/loss": 0.5})],
    )
    record = round_record(report, "fedavg")
    assert record["release"] == "exact"
    assert record["train"] == {NUM_EXAMPLES: 100, "train/loss": 0.5}
    assert record["evaluate"][RISK_ROC_AUC] == 0.7
    assert "train loss 0.5000" in progress_line(report, 1)
