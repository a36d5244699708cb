"""Rules on a contract other than the default: skipped defaults, drafted files, protected names."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from client.early_warning.indicators import vocabulary
from client.early_warning.rules import RuleFileError, draft_rules, load_rules, parse_rules
from shared_models.data.contract import load_spec, parse_spec
from simulations.cli import app

UCI_SPEC = Path(__file__).resolve().parents[3] / "simulations/datasets/uci/spec.toml"

#: An SIS export with semesters, no attendance and no quizzes; gender is protected.
CUSTOM = parse_spec(
    """
name = "custom-sis"
version = "1.0.0"
weeks = 6

[[dynamic]]
name = "lms_logins"
min = 0.0

[[dynamic]]
name = "credits_passed"
kind = "assessment"
min = 0.0
max = 30.0

[[static]]
name = "gender"
kind = "categorical"
categories = ["f", "m"]
protected = true

[[static]]
name = "scholarship"
kind = "categorical"
categories = ["yes", "no"]
""",
    "custom spec",
)

RULE = """
[[rule]]
id = "r1"
tiers = ["high"]
when = [{{ indicator = "{indicator}", op = "==", value = 1 }}]
recommend = "Meet"
priority = 1
owner = "advisor"
message = "{message}"
"""


def test_default_rules_on_a_spec_without_their_indicators_skip_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="client.early_warning.rules"):
        rules = load_rules(None, CUSTOM)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    for skipped in ("high-risk-low-attendance", "attendance_last4", "quiz-streak"):
        assert skipped in text
    assert "rules init" in text
    kept = {r.id for r in rules.rules}
    assert "moderate-nudge" in kept and "high-risk-low-attendance" not in kept
    used = {c.indicator for r in rules.rules for c in r.when}
    assert used <= set(vocabulary(CUSTOM))


def test_default_rules_on_the_default_spec_warn_about_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="client.early_warning.rules"):
        load_rules()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_users_rule_file_on_an_unknown_indicator_still_fails() -> None:
    with pytest.raises(RuleFileError, match="unknown indicator 'attendance_last4'"):
        parse_rules(RULE.format(indicator="attendance_last4", message=""), CUSTOM)


@pytest.mark.parametrize("name", ["gender", "gender=f"])
def test_a_rule_on_a_protected_attribute_is_refused(name: str) -> None:
    with pytest.raises(RuleFileError) as caught:
        parse_rules(RULE.format(indicator=name, message=""), CUSTOM)
    assert f"'{name}' is a protected attribute" in str(caught.value)
    assert "rule 'r1'" in str(caught.value)


def test_a_rule_message_naming_a_protected_attribute_is_refused() -> None:
    with pytest.raises(RuleFileError, match="'gender' is a protected attribute"):
        parse_rules(RULE.format(indicator="lms_logins_last4", message="{gender}"), CUSTOM)


def test_a_non_protected_attribute_is_just_not_an_indicator() -> None:
    with pytest.raises(RuleFileError) as caught:
        parse_rules(RULE.format(indicator="scholarship", message=""), CUSTOM)
    assert "unknown indicator 'scholarship'" in str(caught.value)
    assert "protected" not in str(caught.value)


@pytest.mark.parametrize("spec", [CUSTOM, load_spec(UCI_SPEC), load_spec(None)])
def test_drafted_rules_parse_and_validate_for_their_spec(spec: object) -> None:
    text = draft_rules(spec, "spec.toml")  # type: ignore[arg-type]
    rules = parse_rules(text, spec)  # type: ignore[arg-type]
    assert {"high-risk-review", "moderate-nudge"} <= {r.id for r in rules.rules}
    for name in vocabulary(spec):  # type: ignore[arg-type]
        assert f"#   {name} " in text
    assert all(line.startswith("#") for line in text.splitlines()[:5])


def test_drafted_rules_fire_on_the_spec_indicators() -> None:
    rules = parse_rules(draft_rules(CUSTOM), CUSTOM)
    falling = next(r for r in rules.rules if r.id == "credits-passed-falling")
    (cond,) = falling.when
    assert cond.indicator == "credits_passed_trend"


def test_rules_init_writes_a_file_that_rules_check_accepts(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(CUSTOM.to_toml(), "utf-8")
    out = tmp_path / "rules.toml"
    runner = CliRunner()
    made = runner.invoke(app, ["client", "rules", "init", "--spec", str(spec_path), "--out",
                               str(out)])  # fmt: skip
    assert made.exit_code == 0, made.output
    assert out.is_file() and "drafted 4 rule(s)" in made.output
    checked = runner.invoke(app, ["client", "rules", "check", str(out), "--spec", str(spec_path)])
    assert checked.exit_code == 0 and "valid" in checked.output
    again = runner.invoke(app, ["client", "rules", "init", "--spec", str(spec_path), "--out",
                                str(out)])  # fmt: skip
    assert again.exit_code == 2 and "exists" in again.output
    printed = runner.invoke(app, ["client", "rules", "init", "--spec", str(spec_path)])
    assert printed.exit_code == 0 and printed.output == out.read_text("utf-8")


def test_rules_init_needs_a_spec() -> None:
    result = CliRunner().invoke(app, ["client", "rules", "init"])
    assert result.exit_code == 2 and "--spec" in result.output


def test_skipped_default_rules_still_apply_to_custom_indicators() -> None:
    from client.early_warning.rules import apply_rules

    rules = load_rules(None, CUSTOM)
    tiers = np.array(["moderate", "low"], dtype=object)
    indicators = {"risk_probability": np.array([0.5, 0.1])}
    fired = apply_rules(rules, tiers, indicators)
    assert [r.rule_id for r in fired[0]] == ["moderate-nudge"] and fired[1] == []
