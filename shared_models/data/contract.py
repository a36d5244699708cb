"""The consortium data contract: a versioned feature spec every party builds its tensors from.

The spec is an operator-editable TOML file (a default ships with edufl). Two parties check that
they hold the same contract by comparing `FeatureSpec.fingerprint`, a SHA-256 over a canonical
JSON form of the validated spec, so formatting and comments in the TOML do not change it.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared_models.errors import DataContractError
from shared_models.user_files import describe_read_error, loads_toml, read_text

_NAME = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]

#: Key columns every export carries; they are not features.
STUDENT_ID = "student_id"
TERM = "term"
WEEK = "week"


class _Strict(BaseModel):
    # extra="forbid": a typo in a TOML key fails loudly; no NaN or infinite bounds or grades
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DynamicFeature(_Strict):
    """One weekly feature (a column of activity.csv)."""

    name: _NAME
    description: str = ""
    kind: Literal["activity", "assessment"] = "activity"  # activity types form the activity map
    min: float | None = None  # values below are an error in the export
    max: float | None = None  # values above are an error in the export

    @model_validator(mode="after")
    def _range(self) -> DynamicFeature:
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        return self


class StaticAttribute(_Strict):
    """One static attribute (a column of students.csv); categorical ones are one-hot encoded."""

    name: _NAME
    description: str = ""
    kind: Literal["categorical", "numeric"]
    categories: tuple[str, ...] = ()  # categorical only; the one-hot order
    min: float | None = None  # numeric only
    max: float | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> StaticAttribute:
        if self.kind == "categorical":
            if len(self.categories) < 2:
                raise ValueError("a categorical attribute needs at least two categories")
            if len(set(self.categories)) != len(self.categories):
                raise ValueError("categories must be distinct")
            if self.min is not None or self.max is not None:
                raise ValueError("min/max apply to numeric attributes only")
        else:
            if self.categories:
                raise ValueError("categories apply to categorical attributes only")
            if self.min is not None and self.max is not None and self.min >= self.max:
                raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        return self

    @property
    def encoded_names(self) -> tuple[str, ...]:
        if self.kind == "numeric":
            return (self.name,)
        return tuple(f"{self.name}={c}" for c in self.categories)


class TargetSpec(_Strict):
    """The outcome columns and the rule that derives the at-risk label."""

    grade_column: _NAME = "final_grade"
    grade_min: float = 0.0
    grade_max: float = 4.0
    grade_scale: str = "GPA points, 0-4"
    result_column: _NAME = "final_result"
    results: tuple[str, ...] = ("distinction", "pass", "fail", "withdrawn")
    at_risk_below_grade: float = 2.0  # at risk when final grade < this
    at_risk_results: tuple[str, ...] = (
        "fail",
        "withdrawn",
    )  # ... or when the result is one of these

    @model_validator(mode="after")
    def _consistent(self) -> TargetSpec:
        if self.grade_min >= self.grade_max:
            raise ValueError("grade_min must be below grade_max")
        if not self.grade_min <= self.at_risk_below_grade <= self.grade_max:
            raise ValueError("at_risk_below_grade must lie within [grade_min, grade_max]")
        unknown = set(self.at_risk_results) - set(self.results)
        if unknown:
            raise ValueError(f"at_risk_results {sorted(unknown)} are not listed in results")
        if self.grade_column == self.result_column:
            raise ValueError("grade_column and result_column must differ")
        return self

    def at_risk(self, grade: float | None, result: str | None) -> bool:
        """The at-risk rule: grade below the threshold, or an at-risk final result."""
        if result is not None and result in self.at_risk_results:
            return True
        return grade is not None and grade < self.at_risk_below_grade


class FeatureSpec(_Strict):
    """A versioned consortium data contract."""

    name: str = Field(min_length=1)
    version: Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+$")]
    description: str = ""
    weeks: Annotated[int, Field(ge=1, le=104)]
    min_completeness: Annotated[float, Field(ge=0.0, le=1.0)] = 0.6
    dynamic: tuple[DynamicFeature, ...] = Field(min_length=1)
    static: tuple[StaticAttribute, ...] = ()
    target: TargetSpec = TargetSpec()

    @model_validator(mode="after")
    def _unique_names(self) -> FeatureSpec:
        names = [f.name for f in self.dynamic] + [a.name for a in self.static]
        names += [self.target.grade_column, self.target.result_column]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"column names must be unique across the spec; repeated: {dupes}")
        reserved = {STUDENT_ID, TERM, WEEK} & set(names)
        if reserved:
            raise ValueError(f"{sorted(reserved)} are key columns and cannot be features")
        return self

    @property
    def dynamic_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.dynamic)

    @property
    def activity_index(self) -> tuple[int, ...]:
        """Positions of the activity-type features (the CNN-LSTM activity map's columns)."""
        return tuple(i for i, f in enumerate(self.dynamic) if f.kind == "activity")

    @property
    def static_names(self) -> tuple[str, ...]:
        """Static columns after encoding, in tensor order."""
        return tuple(n for a in self.static for n in a.encoded_names)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON form; equal specs give equal fingerprints."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def short_fingerprint(self) -> str:
        return self.fingerprint[:12]

    def to_toml(self) -> str:
        return tomli_w.dumps(self.model_dump(mode="json", exclude_none=True))


def parse_spec(text: str, source: str = "<spec>") -> FeatureSpec:
    """Validate a spec from TOML text; ``source`` names the file in error messages."""
    try:
        raw = loads_toml(text)
    except tomllib.TOMLDecodeError as exc:
        raise DataContractError(f"{source}: not valid TOML ({exc}); fix the syntax") from None
    try:
        return FeatureSpec.model_validate(raw)
    except ValidationError as exc:
        raise DataContractError(_describe(exc, source)) from None


def load_spec(path: Path | str | None = None) -> FeatureSpec:
    """Load a spec file, or the default spec that ships with edufl when ``path`` is None."""
    if path is None:
        text = resources.files("shared_models").joinpath("specs/default.toml").read_text("utf-8")
        return parse_spec(text, "default spec")
    p = Path(path)
    try:
        text = read_text(p)
    except FileNotFoundError:
        raise DataContractError(f"{p}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataContractError(f"{p}: cannot read spec ({describe_read_error(exc)})") from None
    return parse_spec(text, str(p))


def default_spec() -> FeatureSpec:
    return load_spec(None)


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: the feature spec is invalid ({exc.error_count()} problem(s))"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (a typo?); remove or rename it"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)
