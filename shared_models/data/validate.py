"""Checking an institution export against the data contract, read-only.

`validate_export` never modifies anything and never raises for bad data: every problem becomes
a `Problem` naming file, row and column, collected in a `ValidationReport`. The typed tables it
parses on the way are handed to the loader, so an export is parsed once.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from shared_models.data.contract import STUDENT_ID, TERM, WEEK, FeatureSpec
from shared_models.data.export import MISSING_TOKENS, RawTable, read_export
from shared_models.data.identifiers import identifier_kind_by_name, identifier_kind_by_values
from shared_models.data.mapping import PERIOD, ColumnMapping, find_mapping, period_patterns
from shared_models.errors import DataContractError

KEYS = {
    "students": (STUDENT_ID, TERM),
    "activity": (STUDENT_ID, TERM, WEEK),
    "outcomes": (STUDENT_ID, TERM),
}


@dataclass(frozen=True)
class Problem:
    """One finding; ``error`` makes the export unusable, ``warning`` does not."""

    severity: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper():7s} {self.where}: {self.message}"


@dataclass
class ParsedExport:
    """Typed tables of a usable export (contract column names, one row per key)."""

    students: pd.DataFrame
    activity: pd.DataFrame
    outcomes: pd.DataFrame | None


@dataclass
class ValidationReport:
    """What `edufl client validate` prints; ``usable`` when there is no error."""

    data_dir: Path
    spec_name: str
    spec_version: str
    spec_fingerprint: str
    period: str = "week"  # the contract's time step, for "weeks covered" and the like
    rows: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    n_students: int = 0
    weeks_covered: tuple[int, int] | None = None
    students_with_all_weeks: int = 0
    feature_completeness: dict[str, float] = field(default_factory=dict)
    low_completeness: list[tuple[str, str, float]] = field(default_factory=list)
    at_risk_rate: float | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def usable(self) -> bool:
        return not self.errors

    def error(self, where: str, message: str) -> None:
        self.problems.append(Problem("error", where, message))

    def warn(self, where: str, message: str) -> None:
        self.problems.append(Problem("warning", where, message))


def validate_export(
    data_dir: Path, spec: FeatureSpec, mapping_path: Path | None = None
) -> tuple[ValidationReport, ParsedExport | None]:
    """Validate ``data_dir`` against ``spec``; the parsed tables come back only when usable."""
    report = ValidationReport(
        data_dir, spec.name, spec.version, spec.fingerprint, period=spec.period
    )
    try:
        mapping = find_mapping(data_dir, mapping_path)
        raw = read_export(data_dir, mapping)
    except DataContractError as exc:
        report.error(str(data_dir), str(exc))
        return report, None
    for name in ("students", "activity"):
        if name not in raw:
            report.error(str(data_dir), f"no {name}.csv or {name}.parquet; the export needs one")
    if "outcomes" not in raw:
        report.warn(str(data_dir), "no outcomes table: usable for scoring, not for training")
    for name, table in raw.items():
        report.rows[name] = len(table.frame)
        report.files[name] = table.path.name
    if report.errors:
        return report, None
    raw = _project_shared(raw, spec)

    checker = _Checker(spec, mapping, report)
    students = checker.students(raw["students"])
    activity = checker.activity(raw["activity"])
    outcomes = checker.outcomes(raw["outcomes"]) if "outcomes" in raw else None
    if students is None or activity is None or ("outcomes" in raw and outcomes is None):
        return report, None  # a required column is missing: nothing more can be checked
    checker.cross_checks(students, activity, outcomes, raw)
    _summarise(report, spec, students, activity, outcomes)
    if not report.usable:
        return report, None
    return report, ParsedExport(students, activity, outcomes)


class _Checker:
    def __init__(self, spec: FeatureSpec, mapping: ColumnMapping, report: ValidationReport):
        self.spec = spec
        self.mapping = mapping
        self.report = report

    # -- tables ---------------------------------------------------------------------------

    def students(self, table: RawTable) -> pd.DataFrame | None:
        required = [STUDENT_ID, TERM, *(a.name for a in self.spec.static)]
        if not self._columns(table, required):
            return None
        out = self._keys(table)
        for attr in self.spec.static:
            if attr.kind == "numeric":
                out[attr.name] = self._numeric(table, attr.name, attr.min, attr.max)
            else:
                out[attr.name] = self._categorical(table, attr.name, attr.categories)
        return self._unique(table, out)

    def activity(self, table: RawTable) -> pd.DataFrame | None:
        required = [STUDENT_ID, TERM, WEEK, *self.spec.dynamic_names]
        if WEEK not in table.frame.columns and self._looks_wide(table):
            return None
        if table.wide and self.mapping.wide and len(self.mapping.wide.periods) > self.spec.weeks:
            self.report.error(
                table.path.name,
                f"[wide] in mapping.toml lists {len(self.mapping.wide.periods)} periods but the "
                f"contract has {self.spec.weeks} {self.spec.periods}; list the first "
                f"{self.spec.weeks} only",
            )
            return None
        if not self._columns(table, required):
            return None
        out = self._keys(table)
        week = self._numeric(table, WEEK, 1, self.spec.weeks, integer=True, required=True)
        out[WEEK] = week
        for feat in self.spec.dynamic:
            out[feat.name] = self._numeric(table, feat.name, feat.min, feat.max)
        return self._unique(table, out[week.notna()].astype({WEEK: "int64"}))

    def outcomes(self, table: RawTable) -> pd.DataFrame | None:
        t = self.spec.target
        required = [STUDENT_ID, TERM]
        present = [c for c in (t.grade_column, t.result_column) if c in table.frame.columns]
        if not present:
            self.report.error(
                table.path.name,
                f"needs a '{t.grade_column}' or a '{t.result_column}' column to derive the "
                "at-risk label; add one or map it in mapping.toml",
            )
        if not self._columns(table, required + present) or not present:
            return None
        out = self._keys(table)
        out["grade"] = (
            self._numeric(table, t.grade_column, t.grade_min, t.grade_max)
            if t.grade_column in table.frame.columns
            else np.nan
        )
        out["result"] = (
            self._categorical(table, t.result_column, t.results)
            if t.result_column in table.frame.columns
            else None
        )
        neither = out["grade"].isna() & out["result"].isna()
        for row in np.flatnonzero(neither.to_numpy())[:50]:
            self.report.error(
                table.where(int(row)),
                "no grade and no result: the at-risk label "
                "cannot be derived; fill one or drop the row",
            )
        return self._unique(table, out)

    # -- cross-table ----------------------------------------------------------------------

    def cross_checks(
        self,
        students: pd.DataFrame,
        activity: pd.DataFrame,
        outcomes: pd.DataFrame | None,
        raw: dict[str, RawTable],
    ) -> None:
        if students.empty:
            self.report.error(
                raw["students"].path.name,
                "no student rows (only a header, or every row lacks its keys); "
                "export at least one student",
            )
        known = pd.MultiIndex.from_frame(students[[STUDENT_ID, TERM]])
        others = [("activity", activity)] + (
            [("outcomes", outcomes)] if outcomes is not None else []
        )
        for name, frame in others:
            keys = pd.MultiIndex.from_frame(frame[[STUDENT_ID, TERM]])
            orphan = ~keys.isin(known)
            for row in frame.index[orphan][:20]:
                self.report.error(
                    raw[name].where(int(row), STUDENT_ID),
                    f"student '{frame.at[row, STUDENT_ID]}' (term '{frame.at[row, TERM]}') is "
                    f"not in {raw['students'].path.name}; add the student or drop the row",
                )
            if orphan.sum() > 20:
                self.report.error(raw[name].path.name, f"{orphan.sum() - 20} more unknown students")
        no_activity = ~known.isin(pd.MultiIndex.from_frame(activity[[STUDENT_ID, TERM]]))
        if no_activity.any():
            self.report.warn(
                raw["students"].path.name,
                f"{int(no_activity.sum())} student(s) have no weekly activity rows; "
                "they will be dropped as incomplete",
            )

    # -- cells ----------------------------------------------------------------------------

    def _looks_wide(self, table: RawTable) -> bool:
        """Report an activity table with one row per student and per-period columns."""
        series = period_patterns(list(table.file_columns or table.frame.columns))
        if not series:
            return False
        shown = list(series)[:3]
        labels = list(next(iter(series.values())))
        example = "\n".join(f'  feature_{k + 1} = "{p}"' for k, p in enumerate(shown))
        self.report.error(
            table.path.name,
            f"the activity table has no '{WEEK}' column but per-period columns "
            f"({', '.join(repr(p.replace(PERIOD, labels[0])) for p in shown)}, ...): it is a wide "
            "table, one row per student, and needs a reshape. Declare it in mapping.toml:\n"
            f"  [wide]\n  periods = {list(labels)}\n  [columns.activity]\n{example}\n"
            "(contract feature = column pattern); `edufl client mapping init "
            f"{table.path}` drafts the mapping",
        )
        return True

    def _columns(self, table: RawTable, required: list[str]) -> bool:
        cols = list(table.frame.columns)
        ok = True
        for contract, export in table.missing_mapped.items():
            if contract not in required:
                self.report.error(
                    f"{table.path.name}, column '{export}'",
                    self._mapped_absent(table, contract, export),
                )
                ok = False
        for col in cols:
            if col in required or col in table.added:
                continue
            kind = identifier_kind_by_name(col) or identifier_kind_by_values(
                table.frame[col].tolist(), numbers_allowed=False
            )
            if kind:
                self.report.error(
                    f"{table.path.name}, column '{table.original_columns.get(col, col)}'",
                    f"looks like {kind}; direct identifiers must never enter edufl. Remove the "
                    "column from the export (use a keyed pseudonym for student_id)",
                )
                ok = False
            else:
                self.report.warn(
                    f"{table.path.name}, column '{table.original_columns.get(col, col)}'",
                    "not in the data contract; ignored",
                )
        for col in required:
            if col in table.missing_mapped:
                export = table.missing_mapped[col]
                self.report.error(
                    f"{table.path.name}, column '{export}'",
                    self._mapped_absent(table, col, export),
                )
                ok = False
            elif col not in cols:
                self.report.error(
                    f"{table.path.name}, column '{col}'",
                    f"required column is missing; add it, or map the export's column to '{col}' "
                    f"in mapping.toml under [columns.{table.name}]{self._closest(table, col)}",
                )
                ok = False
        if STUDENT_ID in cols:
            kind = identifier_kind_by_values(
                table.frame[STUDENT_ID].tolist(), numbers_allowed=False
            )
            if kind:
                self.report.error(
                    f"{table.path.name}, column '{table.original_columns.get(STUDENT_ID)}'",
                    f"student IDs look like {kind}; use a keyed pseudonym instead",
                )
                ok = False
        return ok

    def _mapped_absent(self, table: RawTable, contract: str, export: str) -> str:
        section = f"[columns.{table.name}] {contract}"
        hint = _closest_column(export, table.file_columns)
        fix = f"did you mean '{hint}'? " if hint else ""
        return (
            f"mapped to '{contract}' in mapping.toml ({section}), but {table.path.name} has no "
            f"column '{export}'; {fix}fix the name in the mapping (columns: "
            f"{_preview(table.file_columns)})"
        )

    def _closest(self, table: RawTable, contract: str) -> str:
        """``; did you mean ...`` naming the unmapped export column closest to ``contract``."""
        mapped = {file for col, file in table.original_columns.items() if col != file}
        candidates = [c for c in table.file_columns if c not in mapped]
        hint = _closest_column(contract, candidates)
        return f"; the closest export column is '{hint}'" if hint else ""

    def _keys(self, table: RawTable) -> pd.DataFrame:
        out = pd.DataFrame(index=table.frame.index)
        for key in (STUDENT_ID, TERM):
            values = table.frame[key].astype(str).str.strip()
            missing = _missing(values).to_numpy()
            for row in np.flatnonzero(missing)[:50]:
                self.report.error(
                    table.where(int(row), key), f"{key} is empty; every row needs one"
                )
            out[key] = values.astype(object)
        return out

    def _numeric(
        self,
        table: RawTable,
        column: str,
        lo: float | None,
        hi: float | None,
        *,
        integer: bool = False,
        required: bool = False,
    ) -> pd.Series:
        text = table.frame[column].astype(str).str.strip()
        missing = _missing(text)
        values = pd.to_numeric(text.where(~missing), errors="coerce").astype("float64")
        factor = self.mapping.scale.get(column)
        if factor is not None:
            values = values * factor
        bad_text = (~missing & values.isna()) | ~np.isfinite(values.fillna(0.0))
        self._report_rows(table, column, bad_text, lambda r: f"'{text[r]}' is not a number")
        values[bad_text] = np.nan
        if integer:
            frac = values.notna() & (values != values.round())
            self._report_rows(table, column, frac, lambda r: f"'{text[r]}' is not a whole number")
            values[frac] = np.nan
        if lo is not None or hi is not None:
            low = values < lo if lo is not None else pd.Series(False, index=values.index)
            high = values > hi if hi is not None else pd.Series(False, index=values.index)
            out_of_range = low | high
            rng = f"[{_fmt(lo, '-inf')}, {_fmt(hi)}]"
            self._report_rows(
                table,
                column,
                out_of_range,
                lambda r: f"{values[r]:g} is outside the allowed range {rng}",
            )
            values[out_of_range] = np.nan
        if required:
            self._report_rows(table, column, missing, lambda r: "value is missing; it is required")
        return values

    def _categorical(self, table: RawTable, column: str, categories: tuple[str, ...]) -> pd.Series:
        text = table.frame[column].astype(str).str.strip()
        missing = _missing(text)
        codes = self.mapping.values.get(column, {})
        mapped = text.map(lambda v: codes.get(v, v))
        lookup = {c.lower(): c for c in categories}
        canonical = mapped.map(lambda v: lookup.get(v.lower()))
        bad = ~missing & canonical.isna()
        allowed = ", ".join(categories)
        self._report_rows(
            table,
            column,
            bad,
            lambda r: (
                f"'{text[r]}' is not one of: {allowed} "
                f"(map export codes under [values.{column}] in mapping.toml)"
            ),
        )
        return canonical.where(~missing, None).astype(object)

    def _unique(self, table: RawTable, out: pd.DataFrame) -> pd.DataFrame:
        """Report repeated keys (keeping the first) and drop rows without keys."""
        keys = list(KEYS[table.name])
        has_keys = (out[STUDENT_ID] != "") & (out[TERM] != "")
        has_keys &= ~_missing(out[STUDENT_ID]) & ~_missing(out[TERM])
        dup = out.duplicated(subset=keys, keep="first") & has_keys
        first_seen = (
            out.index.to_series().groupby([out[k] for k in keys], sort=False).transform("min")
        )

        def message(row: int) -> str:
            key = ", ".join(f"{k}={out.at[row, k]}" for k in keys)
            return (
                f"duplicate row for {key} (first at {table.where(int(first_seen[row]))}); keep one"
            )

        self._report_rows(table, keys[-1], dup, message)
        return out[has_keys & ~dup].reset_index(drop=True)

    def _report_rows(
        self, table: RawTable, column: str, bad: pd.Series, message: Callable[[int], str]
    ) -> None:
        rows = bad.index[bad.to_numpy(dtype=bool)]  # labels = row positions in the file
        for row in rows[:50]:
            self.report.error(table.where(int(row), column), message(int(row)))
        if len(rows) > 50:
            self.report.error(
                f"{table.path.name}, column '{column}'",
                f"{len(rows) - 50} more rows with the same problem",
            )


def _summarise(
    report: ValidationReport,
    spec: FeatureSpec,
    students: pd.DataFrame,
    activity: pd.DataFrame,
    outcomes: pd.DataFrame | None,
) -> None:
    names = list(spec.dynamic_names)
    report.n_students = len(students)
    if len(activity):
        report.weeks_covered = (int(activity[WEEK].min()), int(activity[WEEK].max()))
    expected = max(len(students), 1) * spec.weeks
    observed = activity[names].notna().sum()
    report.feature_completeness = {n: float(observed[n]) / expected for n in names}
    per_student = activity.groupby([STUDENT_ID, TERM], sort=False).agg(
        weeks=(WEEK, "nunique"), **{f"_{n}": (n, "count") for n in names}
    )
    report.students_with_all_weeks = int((per_student["weeks"] == spec.weeks).sum())
    cells = per_student[[f"_{n}" for n in names]].sum(axis=1) / (spec.weeks * len(names))
    cells = cells.reindex(pd.MultiIndex.from_frame(students[[STUDENT_ID, TERM]]), fill_value=0.0)
    low = cells[cells < spec.min_completeness]
    report.low_completeness = [(str(s), str(t), float(c)) for (s, t), c in low.items()]
    if outcomes is not None and len(outcomes):
        labels = [
            spec.target.at_risk(None if pd.isna(g) else float(g), r)
            for g, r in zip(outcomes["grade"], outcomes["result"], strict=True)
        ]
        report.at_risk_rate = float(np.mean(labels))
        missing_outcome = ~pd.MultiIndex.from_frame(students[[STUDENT_ID, TERM]]).isin(
            pd.MultiIndex.from_frame(outcomes[[STUDENT_ID, TERM]])
        )
        if missing_outcome.any():
            report.warn(
                report.files.get("outcomes", "outcomes"),
                f"{int(missing_outcome.sum())} student(s) have no outcome row; they can be "
                "scored but are not used for training",
            )


def _project_shared(raw: dict[str, RawTable], spec: FeatureSpec) -> dict[str, RawTable]:
    """Tables read from one file keep their own columns; the file's unused ones go to the
    first of them only, so each is reported (or refused as an identifier) once."""
    needed = {
        "students": {STUDENT_ID, TERM, *(a.name for a in spec.static)},
        "activity": {STUDENT_ID, TERM, WEEK, *spec.dynamic_names},
        "outcomes": {STUDENT_ID, TERM, spec.target.grade_column, spec.target.result_column},
    }
    out = dict(raw)
    for path in {t.path for t in raw.values()}:
        group = [name for name, t in raw.items() if t.path == path]
        if len(group) < 2:
            continue
        claimed = set().union(*(needed[n] for n in group))
        consumed = set().union(*(raw[n].consumed for n in group))
        for k, name in enumerate(group):
            table = raw[name]
            keep = [
                c
                for c in table.frame.columns
                if c in needed[name]
                or (
                    k == 0
                    and c not in claimed
                    and table.original_columns.get(c, c) not in consumed
                    and c not in table.added
                )
            ]
            out[name] = replace(table, frame=table.frame[keep])
    return out


def _closest_column(name: str, columns: tuple[str, ...] | list[str]) -> str | None:
    """The column most like ``name``, ignoring case and punctuation; None when none is close."""

    def norm(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum())

    by_norm = {norm(c): c for c in columns}
    match = difflib.get_close_matches(norm(name), list(by_norm), n=1, cutoff=0.6)
    return by_norm[match[0]] if match else None


def _preview(columns: tuple[str, ...], limit: int = 8) -> str:
    shown = ", ".join(f"'{c}'" for c in columns[:limit])
    return shown + (f" and {len(columns) - limit} more" if len(columns) > limit else "")


_MISSING_TOKENS = sorted(MISSING_TOKENS)


def _missing(text: pd.Series) -> pd.Series:
    """Boolean mask of missing cells (`export.is_missing` of each, and NaN); bool even when empty.

    Vectorised (pandas' string methods, Arrow-backed): a quarter of a validation's time was
    calling `export.is_missing` once per cell.
    """
    return (text.str.strip().str.lower().isin(_MISSING_TOKENS) | text.isna()).astype(bool)


def _fmt(v: float | None, unbounded: str = "inf") -> str:
    return unbounded if v is None else f"{v:g}"
