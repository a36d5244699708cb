"""Intervention rules: tier + indicator conditions -> recommendations with priority and owner.

A rule file is TOML (the default ships as ``client/default_rules.toml``)::

    roles = ["advisor", "tutor", "wellbeing"]      # owners a rule may name

    [[rule]]
    id = "high-risk-attendance"
    tiers = ["high"]                               # low, moderate, high
    when = [{ indicator = "attendance_last4", op = "<", value = 0.6 }]   # all must hold
    recommend = "Advisor meeting within a week"
    priority = 1                                   # 1 is the most urgent
    owner = "advisor"
    message = "Attendance {attendance_last4:.0%} over the last 4 weeks."

Indicators are the vocabulary of `client.early_warning.indicators.vocabulary`; a condition on a
missing (NaN)
indicator never holds, so a rule fires only on evidence. The file is validated once, against the
data contract's vocabulary, and every problem is reported with the rule it belongs to.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
import string
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from client.early_warning.indicators import IndicatorInfo, vocabulary
from client.early_warning.tiers import TIERS
from shared_models.data.contract import FeatureSpec, default_spec
from shared_models.errors import EduflError
from shared_models.user_files import describe_read_error, loads_toml, read_text

DEFAULT_ROLES: tuple[str, ...] = ("advisor", "tutor", "wellbeing", "instructor")
OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}

_SLUG = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", max_length=64)]
#: Longest text one formatted indicator may produce in a message.
_MAX_FORMATTED = 40


class RuleFileError(EduflError, ValueError):
    """A rule file is unreadable or invalid; the message names each rule and problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)  # a typo in a TOML key fails loudly


class Condition(_Strict):
    """``indicator op value``, e.g. ``attendance_last4 < 0.6``."""

    indicator: str
    op: Literal["<", "<=", ">", ">=", "==", "!="]
    value: Annotated[float, Field(strict=True, allow_inf_nan=False)]

    def __str__(self) -> str:
        return f"{self.indicator} {self.op} {self.value:g}"

    @model_validator(mode="after")
    def _known(self, info: ValidationInfo) -> Condition:
        problems = _check_condition(self, _vocabulary(info))
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Rule(_Strict):
    """One recommendation and the tiers and conditions under which it is made."""

    id: _SLUG
    tiers: tuple[Literal["low", "moderate", "high"], ...] = Field(min_length=1)
    when: tuple[Condition, ...] = ()  # all must hold; none = every student of the tiers
    recommend: str = Field(min_length=1, max_length=200)  # the action, in a few words
    priority: Annotated[int, Field(ge=1, le=9)]  # 1 is the most urgent
    owner: _SLUG  # one of the file's roles
    message: str = Field("", max_length=1000)  # may name indicators: "{attendance_last4:.0%}"

    @field_validator("message")
    @classmethod
    def _placeholders(cls, message: str, info: ValidationInfo) -> str:
        problems = _check_message(message, _vocabulary(info))
        if problems:
            raise ValueError("; ".join(problems))
        return message


