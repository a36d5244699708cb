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
    # Training inputs are clamped to [clip_min or min, clip_max or max] before normalisation,
    # so one extreme record cannot move anyone else's input; values above clip_max are valid.
    clip_min: float | None = None
    clip_max: float | None = None
    # Contract normalisation: (value - center) / scale; by default the training range's
    # midpoint and half-width, so the range maps onto [-1, 1] and a missing value onto 0.
    center: float | None = None
    scale: Annotated[float, Field(gt=0)] | None = None
    # Applied after clamping, before centring: "log1p" maps a count c onto log(1 + c), and
    # `center`/`scale` (and their defaults, from the clamped range) are then in log units.
    # For heavy-tailed counts (clicks): an ordinary week becomes an input of about 1 instead of
    # a few hundredths of the range, which DP-SGD's per-student clipping needs to see it
    # (docs/results.md, "Clicks on a log scale"). Contract normalisation only: `train-zscore`
    # ignores it, as it ignores `center` and `scale`.
    transform: Literal["log1p"] | None = None

    @model_validator(mode="after")
    def _range(self) -> DynamicFeature:
        if self.min is not None and self.max is not None and self.min >= self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        _check_training_range(self.min, self.max, self.clip_min, self.clip_max)
        low = self.training_range[0]
        if self.transform == "log1p" and (low is None or low < 0):
            raise ValueError(
                f'transform = "log1p" is for counts: set min = 0 (or clip_min >= 0), got '
                f"{'no lower bound' if low is None else f'a training range from {low}'}"
            )
        return self

    @property
    def training_range(self) -> tuple[float | None, float | None]:
        """The clamp bounds of training inputs (None where the contract sets none)."""
        return _training_range(self.min, self.max, self.clip_min, self.clip_max)


class StaticAttribute(_Strict):
    """One static attribute (a column of students.csv); categorical ones are one-hot encoded."""

    name: _NAME
    description: str = ""
    kind: Literal["categorical", "numeric"]
    categories: tuple[str, ...] = ()  # categorical only; the one-hot order
    min: float | None = None  # numeric only; values outside [min, max] are an export error
    max: float | None = None
    clip_min: float | None = None  # numeric only; as DynamicFeature's
    clip_max: float | None = None
    center: float | None = None
    scale: Annotated[float, Field(gt=0)] | None = None
    # Reports break fairness down by a protected attribute; no reason or rule may name it.
    protected: bool = False

    @model_validator(mode="after")
    def _kind_fields(self) -> StaticAttribute:
        if self.kind == "categorical":
            if len(self.categories) < 2:
                raise ValueError("a categorical attribute needs at least two categories")
            if len(set(self.categories)) != len(self.categories):
                raise ValueError("categories must be distinct")
            numeric_only = (self.min, self.max, self.clip_min, self.clip_max, self.center)
            if any(v is not None for v in numeric_only) or self.scale is not None:
                raise ValueError(
                    "min/max/clip_min/clip_max/center/scale apply to numeric attributes only"
                )
        else:
            if self.categories:
                raise ValueError("categories apply to categorical attributes only")
            if self.min is not None and self.max is not None and self.min >= self.max:
                raise ValueError(f"min ({self.min}) must be below max ({self.max})")
            _check_training_range(self.min, self.max, self.clip_min, self.clip_max)
        return self

    @property
    def training_range(self) -> tuple[float | None, float | None]:
        """The clamp bounds of training inputs (None where the contract sets none)."""
        return _training_range(self.min, self.max, self.clip_min, self.clip_max)

    @property
    def encoded_names(self) -> tuple[str, ...]:
        if self.kind == "numeric":
            return (self.name,)
        return tuple(f"{self.name}={c}" for c in self.categories)


def _training_range(
    lo: float | None, hi: float | None, clip_lo: float | None, clip_hi: float | None
) -> tuple[float | None, float | None]:
    return (lo if clip_lo is None else clip_lo, hi if clip_hi is None else clip_hi)


def _check_training_range(
    lo: float | None, hi: float | None, clip_lo: float | None, clip_hi: float | None
) -> None:
    if clip_lo is not None and lo is not None and clip_lo < lo:
        raise ValueError(f"clip_min ({clip_lo}) must not be below min ({lo})")
    if clip_hi is not None and hi is not None and clip_hi > hi:
        raise ValueError(f"clip_max ({clip_hi}) must not be above max ({hi})")
    low, high = _training_range(lo, hi, clip_lo, clip_hi)
    if low is not None and high is not None and low >= high:
        raise ValueError(f"the training range [{low}, {high}] is empty; check clip_min/clip_max")


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


#: The time step a contract may name, and its approximate length in weeks.
PERIOD_WEEKS: dict[str, float] = {
    "day": 1 / 7,
    "week": 1.0,
    "fortnight": 2.0,
    "month": 52 / 12,
    "quarter": 13.0,
    "trimester": 13.0,
    "term": 13.0,
    "semester": 20.0,
    "year": 52.0,
}
#: Weeks a "recent" indicator window covers; in other periods, as many periods as come closest.
RECENT_WINDOW_WEEKS = 4


class FeatureSpec(_Strict):
    """A versioned consortium data contract.

    ``weeks`` is the number of time steps of a term; ``period`` names the step ("week" unless
    the export is per semester, per month...). Step numbers run 1..weeks whatever the period.
    """

    name: str = Field(min_length=1)
    version: Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+$")]
    description: str = ""
    period: Literal[
        "day", "week", "fortnight", "month", "quarter", "trimester", "term", "semester", "year"
    ] = "week"
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
    def periods(self) -> str:
        """The period's plural, for sentences ("weeks", "semesters")."""
        return f"{self.period}s" if self.period != "day" else "days"

    @property
    def recent_periods(self) -> int:
        """Periods in the "recent" indicator window: 4 weeks, or the periods closest to it.

        At least one period, so a two-semester contract compares its last semester with the
        first rather than finding every window empty.
        """
        return max(1, round(RECENT_WINDOW_WEEKS / PERIOD_WEEKS[self.period]))

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON form; equal specs give equal fingerprints."""
        form = self.model_dump(mode="json")
        if form["period"] == "week":
            del form["period"]  # the default: contracts written before `period` keep their hash
        for feature in form["dynamic"]:
            if feature["transform"] is None:
                del feature["transform"]  # likewise for contracts written before `transform`
        canonical = json.dumps(form, sort_keys=True, separators=(",", ":"))
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
