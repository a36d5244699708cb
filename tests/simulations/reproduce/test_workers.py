"""Jobs at once: jobs in worker processes give the same outcomes, in plan order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from simulations.reproduce import pipeline
from simulations.reproduce.config import ReproductionError, load_experiment
from simulations.reproduce.pipeline import JobPool, new_reproduction, run_jobs
from simulations.reproduce.runs import Scored


def _fake_scored(auc: float) -> Scored:
    return Scored({"roc_auc": auc, "f1": auc, "accuracy": auc}, None, 10, 5, {})


def _key(o: Any) -> tuple:
    return (o.label, o.kind, o.mode, o.repeat, o.seed, o.week, o.epsilon)


@pytest.mark.slow
def test_a_pool_gives_the_outcomes_of_one_after_another(tmp_path: Path) -> None:
    """Real centralized and federated (inline) training and baselines in spawned workers."""
    config = load_experiment("at-risk-lstm")
    reps = []
    for workers in (1, 2):
        rep = new_reproduction(
            config, "synthetic", out_dir=tmp_path / f"w{workers}",
            modes=["centralized", "federated"], quick=True, engine="inline", workers=workers,
        )  # fmt: skip
        run_jobs(rep)
        reps.append(rep)
    one, two = reps
    assert one.done == two.done == len(one.jobs)
    assert [_key(o) for o in one.outcomes] == [_key(o) for o in two.outcomes]
    for a, b in zip(one.outcomes, two.outcomes, strict=True):
        assert a.scored.metrics == b.scored.metrics, a.label
        assert a.scored.n_train == b.scored.n_train
    central = [o for o in two.outcomes if o.mode == "centralized"]
    assert {o.kind for o in central} == {"model", "baseline"}
    federated = [o for o in two.outcomes if o.mode == "federated"]
    assert len(federated) == sum(j.mode == "federated" for j in one.jobs) > 0
    assert all(o.scored.metrics["f1"] is not None for o in federated)


def _failing_centralized(*args: Any, **kwargs: Any) -> list[Any]:
    raise ValueError("the pooled train split has one class")


def test_the_first_error_of_a_worker_stops_the_reproduction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_experiment("at-risk-lstm")
    rep = new_reproduction(
        config, "synthetic", out_dir=tmp_path / "out", modes=["centralized"], quick=True,
        engine="inline", workers=2,
    )  # fmt: skip
    # A thread pool stands in for the processes: the function is patched in this process only.
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(pipeline, "_run_in_worker", _failing_centralized)
    monkeypatch.setattr(
        pipeline, "ProcessPoolExecutor", lambda max_workers, **_: ThreadPoolExecutor(max_workers)
    )
    with pytest.raises(ValueError, match="one class"):
        run_jobs(rep)
    assert rep.error == "ValueError: the pooled train split has one class"
    assert rep.done == 0 and rep.outcomes == []


def test_pool_size_and_what_it_takes(tmp_path: Path) -> None:
    config = load_experiment("at-risk-lstm")
    rep = new_reproduction(
        config, "synthetic", out_dir=tmp_path / "out", quick=True, engine="inline", workers=3
    )
    assert JobPool(rep, lambda *a: None, leave_one=True).size == 2
    assert JobPool(rep, lambda *a: None, leave_one=False).size == 3
    central = next(j for j in rep.jobs if j.mode == "centralized")
    federated = next(j for j in rep.jobs if j.mode == "federated")
    # Inline: every job in the pool. Ray: the federated jobs stay in the one Ray session here.
    assert JobPool.takes(rep, central) and JobPool.takes(rep, federated)
    rep.engine = "ray"
    assert JobPool.takes(rep, central) and not JobPool.takes(rep, federated)
    rep.workers = 1
    assert not JobPool.takes(rep, central)
    pool = JobPool(rep, lambda *a: None, leave_one=False)
    assert pool.size == 0
    with pool:
        assert not pool.submit(0, rep.jobs[0], None)  # type: ignore[arg-type]
    with pytest.raises(ReproductionError, match="workers and threads must be at least 1"):
        new_reproduction(config, "synthetic", out_dir=tmp_path / "o2", quick=True, workers=0)
