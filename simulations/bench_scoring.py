"""Benchmark: local early warning for 100,000 students (not a test; prints throughput).

Generates one large synthetic institution, trains a small at-risk LSTM on a slice of it, then
times each stage of a scoring run over every student and prints students per second:
load + validate the export, scoring, indicators, reasons (occlusion), rules, and the store write.

    python -m simulations.bench_scoring                  # 100,000 students at week 6
    python -m simulations.bench_scoring --students 20000 --week 15
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from client.indicators import compute_indicators
from client.reasons import explain, occlusion
from client.rules import apply_rules, load_rules
from client.scoring import load_observed_term, load_scoring_model, score_cohort
from client.store import RunInfo, Store
from shared_models.contract import default_spec
from simulations.scoring_figures import train_risk_model
from simulations.synthetic import write_consortium

T = TypeVar("T")


def _timed(label: str, n: int, fn: Callable[[], T], results: list[tuple[str, float]]) -> T:
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    results.append((label, seconds))
    print(f"  {label:<24} {seconds:8.2f} s  {n / seconds:12,.0f} students/s", flush=True)
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--students", type=int, default=100_000)
    parser.add_argument("--week", type=int, default=6, help="score as after this week")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-students", type=int, default=3000)
    args = parser.parse_args(argv)
    spec = default_spec()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        (export,) = write_consortium(
            root / "big",
            institutions=1,
            students=args.students,
            seed=args.seed,
            file_format="parquet",
        )
        print(f"generated {args.students:,} students in {time.perf_counter() - start:.1f} s")
        (small,) = write_consortium(
            root / "small", institutions=1, students=args.train_students, seed=args.seed + 1
        )
        train = load_observed_term(small, spec).cohort
        train_risk_model(train, spec, root / "model", max_epochs=5)
        scorer = load_scoring_model(root / "model", spec)
        rules = load_rules(None, spec)

        results: list[tuple[str, float]] = []
        print(f"scoring after week {args.week}:")
        term = _timed(
            "load + validate export",
            args.students,
            lambda: load_observed_term(export, spec, args.week),
            results,
        )
        cohort, k, n = term.cohort, term.observed_weeks, len(term.cohort)
        scores = _timed("scoring", n, lambda: score_cohort(scorer, cohort, k), results)
        indicators = _timed(
            "indicators",
            n,
            lambda: compute_indicators(
                cohort, k, probability=scores.probability, grade=scores.grade
            ),
            results,
        )
        typical = np.asarray(scorer.normalizer.dyn_mean)
        reasons = _timed(
            "reasons (occlusion)",
            n,
            lambda: explain(occlusion(scorer, cohort, k), indicators, spec, typical),
            results,
        )
        recs = _timed("rules", n, lambda: apply_rules(rules, scores.tier, indicators), results)
        info = RunInfo(str(export), str(root / "model"), scorer.card.model, "default rules")

        def write() -> int:
            with Store(root / "bench.sqlite") as store:
                return store.save_run(info, scores, reasons, recs, len(term.unscored_ids))

        _timed("store write", n, write, results)
        total = sum(s for label, s in results if label != "load + validate export")
        print(
            f"  {'end to end (no load)':<24} {total:8.2f} s  {n / total:12,.0f} students/s"
            f"\n{n:,} scored, {len(term.unscored_ids):,} below completeness; tiers "
            f"{scores.tier_counts()}; {sum(map(len, recs)):,} recommendations"
        )


if __name__ == "__main__":
    main()
