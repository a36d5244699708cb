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
missing (NaN) indicator never holds, so a rule fires only on evidence. The file is validated
once, against the data contract's vocabulary, and every problem is reported with the rule it
belongs to. A rule may never name an attribute the contract marks protected (gender, disability,
socio-economic band, age band...): interventions follow from what a student does, not who they
are. The default rules are written for the default contract: on another contract the ones whose
indicators it lacks are skipped with one warning; `draft_rules` writes a starting file for any
contract. docs/rules.md documents the format.
"""

from __future__ import annotations

import difflib
import json
import logging
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

from client.early_warning.indicators import (
    IndicatorInfo,
    alias,
    display,
    protected_names,
    vocabulary,
)
from client.early_warning.tiers import TIERS
from shared_models.data.contract import FeatureSpec, default_spec
from shared_models.errors import EduflError
from shared_models.user_files import describe_read_error, loads_toml, read_text

logger = logging.getLogger(__name__)

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
        problems = _check_condition(self, _vocabulary(info), _protected(info))
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
        problems = _check_message(message, _vocabulary(info), _protected(info))
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


def _protected(info: ValidationInfo) -> frozenset[str]:
    """Names a rule may not use: the contract's protected attributes (and their encoded columns)."""
    found: frozenset[str] | None = (info.context or {}).get("protected")
    return found if found is not None else protected_names(default_spec())


def _protected_error(name: str) -> str:
    return (
        f"{name!r} is a protected attribute of the data contract: rules and reasons never name "
        "it (interventions follow from what a student does, not who they are); write the "
        "condition on a behaviour indicator (`edufl client rules indicators`)"
    )


def _check_condition(
    cond: Condition, vocab: dict[str, IndicatorInfo], protected: frozenset[str] = frozenset()
) -> list[str]:
    if cond.indicator in protected:
        return [_protected_error(cond.indicator)]
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


def _check_message(
    message: str, vocab: dict[str, IndicatorInfo], protected: frozenset[str] = frozenset()
) -> list[str]:
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
        if name in protected:
            problems.append(_protected_error(name))
            continue
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
    spec = spec or default_spec()
    context = {"vocabulary": vocabulary(spec), "protected": protected_names(spec)}
    try:
        return RuleSet.model_validate(raw, context=context)
    except ValidationError as exc:
        raise RuleFileError(_describe(exc, raw, source)) from None


