"""Hostile intervention rule files (TOML).

Through `load_rules` (a `RuleFileError` naming the file, or a rule set) and `edufl client rules
check FILE`. A rule set that loads must also apply: every rule's conditions and message work on
any indicator values, missing ones included, so a rule file cannot break a scoring run later.
"""

from __future__ import annotations

import tempfile
import tomllib
from importlib import resources
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from client.early_warning.indicators import vocabulary
from client.early_warning.rules import RuleSet, apply_rules, load_rules
from client.early_warning.scoring import TIERS
from shared_models.data.contract import default_spec
from tests.fuzz.harness import call, cli, fuzz
from tests.fuzz.mutations import hostile_toml

SPEC = default_spec()
VOCABULARY = vocabulary(SPEC)
VALID = resources.files("client").joinpath("default_rules.toml").read_bytes()
VALID_DOC = tomllib.loads(VALID.decode())

#: Message texts that have broken str.format at scoring time, for the semantic strategy.
MESSAGES = (
    "{attendance_last4!z}",
    "{attendance_last4!r:>8}",
    "{attendance_last4:{risk_probability}}",
    "{attendance_last4:.99999999f}",
    "{attendance_last4:999999999999999999999}",
    "{attendance_last4.real}",
    "{attendance_last4[0]}",
    "{0}",
    "{}",
    "{",
    "}",
    "{{literal}}",
    "{attendance_last4:%}",
    "{attendance_last4:d}",
    "{attendance_last4:,.1%}",
    "x" * 5000,
)


def _apply(ruleset: RuleSet) -> None:
    """Fire every rule on four students: high/low values and a missing (NaN) indicator."""
    tiers = np.array([TIERS[-1], TIERS[0], TIERS[-1], TIERS[1]], dtype=object)
    values = {}
    for name, info in VOCABULARY.items():
        lo = info.low if np.isfinite(info.low) else -1e6
        hi = info.high if np.isfinite(info.high) else 1e6
        values[name] = np.array([lo, hi, np.nan, (lo + hi) / 2], dtype=np.float64)
    apply_rules(ruleset, tiers, values)


@st.composite
def hostile_rules(draw: st.DrawFn) -> bytes:
    """Byte damage or a wrong document, or a valid file whose one message is hostile."""
    if draw(st.booleans()):
        return draw(hostile_toml(VALID, VALID_DOC))
    import tomli_w

    doc = tomllib.loads(VALID.decode())
    rule = doc["rule"][draw(st.integers(0, len(doc["rule"]) - 1))]
    rule["message"] = draw(st.sampled_from(MESSAGES))
    return tomli_w.dumps(doc).encode()


@fuzz(250)
@given(data=st.data())
def test_hostile_rule_files_fail_with_the_file_named_or_apply_cleanly(
    data: st.DataObject,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "my rules.toml"
        path.write_bytes(data.draw(hostile_rules(), label="rules"))
        ruleset = call("rule file TOML", lambda: load_rules(path, SPEC), names=[str(path)])
        if isinstance(ruleset, RuleSet):
            call("rule file TOML", lambda: _apply(ruleset), names=[], count=False)


@fuzz(30)
@given(data=st.data())
def test_rules_check_refuses_a_hostile_file_in_one_message(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.toml"
        path.write_bytes(data.draw(hostile_rules(), label="rules"))
        cli("rule file TOML", ["client", "rules", "check", str(path)], names=[str(path)])
