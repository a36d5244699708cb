"""DP-aware defaults: under DP the fields `DP_DEFAULTS` names, when not given, take its values."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from server.config import DP_DEFAULTS, DP_LEARNING_RATES, FederationConfig

TRAINING = tuple(DP_DEFAULTS)  # local_epochs, batch_size, learning_rate, average_rounds


#: The same fields without DP: the fields' own defaults.
PLAIN = {"local_epochs": 3, "batch_size": 32, "learning_rate": None, "average_rounds": 0.0}


def _training(config: FederationConfig) -> dict[str, object]:
    return {key: getattr(config, key) for key in TRAINING}


def test_without_dp_nothing_changes() -> None:
    plain = FederationConfig()

    assert (plain.local_epochs, plain.batch_size, plain.learning_rate) == (3, 32, None)
    assert plain.local_learning_rate == 1e-3  # the model config's


def test_under_dp_the_fields_not_given_take_the_dp_defaults() -> None:
    config = FederationConfig(dp_epsilon=8.0)

    assert _training(config) == DP_DEFAULTS
    assert config.local_learning_rate == DP_DEFAULTS["learning_rate"]
    assert config.model_fields_set == {"dp_epsilon"}  # filled, not set: still defaults


@pytest.mark.parametrize(
    "key,value", [("local_epochs", 4), ("batch_size", 48), ("learning_rate", 0.2)]
)
def test_an_explicit_value_wins_over_the_dp_default(key: str, value: float) -> None:
    config = FederationConfig(dp_epsilon=3.0, **{key: value})

    assert getattr(config, key) == value
    others = {k: v for k, v in DP_DEFAULTS.items() if k != key}
    assert {k: getattr(config, k) for k in others} == others


def test_a_toml_file_and_options_resolve_the_same_way(tmp_path: Path) -> None:
    toml = tmp_path / "federation.toml"
    toml.write_text("dp_epsilon = 1.0\nbatch_size = 64\n")

    from_file = FederationConfig.from_options(toml, {"local_epochs": None, "learning_rate": None})
    from_options = FederationConfig.from_options(None, {"dp_epsilon": 1.0, "batch_size": 64})

    assert _training(from_file) == _training(from_options) == DP_DEFAULTS | {"batch_size": 64}


def test_the_servers_run_config_carries_the_resolved_settings() -> None:
    config = FederationConfig(dp_epsilon=8.0)
    run_config = config.to_run_config()

    assert run_config["batch-size"] == DP_DEFAULTS["batch_size"]
    back = FederationConfig.from_run_config(run_config)
    assert back == config
    assert back.round_settings("fp").batch_size == DP_DEFAULTS["batch_size"]


@settings(max_examples=40, deadline=None)
@given(
    epsilon=st.one_of(st.none(), st.floats(0.1, 50)),
    given_values=st.fixed_dictionaries(
        {},
        optional={
            "local_epochs": st.integers(1, 20),
            "batch_size": st.integers(1, 512),
            "learning_rate": st.floats(1e-5, 1.0),
        },
    ),
)
def test_run_config_round_trip_holds_with_and_without_dp(
    epsilon: float | None, given_values: dict[str, float]
) -> None:
    config = FederationConfig(dp_epsilon=epsilon, **given_values)

    assert FederationConfig.from_run_config(config.to_run_config()) == config
    for key, value in given_values.items():
        assert getattr(config, key) == value


def test_changing_the_proposal_resolves_the_unset_fields_again() -> None:
    plain = FederationConfig(rounds=7, batch_size=64)

    private = plain.with_dp_epsilon(8.0)
    assert private.dp_epsilon == 8.0 and private.rounds == 7
    assert _training(private) == DP_DEFAULTS | {"batch_size": 64}

    back = private.with_dp_epsilon(None)
    assert back.dp_epsilon is None
    assert (back.local_epochs, back.batch_size, back.learning_rate) == (3, 64, None)


def test_simulate_run_help_states_the_dp_defaults() -> None:
    from simulations.simulate_cli import app

    result = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.output.split())

    assert result.exit_code == 0
    assert f"under DP {DP_DEFAULTS['local_epochs']})" in text
    assert f"under DP {DP_DEFAULTS['batch_size']})" in text
    assert f"under DP {DP_DEFAULTS['learning_rate']:g}, " in text
    assert f"{DP_LEARNING_RATES['logistic']:g} for logistic)" in text
    assert f"under DP {DP_DEFAULTS['average_rounds']:g}, the last half)" in text


@pytest.mark.parametrize("model", ["lstm", "logistic"])
@pytest.mark.parametrize("epsilon", [8.0, 0.0])
def test_the_demo_trains_with_the_shared_dp_defaults(
    epsilon: float, model: str, tmp_path: Path
) -> None:
    from simulations.demo import federation_config

    config = federation_config(5, 0, epsilon, 4, tmp_path / "run", model)

    dp = {
        **DP_DEFAULTS,
        "learning_rate": DP_LEARNING_RATES.get(model, DP_DEFAULTS["learning_rate"]),
    }
    assert _training(config) == (dp if epsilon else PLAIN)
    assert config.dp_epsilon == (epsilon or None)
    assert config.model == model


def test_the_demo_ships_the_dp_logistic_model_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    from simulations.cli import app
    from simulations.demo import DEMO_MODEL, federation_config

    assert DEMO_MODEL == "logistic"  # issue 19: the better private model on the demo's data
    assert federation_config(5, 0, 8.0, 4, tmp_path / "run").model == DEMO_MODEL

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--model", "lsmt"])
    assert result.exit_code == 2, result.output
    assert "lsmt" in result.output and "lstm" in result.output  # names the valid models
    assert not (out / "federated").exists()  # refused before any training


def test_simulate_run_trains_under_dp_with_the_dp_defaults_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import simulations.runner
    from server.federation import FederationResult
    from simulations.cli import app

    seen: list[FederationConfig] = []

    def fake_simulate(config: FederationConfig, *args: object, **kwargs: object) -> object:
        seen.append(config)
        return FederationResult(1, config.rounds, {})

    monkeypatch.setattr(simulations.runner, "simulate", fake_simulate)
    args = ["simulate", "run", "--synthetic", "2", "--students", "60", "--rounds", "2"]
    runner = CliRunner()
    for extra, expected in [
        ([], PLAIN),
        (["--dp-epsilon", "3"], DP_DEFAULTS),
        (["--dp-epsilon", "3", "--batch-size", "64"], DP_DEFAULTS | {"batch_size": 64}),
    ]:
        out = tmp_path / f"run{len(seen)}"
        result = runner.invoke(app, [*args, *extra, "--out", str(out)], prog_name="edufl")
        assert result.exit_code == 0, result.output
        assert _training(seen[-1]) == expected, extra


def test_server_start_proposes_dp_with_the_dp_defaults_and_no_dp_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.cli import app
    from server.superlink import launcher

    submitted: list[dict[str, object]] = []
    monkeypatch.setattr(launcher, "start_superlink", lambda *a, **k: object())
    monkeypatch.setattr(launcher, "control_address", lambda layout: "127.0.0.1:1")
    monkeypatch.setattr(launcher, "stop_unfinished_runs", lambda layout: [])
    monkeypatch.setattr(launcher, "submit_run", lambda layout, rc: submitted.append(rc) or 7)
    monkeypatch.setattr(launcher, "wait_for_run", lambda *a, **k: "finished:completed")
    monkeypatch.setattr(launcher, "stop_superlink", lambda *a, **k: None)
    toml = tmp_path / "federation.toml"
    toml.write_text("local_epochs = 2\n")
    base = ["start", "--insecure", "--address", "127.0.0.1:9092", "--state", str(tmp_path)]
    runner = CliRunner()

    for extra, expected in [
        ([], DP_DEFAULTS),  # DP is the deployment default
        (["--config", str(toml)], DP_DEFAULTS | {"local_epochs": 2}),
        (["--no-dp"], PLAIN),
    ]:
        result = runner.invoke(app, [*base, *extra])
        assert result.exit_code == 0, result.output
        config = FederationConfig.from_run_config(submitted[-1])
        assert _training(config) == expected, extra
        assert (config.dp_epsilon is None) == ("--no-dp" in extra)