class RuleSet(_Strict):
    """A validated rule file."""

    version: Literal[1] = 1
    roles: tuple[_SLUG, ...] = DEFAULT_ROLES
    rules: tuple[Rule, ...] = Field(alias="rule", min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> RuleSet:
        problems: list[str] = []
        seen: set[str] = set()
        for k, rule in enumerate(self.rules):
            where = f"rule {rule.id!r} (#{k + 1})"
            if rule.id in seen:
                problems.append(f"{where}: duplicate rule id; give each rule its own id")
            seen.add(rule.id)
            if rule.owner not in self.roles:
                problems.append(
                    f"{where}: unknown owner role {rule.owner!r}; declared roles are "
                    f"{', '.join(self.roles)} (add it to `roles` or fix the spelling)"
                )
        if problems:
            raise ValueError("\n".join(problems))
        return self


def _vocabulary(info: ValidationInfo) -> dict[str, IndicatorInfo]:
    """The vocabulary `parse_rules` passes in; the default contract's when validated directly."""
    vocab: dict[str, IndicatorInfo] | None = (info.context or {}).get("vocabulary")
    return vocab if vocab is not None else vocabulary(default_spec())


def _check_condition(cond: Condition, vocab: dict[str, IndicatorInfo]) -> list[str]:
    info = vocab.get(cond.indicator)
    if info is None:
        return [_unknown_indicator(cond.indicator, vocab)]
    if not info.low <= cond.value <= info.high:
        hint = " (a share is written 0.6, not 60)" if (info.low, info.high) == (0, 1) else ""
        return [
            f"bad threshold in `{cond}`: {cond.indicator} ranges {info.low:g} to {info.high:g}"
            f"{hint}"
        ]
    if cond.op == "<" and cond.value <= info.low:
        return [f"bad threshold in `{cond}`: can never hold ({cond.indicator} >= {info.low:g})"]
    if cond.op == ">" and cond.value >= info.high:
        return [f"bad threshold in `{cond}`: can never hold ({cond.indicator} <= {info.high:g})"]
    return []


def _check_message(message: str, vocab: dict[str, IndicatorInfo]) -> list[str]:
    try:
        fields = [
            (f, spec, conversion)
            for _, f, spec, conversion in string.Formatter().parse(message)
            if f is not None
        ]
    except ValueError as exc:
        return [f"{exc}; write literal braces as {{{{ and }}}}"]
    problems = []
    for name, spec, conversion in fields:
        if name not in vocab:
            problems.append(_unknown_indicator(name, vocab))
            continue
        if conversion is not None:  # "!z" only fails when the message is formatted
            problems.append(f"conversion !{conversion} for {name} is not supported; use :.1f")
            continue
        if re.search(r"\d{3,}", spec or ""):  # format(0.5, "9999999999") would need 10 GB
            problems.append(f"format {spec!r} for {name}: width or precision above 99")
            continue
        try:
            shown = format(0.5, spec or "")
        except ValueError:
            problems.append(f"bad format {spec!r} for {name}; use e.g. :.0% or :.1f")
            continue
        if len(shown) > _MAX_FORMATTED:  # ":.99999999f" would write 100 MB per student
            problems.append(f"format {spec!r} for {name} writes {len(shown)} characters")
    return problems


def _unknown_indicator(name: str, vocab: dict[str, IndicatorInfo]) -> str:
    close = difflib.get_close_matches(name, list(vocab), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown indicator {name!r}; {hint}`edufl client rules indicators` lists them"


def parse_rules(text: str, spec: FeatureSpec | None = None, source: str = "<rules>") -> RuleSet:
    """Validate a rule file's TOML text against the contract's indicator vocabulary.

    Raises:
        RuleFileError: bad TOML, or one line per problem naming the rule.
    """
    try:
        raw = loads_toml(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleFileError(f"{source}: not valid TOML ({exc}); fix the syntax") from None
    context = {"vocabulary": vocabulary(spec or default_spec())}
    try:
        return RuleSet.model_validate(raw, context=context)
    except ValidationError as exc:
        raise RuleFileError(_describe(exc, raw, source)) from None


def load_rules(path: Path | str | None = None, spec: FeatureSpec | None = None) -> RuleSet:
    """Load a rule file, or the default rules that ship with edufl when ``path`` is None."""
    if path is None:
        text = resources.files("client").joinpath("default_rules.toml").read_text("utf-8")
        return parse_rules(text, spec, "default rules")
    p = Path(path)
    try:
        text = read_text(p)
    except FileNotFoundError:
        raise RuleFileError(f"{p}: rule file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError(f"{p}: cannot read rule file ({describe_read_error(exc)})") from None
    return parse_rules(text, spec, str(p))


def _describe(exc: ValidationError, raw: dict[str, Any], source: str) -> str:
    lines = [f"{source}: the rule file is invalid"]
    rules: list[Any] = raw["rule"] if isinstance(raw.get("rule"), list) else []
    errors = exc.errors()
    for err in errors:
        loc = list(err["loc"])
        if err["type"] == "too_short" and any(
            len(e["loc"]) > len(loc) and list(e["loc"][: len(loc)]) == loc for e in errors
        ):
            continue  # "no items left" after an item already reported as invalid
        where = "(top level)"
        if len(loc) >= 2 and loc[0] == "rule" and isinstance(loc[1], int):
            entry = rules[loc[1]] if loc[1] < len(rules) else {}
            rule_id = entry.get("id", "?") if isinstance(entry, dict) else "?"
            rest = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[2:])
            where = f"rule {rule_id!r} (#{loc[1] + 1}){rest}"
        elif loc:
            where = ".".join(str(p) for p in loc)
        msg, field = err["msg"], str(loc[-1]) if loc else ""
        if err["type"] == "extra_forbidden":
            msg = "unknown key (a typo?); remove or rename it"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif field == "op" or (field.isdigit() and len(loc) > 2 and loc[-2] == "tiers"):
            kind = "bad operator" if field == "op" else "unknown tier"
            allowed = ", ".join(OPERATORS) if field == "op" else ", ".join(TIERS)
            msg = f"{kind} {err.get('input')!r}; use one of {allowed}"
        elif field == "value":
            msg = f"bad threshold {err.get('input')!r}: must be a finite number, not quoted"
        elif err["type"] == "value_error":
            if not loc:  # RuleSet's own checks, one per line, each naming its rule
                lines += [
                    f"  - {line}" for line in str(msg).removeprefix("Value error, ").split("\n")
                ]
                continue
            msg = str(msg).removeprefix("Value error, ")
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Recommendation:
    """One fired rule for one student."""

    rule_id: str
    priority: int
    owner: str
    action: str
    message: str


def rule_fires(rule: Rule, tiers: np.ndarray, indicators: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean (n,): the student's tier is one of the rule's and every condition holds."""
    fires = np.isin(np.asarray(tiers, dtype=object), list(rule.tiers))
    for cond in rule.when:
        values = np.asarray(indicators[cond.indicator], dtype=np.float64)
        # NaN compares False except under !=; a missing indicator must never fire a rule.
        fires &= OPERATORS[cond.op](values, cond.value) & ~np.isnan(values)
    return fires


def apply_rules(
    ruleset: RuleSet, tiers: np.ndarray, indicators: dict[str, np.ndarray]
) -> list[list[Recommendation]]:
    """Each student's recommendations, most urgent first (then in file order)."""
    per_student: list[list[Recommendation]] = [[] for _ in range(len(tiers))]
    ranked = sorted(enumerate(ruleset.rules), key=lambda kr: (kr[1].priority, kr[0]))
    for _, rule in ranked:
        names = [f for _, f, _, _ in string.Formatter().parse(rule.message) if f]
        for i in np.flatnonzero(rule_fires(rule, tiers, indicators)):
            values = {n: float(indicators[n][i]) for n in names}
            per_student[i].append(
                Recommendation(
                    rule.id,
                    rule.priority,
                    rule.owner,
                    rule.recommend,
                    _format(rule.message, values),
                )
            )
    return per_student


def _format(message: str, values: dict[str, float]) -> str:
    if not any(math.isnan(v) for v in values.values()):
        return message.format(**values)
    # A referenced indicator may be missing for this student; say so rather than "nan%".
    parts = []
    for literal, name, spec, _ in string.Formatter().parse(message):
        parts.append(literal)
        if name is not None:
            value = values[name]
            parts.append("n/a" if math.isnan(value) else format(value, spec or ""))
    return "".join(parts)
