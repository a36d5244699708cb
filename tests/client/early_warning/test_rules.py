from __future__ import annotations

import math
import operator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from client.early_warning.indicators import vocabulary
from client.early_warning.rules import (
    OPERATORS,
    RuleFileError,
    RuleSet,
    apply_rules,
    load_rules,
    parse_rules,
    rule_fires,
)
from shared_models.data.contract import default_spec
from simulations.cli import app

SPEC = default_spec()
VOCAB = vocabulary(SPEC)

GOOD_RULE = """
[[rule]]
id = "low-attendance"
tiers = ["high"]
when = [{ indicator = "attendance_last4", op = "<", value = 0.6 }]
recommend = "Advisor meeting within a week"
priority = 1
owner = "advisor"
message = "Attendance {attendance_last4:.0%}"
"""


def _rule(**changes: str) -> str:
    """GOOD_RULE with some lines replaced (key -> whole new line, or "" to drop it)."""
    lines = []
    for line in GOOD_RULE.strip().splitlines():
        key = line.split("=")[0].strip()
        lines.append(changes.get(key, line))
    return "\n".join(line for line in lines if line)


def test_default_rules_ship_with_the_package_and_are_valid() -> None:
    rules = load_rules()
    assert len(rules.rules) >= 5
    assert {r.owner for r in rules.rules} <= set(rules.roles)
    used = {c.indicator for r in rules.rules for c in r.when}
    assert used <= set(VOCAB)


def test_a_valid_rule_file_parses_into_typed_rules() -> None:
    rules = parse_rules(GOOD_RULE)
    (rule,) = rules.rules
    assert rule.id == "low-attendance" and rule.tiers == ("high",) and rule.priority == 1
    assert str(rule.when[0]) == "attendance_last4 < 0.6"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            _rule(when='when = [{ indicator = "atendance_last4", op = "<", value = 0.6 }]'),
            ["unknown indicator 'atendance_last4'", "did you mean 'attendance_last4'"],
        ),
        (
            _rule(when='when = [{ indicator = "attendance_last4", op = "<", value = 60 }]'),
            ["bad threshold", "ranges 0 to 1", "0.6, not 60"],
        ),
        (
            _rule(when='when = [{ indicator = "attendance_last4", op = "<", value = 0.0 }]'),
            ["bad threshold", "can never hold (attendance_last4 >= 0)"],
        ),
        (
            _rule(when='when = [{ indicator = "risk_probability", op = ">", value = 1.0 }]'),
            ["bad threshold", "can never hold (risk_probability <= 1)"],
        ),
        (
            _rule(when='when = [{ indicator = "attendance_last4", op = "<", value = "0.6" }]'),
            ["bad threshold '0.6'", "finite number"],
        ),
        (
            _rule(when='when = [{ indicator = "attendance_last4", op = "<", value = nan }]'),
            ["bad threshold", "finite number"],
        ),
        (_rule(tiers='tiers = ["hgh"]'), ["unknown tier 'hgh'", "low, moderate, high"]),
        (
            _rule(when='when = [{ indicator = "attendance_last4", op = "=<", value = 0.6 }]'),
            ["bad operator '=<'", "<, <=, >, >=, ==, !="],
        ),
        (_rule(owner='owner = "advisr"'), ["unknown owner role 'advisr'", "declared roles"]),
        (GOOD_RULE + GOOD_RULE, ["duplicate rule id"]),
        (_rule(recommend='recomend = "x"'), ["unknown key", "recomend"]),
        (_rule(priority=""), ["priority", "required key is missing"]),
        (_rule(priority="priority = 0"), ["priority"]),
        (_rule(message='message = "{atendance_last4:.0%}"'), ["unknown indicator"]),
        (_rule(message='message = "{attendance_last4:.0q}"'), ["bad format '.0q'"]),
        (_rule(message='message = "50 {%"'), ["message", "literal braces"]),
        ("version = 1\n", ["rule", "required key is missing"]),
        (GOOD_RULE + "\n[[rule]\n", ["not valid TOML"]),
    ],
    ids=[
        "unknown-indicator",
        "threshold-out-of-range",
        "threshold-never-below",
        "threshold-never-above",
        "threshold-quoted",
        "threshold-nan",
        "unknown-tier",
        "bad-operator",
        "unknown-owner",
        "duplicate-id",
        "unknown-key",
        "missing-key",
        "bad-priority",
        "message-unknown-indicator",
        "message-bad-format",
        "message-bad-braces",
        "no-rules",
        "bad-toml",
    ],
)
def test_every_rule_file_error_is_refused_with_a_clear_message(
    text: str, expected: list[str]
) -> None:
    with pytest.raises(RuleFileError) as err:
        parse_rules(text, SPEC, "my_rules.toml")
    message = str(err.value)
    assert message.startswith("my_rules.toml:")
    for part in expected:
        assert part in message
    if "[[rule]]" in text and "TOML" not in expected[0]:
        assert "low-attendance" in message  # the offending rule is named