def load_rules(path: Path | str | None = None, spec: FeatureSpec | None = None) -> RuleSet:
    """Load a rule file, or the default rules that ship with edufl when ``path`` is None."""
    if path is None:
        text = resources.files("client").joinpath("default_rules.toml").read_text("utf-8")
        return _default_rules(text, spec or default_spec())
    p = Path(path)
    try:
        text = read_text(p)
    except FileNotFoundError:
        raise RuleFileError(f"{p}: rule file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError(f"{p}: cannot read rule file ({describe_read_error(exc)})") from None
    return parse_rules(text, spec, str(p))


def _default_rules(text: str, spec: FeatureSpec) -> RuleSet:
    """The shipped rules, less those naming indicators ``spec`` lacks (one warning names them).

    The defaults are written for the default contract; an institution on a custom contract
    still gets every default rule that makes sense for it rather than a failure.
    """
    raw = loads_toml(text)
    vocab = vocabulary(spec)
    kept, skipped = [], []
    for rule in raw["rule"]:
        names = [c["indicator"] for c in rule.get("when", [])]
        names += [f for _, f, _, _ in string.Formatter().parse(rule.get("message", "")) if f]
        missing = sorted({n for n in names if n not in vocab})
        if missing:
            skipped.append(f"{rule['id']} ({', '.join(missing)})")
        else:
            kept.append(rule)
    if skipped:
        logger.warning(
            "default rules: skipped %d of %d that name indicators contract %r lacks: %s; write "
            "rules for this contract with `edufl client rules init --spec SPEC`",
            len(skipped),
            len(raw["rule"]),
            spec.name,
            "; ".join(skipped),
        )
    if not kept:
        raise RuleFileError(
            f"none of the default rules applies to contract {spec.name!r}; write a rule file "
            "with `edufl client rules init --spec SPEC` and pass it with --rules"
        )
    context = {"vocabulary": vocab, "protected": protected_names(spec)}
    try:
        return RuleSet.model_validate(raw | {"rule": kept}, context=context)
    except ValidationError as exc:
        raise RuleFileError(_describe(exc, raw | {"rule": kept}, "default rules")) from None


def draft_rules(spec: FeatureSpec, source: str = "") -> str:
    """A commented starting rule file for ``spec``: every indicator listed, a few example rules.

    The result always validates against ``spec`` (`parse_rules`); thresholds are placeholders
    an institution should set from its own experience.
    """
    vocab = vocabulary(spec)
    width = max(len(n) for n in vocab)
    marked = [a.name for a in spec.static if a.protected]
    protected = f" ({', '.join(marked)})" if marked else ""
    lines = [
        f"# Intervention rules for contract {spec.name!r} {spec.version}"
        + (f" ({source})" if source else "")
        + ".",
        "# Drafted by `edufl client rules init`; check edits with `edufl client rules check FILE"
        + (f" --spec {source}`." if source else "`."),
        "#",
        "# A rule fires for a student whose tier is in `tiers` and for whom every `when`",
        "# condition holds; a condition on a missing indicator never holds. priority: 1 is the",
        "# most urgent. owner: one of `roles`. The message may name indicators, with a format:",
        "# {name:.0%} for a share, {name:.1f} for a number. Protected attributes are never",
        f"# named{protected}. The format is documented in docs/rules.md.",
        "#",
        "# Indicators of this contract (name, range, meaning):",
        *(
            f"#   {i.name:<{width}}  [{i.low:g}, {i.high:g}]  {_one_line(i.description)}"
            for i in vocab.values()
        ),
        "",
        "version = 1",
        "roles = [" + ", ".join(_toml_str(r) for r in DEFAULT_ROLES) + "]",
    ]
    rules: list[tuple[str, list[str]]] = [
        (
            "high-risk-review",
            [
                'tiers = ["high"]',
                'recommend = "Advisor meeting within a week"',
                "priority = 1",
                'owner = "advisor"',
                'message = "High risk ({risk_probability:.0%}): review engagement and coursework."',
            ],
        )
    ]
    for feature in spec.dynamic[:3]:  # a few examples; the indicator list above has the rest
        name = alias(feature.name)
        label = display(feature)[0]
        message = f"{label.capitalize()} changed by {{{name}_trend:+.2f}} against earlier periods."
        rules.append(
            (
                f"{name.replace('_', '-')}-falling"[:64],
                [
                    'tiers = ["moderate", "high"]',
                    f'when = [{{ indicator = "{name}_trend", op = "<", value = 0 }}]'
                    "  # placeholder: set a real drop",
                    f"recommend = {_toml_str(f'Contact about falling {label}'[:200])}",
                    "priority = 2",
                    'owner = "advisor"',
                    f"message = {_toml_str(message)}",
                ],
            )
        )
    rules.append(
        (
            "moderate-nudge",
            [
                'tiers = ["moderate"]',
                'recommend = "Encouraging message with study resources"',
                "priority = 4",
                'owner = "instructor"',
                'message = "Moderate risk ({risk_probability:.0%}): send study resources."',
            ],
        )
    )
    for rule_id, body in rules:
        lines += ["", "[[rule]]", f"id = {_toml_str(rule_id)}", *body]
    text = "\n".join(lines) + "\n"
    parse_rules(text, spec, "drafted rules")  # a draft that does not validate is a bug here
    return text


def _toml_str(value: str) -> str:
    # JSON's string escapes are all valid TOML basic-string escapes.
    return json.dumps(value, ensure_ascii=False)


def _one_line(text: str) -> str:
    return " ".join(text.split())


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
