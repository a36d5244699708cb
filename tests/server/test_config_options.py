"""`FederationConfig.from_options`: the one builder from command-line options (and a TOML)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import FederationConfig, FederationConfigError


def test_options_left_at_none_keep_the_defaults() -> None:
    config = FederationConfig.from_options(None, {"rounds": 2, "model": None, "dp_epsilon": None})

    assert config.rounds == 2
    assert config.model == FederationConfig().model
    assert config.dp_epsilon is None
    assert config.model_fields_set == {"rounds"}


def test_options_override_the_file_and_none_keeps_the_files_value(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    path.write_text('rounds = 7\nstrategy = "fedprox"\nproximal_mu = 0.1\n')

    config = FederationConfig.from_options(path, {"rounds": 3, "strategy": None})

    assert config.rounds == 3 and config.strategy == "fedprox"


def test_an_invalid_option_names_its_source() -> None:
    with pytest.raises(FederationConfigError, match=r"^demo: (?s:.)*rounds"):
        FederationConfig.from_options(None, {"rounds": 0}, source="demo")


def test_an_invalid_option_over_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    path.write_text("rounds = 7\n")

    with pytest.raises(FederationConfigError, match=r"fed\.toml"):
        FederationConfig.from_options(path, {"min_nodes": 0})
