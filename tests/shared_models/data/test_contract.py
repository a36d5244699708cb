from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared_models.data.contract import default_spec, load_spec, parse_spec
from shared_models.errors import DataContractError


def test_default_spec_ships_with_the_package_and_is_valid() -> None:
    spec = default_spec()
    assert spec.weeks == 15
    assert "attendance_rate" in spec.dynamic_names
    assert spec.activity_index == (0, 1, 2, 3, 4)
    assert "program=stem" in spec.static_names and "prior_gpa" in spec.static_names
    assert spec.target.grade_max == 4.0


def test_spec_round_trips_through_toml_with_the_same_fingerprint() -> None:
    spec = default_spec()
    again = parse_spec(spec.to_toml())
    assert again == spec
    assert again.fingerprint == spec.fingerprint


def test_fingerprint_ignores_comments_and_layout_but_not_content() -> None:
    spec = default_spec()
    text = "# a comment an operator added\n\n" + spec.to_toml()
    assert parse_spec(text).fingerprint == spec.fingerprint
    changed = parse_spec(spec.to_toml().replace("weeks = 15", "weeks = 16"))
    assert changed.fingerprint != spec.fingerprint


def test_fingerprint_of_the_shipped_file_equals_that_of_its_canonical_form() -> None:
    shipped = default_spec()  # parsed from the commented TOML in the package
    assert len(shipped.fingerprint) == 64
    assert parse_spec(shipped.to_toml()).fingerprint == shipped.fingerprint


def test_a_typo_in_a_key_fails_with_the_key_named() -> None:
    text = default_spec().to_toml().replace("min_completeness", "min_completness")
    with pytest.raises(DataContractError, match=r"min_completness: unknown key"):
        parse_spec(text, "consortium.toml")


def test_a_typo_in_a_nested_key_is_named_with_its_position() -> None:
    text = default_spec().to_toml().replace('kind = "activity"', 'knd = "activity"', 1)
    with pytest.raises(DataContractError, match=r"dynamic\.0\.knd"):
        parse_spec(text)


def test_at_risk_results_must_be_listed_results() -> None:
    text = (
        default_spec()
        .to_toml()
        .replace('at_risk_results = [\n    "fail",', 'at_risk_results = [\n    "expelled",')
    )
    with pytest.raises(DataContractError, match="at_risk_results"):
        parse_spec(text)


def test_repeated_column_names_are_refused() -> None:
    text = default_spec().to_toml().replace('name = "lms_logins"', 'name = "attendance_rate"')
    with pytest.raises(DataContractError, match="unique"):
        parse_spec(text)


def test_invalid_toml_and_missing_file_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataContractError, match="not valid TOML"):
        parse_spec("weeks = = 3", "bad.toml")
    with pytest.raises(DataContractError, match="not found"):
        load_spec(tmp_path / "nope.toml")


def test_at_risk_rule_combines_grade_threshold_and_results() -> None:
    target = default_spec().target
    assert target.at_risk(1.9, "pass")
    assert not target.at_risk(2.0, "pass")
    assert target.at_risk(None, "withdrawn")
    assert target.at_risk(3.5, "fail")
    assert not target.at_risk(None, None)


@given(weeks=st.integers(1, 104), completeness=st.floats(0, 1))
def test_any_valid_spec_round_trips(weeks: int, completeness: float) -> None:
    spec = parse_spec(
        default_spec()
        .model_copy(update={"weeks": weeks, "min_completeness": completeness})
        .to_toml()
    )
    again = parse_spec(spec.to_toml())
    assert again == spec and again.fingerprint == spec.fingerprint
