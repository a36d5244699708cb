"""FederationConfig: validation, the Flower run-config round trip, and what the nodes receive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.config import FederationConfig, FederationConfigError
from server.guard import GuardConfig
from server.strategies import STRATEGY_NAMES
from shared_models.data.contract import default_spec
from shared_models.models.registry import MODEL_NAMES
from shared_models.protocol import RoundSettings, RoundSettingsError

configs = st.builds(
    FederationConfig,
    model=st.sampled_from([m for m in MODEL_NAMES if m not in ("cnn", "cnn-lstm")]),
    strategy=st.sampled_from([s for s in STRATEGY_NAMES if s != "fedprox"]),
    rounds=st.integers(1, 500),
    fraction_train=st.floats(0.01, 1.0),
    fraction_evaluate=st.floats(0.0, 1.0),
    min_nodes=st.integers(1, 50),
    local_epochs=st.integers(1, 20),
    batch_size=st.integers(1, 512),
    learning_rate=st.floats(1e-6, 1.0),
    seed=st.integers(0, 2**31),
    out_dir=st.just(Path("runs/x")),
    resume=st.booleans(),
    spec_path=st.one_of(st.none(), st.just(Path("specs/consortium.toml"))),
    guard=st.builds(
        GuardConfig, norm_factor=st.floats(1.5, 100), max_update_norm=st.floats(0.1, 1e6)
    ),
    model_overrides=st.fixed_dictionaries({}, optional={"dropout": st.floats(0.0, 0.9)}),
)


@settings(max_examples=60, deadline=None)
@given(configs)
def test_run_config_round_trip_gives_back_the_same_config(config: FederationConfig) -> None:
    run_config = config.to_run_config()
    assert all(isinstance(v, bool | int | float | str) for v in run_config.values())
    assert FederationConfig.from_run_config(run_config) == config


def test_run_config_keys_are_flowers_kebab_case_with_a_guard_table() -> None:
    keys = set(FederationConfig().to_run_config())
    assert {"local-epochs", "fraction-train", "guard.norm-factor", "guard.max-update-norm"} <= keys
    assert not any("_" in key for key in keys)


def test_unknown_run_config_key_is_named_with_the_valid_keys() -> None:
    with pytest.raises(FederationConfigError) as err:
        FederationConfig.from_run_config({"rounds": 3, "local-epoch": 2})
    assert "local_epoch" in str(err.value) and "local_epochs" in str(err.value)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"strategy": "fedsgd"}, "fedavg, fedprox"),
        ({"model": "transformer"}, "lstm"),
        ({"strategy": "fedadam", "strategy_params": {"momentum": 0.9}}, "eta"),
        ({"proximal_mu": 0.1}, "fedprox"),
        ({"model_overrides": {"hidden": 3}}, "hidden"),
        ({"rounds": 0}, "rounds"),
        ({"guard": {"norm_factor": 0.5}}, "norm_factor"),
    ],
)
def test_invalid_settings_fail_with_a_message_naming_them(raw: dict[str, Any], needle: str) -> None:
    with pytest.raises(FederationConfigError, match=needle):
        FederationConfig.validated(raw, "options")


def test_toml_file_is_validated_and_options_override_it(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    path.write_text(
        'strategy = "fedprox"\nproximal_mu = 0.01\nrounds = 7\n[guard]\nnorm_factor = 5.0\n'
    )
    config = FederationConfig.from_toml(path, rounds=2)
    assert (config.strategy, config.proximal_mu, config.rounds) == ("fedprox", 0.01, 2)
    assert config.guard.norm_factor == 5.0


def test_typo_in_a_toml_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "federation.toml"
    path.write_text("round = 3\n")
    with pytest.raises(FederationConfigError, match=r"federation\.toml.*\n.*round: unknown key"):
        FederationConfig.from_toml(path)


def test_nodes_read_back_exactly_what_the_server_sends() -> None:
    config = FederationConfig(
        model="gru", model_overrides={"hidden_size": 16}, local_epochs=4, batch_size=8, seed=9
    )
    spec = default_spec()
    sent = config.train_config(spec.fingerprint) | {"server-round": 3, "proximal-mu": 0.2}
    settings = RoundSettings.from_config(sent)
    assert settings.model == "gru" and settings.model_overrides == {"hidden_size": 16}
    assert (settings.local_epochs, settings.batch_size, settings.seed) == (4, 8, 9)
    assert (settings.server_round, settings.proximal_mu) == (3, 0.2)
    assert settings.spec_fingerprint == spec.fingerprint
    assert RoundSettings.from_config(settings.to_config()) == settings


def test_node_refuses_a_round_config_it_does_not_understand() -> None:
    sent = FederationConfig().train_config("abc") | {"privacy-epsilon": 1.0}
    with pytest.raises(RoundSettingsError, match="privacy-epsilon"):
        RoundSettings.from_config(sent)


def test_nodes_train_at_the_model_configs_learning_rate_unless_the_federation_sets_one() -> None:
    default = FederationConfig()
    assert default.learning_rate is None
    assert RoundSettings.from_config(default.train_config("")).learning_rate == 1e-3  # as before
    from_model = FederationConfig(model_overrides={"learning_rate": 5e-3})
    assert RoundSettings.from_config(from_model.train_config("")).learning_rate == 5e-3
    own = FederationConfig(model_overrides={"learning_rate": 5e-3}, learning_rate=0.02)
    assert RoundSettings.from_config(own.train_config("")).learning_rate == 0.02
    # "" in a run config (what None becomes) means the model config's again.
    assert FederationConfig.from_run_config(default.to_run_config()).learning_rate is None


def test_the_servers_proposal_is_one_privacy_budget_or_none() -> None:
    from privacy.budget import DEFAULT_DELTA, PrivacyBudget

    assert FederationConfig().privacy_budget is None
    proposed = FederationConfig(dp_epsilon=3.0, dp_accountant="prv").privacy_budget
    assert proposed == PrivacyBudget(epsilon=3.0, delta=DEFAULT_DELTA, accountant="prv")
    sent = RoundSettings.from_config(FederationConfig(dp_epsilon=3.0).train_config("fp", "r1"))
    assert (sent.dp_epsilon, sent.dp_delta, sent.run_id) == (3.0, DEFAULT_DELTA, "r1")
    assert RoundSettings.from_config(FederationConfig().train_config("fp")).dp_epsilon is None
