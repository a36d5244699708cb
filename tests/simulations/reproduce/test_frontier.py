"""The honest frontier: engines, seeds per federated row, the epsilon sweep and its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from server.federation import FederationError
from simulations import simulate_cli
from simulations.cli import app
from simulations.reproduce import pipeline
from simulations.reproduce.config import (
    ReproductionError,
    experiment_names,
    load_experiment,
    with_epsilons,
)
from simulations.reproduce.figures import draw_frontier
from simulations.reproduce.pipeline import Reproduction, command_line, new_reproduction, run_jobs
from simulations.reproduce.report import markdown
from simulations.reproduce.runs import Outcome, Scored
from simulations.reproduce.stats import frontier

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["reproduce", *args], prog_name="edufl")
    return result.exit_code, result.output


def test_every_experiment_runs_three_seeds_per_federated_row_and_quick_stays_at_one() -> None:
    for name in experiment_names():
        config = load_experiment(name)
        assert config.federated.repeats >= 3, name
        assert config.quick().federated.repeats == 1, name


def test_the_privacy_sweep_covers_half_to_sixteen_and_quick_keeps_its_top() -> None:
    config = load_experiment("privacy-utility")
    assert config.epsilons == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert config.quick().epsilons == [16.0]


def test_epsilons_option_replaces_the_sweep_and_is_quoted_in_the_command() -> None:
    config = with_epsilons(load_experiment("privacy-utility"), "8, 1,4,1")
    assert config.epsilons == [1.0, 4.0, 8.0]
    command = command_line(
        "privacy-utility", "synthetic", None, Path("o"), None, False, "ray",
        epsilons=config.epsilons,
    )  # fmt: skip
    assert command.endswith("--out o --epsilons 1,4,8 --engine ray")
    inline = command_line("privacy-utility", "synthetic", None, Path("o"), None, False, "inline")
    assert inline.endswith("--out o")  # what the default (auto) runs without a Ray cluster
    with pytest.raises(ReproductionError, match="'x' is not a positive number"):
        with_epsilons(config, "1,x")
    with pytest.raises(ReproductionError, match="'-1' is not a positive number"):
        with_epsilons(config, "-1")
    with pytest.raises(ReproductionError, match="sweeps no epsilon"):
        with_epsilons(load_experiment("at-risk-lstm"), "1")


def test_engine_names_match_the_runner() -> None:
    from simulations.runner import ENGINES

    assert ("auto", *ENGINES) == simulate_cli.ENGINE_NAMES


@pytest.mark.parametrize(
    ("engine", "address", "gpus", "resolved"),
    [
        ("auto", None, None, "inline"),
        ("auto", "10.0.0.1:6379", None, "ray"),
        ("auto", None, 0.5, "ray"),
        ("ray", None, None, "ray"),
        ("inline", None, None, "inline"),
    ],
)
def test_auto_is_ray_only_where_only_ray_can_do_it(
    engine: str, address: str | None, gpus: float | None, resolved: str
) -> None:
    assert simulate_cli.resolve_engine(engine, address, gpus) == resolved


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--engine", "dask"), "--engine must be one of auto, ray, inline, not 'dask'"),
        (("--engine", "inline", "--ray-address", "10.0.0.1:6379"), "cannot join the Ray cluster"),
        (("--ray-address", "10.0.0.1:6379", "--out", "rel/out"), "is relative"),
    ],
)
def test_engine_options_are_checked_before_anything_is_written(
    args: tuple[str, ...], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, output = _invoke("at-risk-lstm", "--quick", *args)
    assert code != 0
    assert message in " ".join(output.split())
    assert not any(tmp_path.iterdir())


def test_ray_address_from_the_environment_is_refused_with_the_inline_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    code, output = _invoke("at-risk-lstm", "--quick", "--engine", "inline")
    assert code != 0 and "unset RAY_ADDRESS" in " ".join(output.split())


def _fake_scored(auc: float) -> Scored:
    return Scored({"roc_auc": auc, "f1": 0.5, "accuracy": 0.8}, [[5, 1], [1, 3]], 40, 10, {})


def test_inline_engine_reaches_every_federated_job_and_starts_no_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines: list[str] = []

    def fake_train(*args: Any, engine: str, **kwargs: Any) -> Scored:
        engines.append(engine)
        return _fake_scored(0.8)

    def no_ray(*args: Any) -> None:
        raise AssertionError("the inline engine opened a Ray session")

    monkeypatch.setattr(pipeline, "train_federated", fake_train)
    monkeypatch.setattr(pipeline, "ray_session", no_ray)
    config = load_experiment("privacy-utility")
    rep = new_reproduction(
        config, "synthetic", out_dir=tmp_path / "out", modes=["federated", "federated-dp"],
        quick=True, engine="inline",
    )  # fmt: skip
    run_jobs(rep)
    assert engines == ["inline"] * len(rep.jobs) and len(engines) == 3  # fed + 2 DP rows at 16
    assert "--engine" not in rep.command  # inline: the default without a Ray cluster
    assert "inline engine" in markdown(rep, [], [])


def test_a_point_every_institution_declines_is_kept_and_other_failures_still_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refusal = (
        "round 1: every node failed; node 7: ... MS declines this round: the budget left calls "
        "for noise multiplier 56 over 10 round(s), above this node's ceiling 15 (dp-max-noise)"
    )

    def declining(*args: Any, **kwargs: Any) -> Scored:
        raise FederationError(refusal)

    monkeypatch.setattr(pipeline, "train_federated", declining)
    config = load_experiment("privacy-utility")
    rep = new_reproduction(
        config, "synthetic", out_dir=tmp_path / "out", modes=["federated-dp"], quick=True,
        engine="inline",
    )  # fmt: skip
    run_jobs(rep)
    assert all(o.scored.details["declined"] == refusal for o in rep.outcomes)
    assert all(o.scored.metrics["roc_auc"] is None for o in rep.outcomes)
    assert "| 16 | declined (1 seed(s)) | n/a |" in markdown(rep, [], [])

    rep = new_reproduction(
        config, "synthetic", out_dir=tmp_path / "out", modes=["federated"], quick=True,
        engine="inline",
    )  # fmt: skip
    monkeypatch.setattr(
        pipeline, "train_federated", lambda *a, **k: (_ for _ in ()).throw(FederationError(refusal))
    )
    with pytest.raises(FederationError):  # without DP, a refusal is a real failure
        run_jobs(rep)


def _outcome(label: str, mode: str, repeat: int, eps: float | None, auc: float) -> Outcome:
    scored = _fake_scored(auc)
    return Outcome(label, "model", mode, repeat, repeat, None, eps, 1.0, scored)


def _frontier_rep(tmp_path: Path) -> Reproduction:
    config = load_experiment("privacy-utility")
    outcomes = [_outcome("LSTM", "centralized", r, None, auc) for r, auc in enumerate((0.9, 1.0))]
    outcomes += [_outcome("LSTM", "federated", r, None, 0.85 + r / 100) for r in range(3)]
    for eps, base in ((1.0, 0.5), (8.0, 0.9)):
        outcomes += [_outcome("LSTM", "federated-dp", r, eps, base + r / 100) for r in range(3)]
        logistic = "DP logistic (engineered features)"
        outcomes += [_outcome(logistic, "federated-dp", r, eps, 0.76) for r in range(3)]
    return Reproduction(
        config=config, dataset="synthetic", command="edufl reproduce privacy-utility",
        modes=["centralized", "federated", "federated-dp"], quick=False, out_dir=tmp_path,
        started="now", outcomes=outcomes,
    )  # fmt: skip


def test_frontier_table_gives_mean_sd_and_the_ratio_to_centralized_without_dp(
    tmp_path: Path,
) -> None:
    rep = _frontier_rep(tmp_path)
    front = frontier(rep)
    assert front.reference_row == "LSTM" and front.references["LSTM"].mean == pytest.approx(0.95)
    md = markdown(rep, [], [])
    assert (
        "- LSTM is measured against centralized LSTM without DP: 0.950 ± 0.071 (2 seed(s))." in md
    )
    assert "- Federated LSTM without DP: 0.860 ± 0.010 (3 seed(s))." in md
    # LSTM at eps 8: mean 0.91 / 0.95; the logistic has no centralized row of its own
    assert "| 8 | 0.910 ± 0.010 | 0.958 | 0.760 ± 0.000 | 0.800 |" in md
    assert "| 1 | 0.510 ± 0.010 | 0.537 |" in md
    assert "Mean ± sd (sample) over 2 seed(s) centralized, 3 seed(s) federated, 3 seed(s)" in md


def test_frontier_plot_is_drawn_with_bands(tmp_path: Path) -> None:
    path = draw_frontier(_frontier_rep(tmp_path), tmp_path / "frontier.png")
    assert path is not None and path.stat().st_size > 5000
    empty = _frontier_rep(tmp_path)
    empty.outcomes = [o for o in empty.outcomes if o.mode != "federated-dp"]
    assert draw_frontier(empty, tmp_path / "none.png") is None


def test_rounds_an_institution_sat_out_are_reported_with_the_frontier(tmp_path: Path) -> None:
    rep = _frontier_rep(tmp_path)
    for o in rep.outcomes:
        if o.mode == "federated-dp":
            o.scored.details |= {"node_rounds_failed": 0, "node_rounds": 20}
    late = next(o for o in rep.outcomes if o.epsilon == 1.0 and o.label.startswith("DP"))
    late.scored.details["node_rounds_failed"] = 9
    md = markdown(rep, [], [])
    assert "DP logistic (engineered features) at ε = 1: 9 of 60 node-rounds" in md
    assert "at ε = 8:" not in md