def test_missing_rule_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError, match="rule file not found"):
        load_rules(tmp_path / "nope.toml")


def test_rules_check_command_exits_2_with_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "rules.toml"
    bad.write_text(_rule(owner='owner = "advisr"', tiers='tiers = ["hgh"]'), "utf-8")
    result = CliRunner().invoke(app, ["client", "rules", "check", str(bad)])
    assert result.exit_code == 2
    assert "unknown tier 'hgh'" in result.output
    good = tmp_path / "good.toml"
    good.write_text(GOOD_RULE, "utf-8")
    result = CliRunner().invoke(app, ["client", "rules", "check", str(good)])
    assert result.exit_code == 0 and "1 rule(s), valid" in result.output


def test_rules_indicators_command_lists_the_vocabulary() -> None:
    result = CliRunner().invoke(app, ["client", "rules", "indicators"])
    assert result.exit_code == 0
    for name in ("attendance_last4", "quiz_score_trend", "forum_posts_total", "risk_probability"):
        assert name in result.output


def test_recommendations_are_ordered_by_priority_and_missing_values_say_na() -> None:
    text = """
[[rule]]
id = "later"
tiers = ["moderate", "high"]
recommend = "Workshop"
priority = 3
owner = "tutor"
[[rule]]
id = "urgent"
tiers = ["high"]
when = [{ indicator = "risk_probability", op = ">=", value = 0.7 }]
recommend = "Meet"
priority = 1
owner = "advisor"
message = "Attendance {attendance_last4:.0%}, P {risk_probability:.2f}"
"""
    rules = parse_rules(text)
    tiers = np.array(["high", "moderate", "low"], dtype=object)
    indicators = {
        "risk_probability": np.array([0.8, 0.5, 0.1]),
        "attendance_last4": np.array([np.nan, 0.5, 0.9]),
    }
    recs = apply_rules(rules, tiers, indicators)
    assert [r.rule_id for r in recs[0]] == ["urgent", "later"]
    assert recs[0][0].message == "Attendance n/a, P 0.80"
    assert [r.rule_id for r in recs[1]] == ["later"]
    assert recs[2] == []


_UNIT_INDICATORS = ("attendance_last4", "quiz_submitted_last4", "risk_probability")
_value = st.one_of(st.floats(0.0, 1.0), st.just(math.nan))
_condition = st.tuples(
    st.sampled_from(_UNIT_INDICATORS),
    st.sampled_from(list(OPERATORS)),
    st.floats(0.05, 0.95).map(lambda v: round(v, 2)),
)


@settings(max_examples=150, deadline=None)
@given(
    rule_tiers=st.lists(st.sampled_from(["low", "moderate", "high"]), min_size=1, unique=True),
    conditions=st.lists(_condition, max_size=3),
    students=st.lists(
        st.tuples(st.sampled_from(["low", "moderate", "high"]), st.tuples(_value, _value, _value)),
        min_size=1,
        max_size=12,
    ),
)
def test_a_rule_fires_exactly_when_tier_and_every_condition_hold(
    rule_tiers: list[str],
    conditions: list[tuple[str, str, float]],
    students: list[tuple[str, tuple[float, float, float]]],
) -> None:
    raw = {
        "rule": [
            {
                "id": "r",
                "tiers": rule_tiers,
                "when": [{"indicator": i, "op": o, "value": v} for i, o, v in conditions],
                "recommend": "x",
                "priority": 1,
                "owner": "advisor",
            }
        ]
    }
    rule = RuleSet.model_validate(raw, context={"vocabulary": VOCAB}).rules[0]
    tiers = np.array([t for t, _ in students], dtype=object)
    indicators = {
        name: np.array([values[k] for _, values in students])
        for k, name in enumerate(_UNIT_INDICATORS)
    }
    fires = rule_fires(rule, tiers, indicators)

    ops = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
    ops |= {"==": operator.eq, "!=": operator.ne}
    for i, (tier, values) in enumerate(students):
        by_name = dict(zip(_UNIT_INDICATORS, values, strict=True))
        expected = tier in rule_tiers and all(
            not math.isnan(by_name[ind]) and ops[op](by_name[ind], value)
            for ind, op, value in conditions
        )
        assert bool(fires[i]) == expected
