"""Column-mapping files: let an export with other column names, codes or units meet the contract.

A mapping file (``mapping.toml`` in the export directory, or passed explicitly) says, per table,
which export column holds each contract column, how export codes translate into the contract's
categories, and by what factor a value must be multiplied (e.g. attendance in percent → share)::

    [files]                       # optional: file names other than students/activity/outcomes.csv
    activity = "lms_weekly_2024.csv"

    [columns.students]            # contract column = export column
    student_id = "pseudo_id"
    program = "faculty"

    [values.gender]               # export code = contract category
    F = "female"
    M = "male"

    [scale]
    attendance_rate = 0.01        # the export has percentages

A student information system often exports one table, one row per student, with the attributes,
the outcome and one column per period and measure. Name the same file for several tables and
declare the per-period columns as patterns; edufl reshapes the table (docs/mapping.md)::

    [files]
    students = "data.csv"
    activity = "data.csv"
    outcomes = "data.csv"

    [defaults]                    # contract columns the export lacks, one value for every row
    student_id = "uci-{row}"      # {row}: the row's number in the file
    term = "2008-2019"

    [wide]                        # activity is wide: {period} takes these values, in order
    periods = ["1st", "2nd"]

    [columns.activity]
    units_approved = "Curricular units {period} sem (approved)"
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared_models.errors import DataContractError
from shared_models.user_files import describe_read_error, load_toml

TABLES = ("students", "activity", "outcomes")
MAPPING_FILE = "mapping.toml"
#: Placeholder of a per-period column pattern, and of the row number in a default value.
PERIOD = "{period}"
ROW = "{row}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TableFiles(_Strict):
    students: str | None = None
    activity: str | None = None
    outcomes: str | None = None


class TableColumns(_Strict):
    students: dict[str, str] = {}
    activity: dict[str, str] = {}
    outcomes: dict[str, str] = {}


class WideTable(_Strict):
    """The activity table is wide: one row per student, one column per period and feature."""

    periods: tuple[Annotated[str, Field(min_length=1)], ...] = Field(min_length=1, max_length=104)

    @model_validator(mode="after")
    def _distinct(self) -> WideTable:
        if len(set(self.periods)) != len(self.periods):
            raise ValueError("periods must be distinct")
        return self


class ColumnMapping(_Strict):
    """A validated mapping file; the empty mapping changes nothing."""

    files: TableFiles = TableFiles()
    columns: TableColumns = TableColumns()
    values: dict[str, dict[str, str]] = {}
    scale: dict[str, Annotated[float, Field(gt=0)]] = {}
    defaults: dict[str, Annotated[str, Field(min_length=1, max_length=200)]] = {}
    wide: WideTable | None = None

    def renames(self, table: str) -> dict[str, str]:
        """Export column name → contract column name for ``table`` (patterns left out)."""
        forward: dict[str, str] = getattr(self.columns, table)
        return {export: contract for contract, export in forward.items() if PERIOD not in export}

    def patterns(self) -> dict[str, str]:
        """Contract feature → per-period column pattern of a wide activity table."""
        return {c: e for c, e in self.columns.activity.items() if PERIOD in e}

    def shared_file(self, table: str) -> str | None:
        """The file ``table`` shares with another table, if the mapping names one twice."""
        named = getattr(self.files, table)
        others = [getattr(self.files, t) for t in TABLES if t != table]
        return named if named is not None and named in others else None


def load_mapping(path: Path) -> ColumnMapping:
    """Read and validate a mapping file, with errors that name the file and the key."""
    try:
        raw = load_toml(path)
    except FileNotFoundError:
        raise DataContractError(f"{path}: mapping file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataContractError(
            f"{path}: cannot read mapping file ({describe_read_error(exc)})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise DataContractError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    try:
        mapping = ColumnMapping.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: "
            + ("unknown key (a typo?)" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        )
        raise DataContractError(f"{path}: invalid mapping file: {problems}") from None
    for table in TABLES:
        targets = list(getattr(mapping.columns, table).values())
        dupes = sorted({t for t in targets if targets.count(t) > 1})
        if dupes:
            raise DataContractError(
                f"{path}: [columns.{table}] maps several contract columns to {dupes}; "
                "each export column can feed one contract column"
            )
    for problem in _shape_problems(mapping):
        raise DataContractError(f"{path}: {problem}")
    return mapping


def _shape_problems(mapping: ColumnMapping) -> list[str]:
    """What makes a wide/shared-table mapping unusable, each with the fix."""
    problems = []
    patterns = mapping.patterns()
    for table in ("students", "outcomes"):
        for contract, export in getattr(mapping.columns, table).items():
            if PERIOD in export:
                problems.append(
                    f"[columns.{table}] {contract} = {export!r}: only activity columns can be "
                    "per-period patterns"
                )
    if patterns and mapping.wide is None:
        problems.append(
            f"[columns.activity] has per-period patterns ({', '.join(sorted(patterns))}) but "
            'no [wide] section; add [wide] periods = ["1", "2", ...] (the values {period} takes)'
        )
    if mapping.wide is not None and not patterns:
        problems.append(
            "[wide] is declared but no [columns.activity] entry is a pattern with {period}; "
            'map each feature, e.g. logins = "Logins week {period}"'
        )
    for column, value in mapping.defaults.items():
        rest = value.replace(ROW, "")
        if "{" in rest or "}" in rest:
            problems.append(
                f"[defaults] {column} = {value!r}: the only placeholder is {ROW}; "
                "write other braces out"
            )
    uses_row = any(ROW in v for v in mapping.defaults.values())
    files = {getattr(mapping.files, t) for t in TABLES}
    if uses_row and (None in files or len(files) > 1):
        problems.append(
            f"[defaults] numbers rows with {ROW}, which matches records only when every table "
            "comes from one file; name that file for students, activity and outcomes in "
            "[files], or export a student_id column"
        )
    return problems


def period_patterns(columns: list[str]) -> dict[str, dict[str, str]]:
    """Per-period column series in a wide table's header: pattern → {period label: column}.

    A column belongs to a series when it differs from another only in one number or ordinal
    (``Curricular units 1st sem (grade)``, ``... 2nd sem (grade)``; ``G1``, ``G2``). Series
    with fewer than two columns are left out; labels are ordered by their number.
    """
    token = re.compile(r"\d+(?:st|nd|rd|th)?", re.IGNORECASE)
    candidates: dict[str, dict[str, str]] = {}
    for column in columns:
        for m in token.finditer(column):
            pattern = column[: m.start()] + PERIOD + column[m.end() :]
            candidates.setdefault(pattern, {})[m.group()] = column
    series = {p: c for p, c in candidates.items() if len(c) >= 2}
    # A column in several series (two numbers in its name) stays in its largest one.
    ranked = sorted(series, key=lambda p: (-len(series[p]), p))
    taken: set[str] = set()
    out: dict[str, dict[str, str]] = {}
    for pattern in ranked:
        members = {k: v for k, v in series[pattern].items() if v not in taken}
        if len(members) >= 2:
            out[pattern] = dict(sorted(members.items(), key=lambda kv: _label_order(kv[0])))
            taken.update(members.values())
    return out


def _label_order(label: str) -> tuple[int, str]:
    digits = re.match(r"\d+", label)
    return (int(digits.group()) if digits else 0, label)


def find_mapping(data_dir: Path, explicit: Path | None) -> ColumnMapping:
    """The mapping given explicitly, else ``DATA_DIR/mapping.toml`` if present, else none."""
    if explicit is not None:
        return load_mapping(explicit)
    default = data_dir / MAPPING_FILE
    return load_mapping(default) if default.is_file() else ColumnMapping()
