"""UCI Student Performance (Cortez & Silva 2008) as institution exports.

Two ``;``-separated files, ``student-mat.csv`` (Math, 395 rows) and ``student-por.csv``
(Portuguese, 649 rows), from the download folder or its zip. A record is one row: the files
carry no student identifier (382 students appear in both, matchable only by their attributes),
so ``student_id`` is the subject and row number (``mat-001``). The first two period grades form
a two-step sequence (week 1 = G1, week 2 = G2); G3 is the grade target and pass = G3 >= 10.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from shared_models.data.contract import FeatureSpec, load_spec
from shared_models.errors import DataContractError
from simulations.datasets.sources import DatasetFiles, category, integers
from simulations.partition import PooledTables, export_partitions

NAME = "uci"
SPEC_PATH = Path(__file__).resolve().parent / "spec.toml"
CITATION = "Cortez and Silva (2008), UCI Machine Learning Repository id 320; CC BY 4.0"
NATURAL_PARTITIONS = {
    "school": "one institution per school (GP, MS), both subjects pooled",
    "school-subject": "one per school and subject (GP-mat, GP-por, MS-mat, MS-por)",
}
DEFAULT_PARTITION = "school-subject"
SUBJECTS = {"mat": "student-mat.csv", "por": "student-por.csv"}
WEEKS = 2
TERM = "2005-2006"  # the school year Cortez & Silva collected the data in
#: student.txt's column → contract name (contract names are lower-case).
COLUMNS = {
    "school": "school", "sex": "sex", "age": "age", "address": "address", "famsize": "famsize",
    "Pstatus": "pstatus", "Medu": "medu", "Fedu": "fedu", "Mjob": "mjob", "Fjob": "fjob",
    "reason": "reason", "guardian": "guardian", "traveltime": "traveltime",
    "studytime": "studytime", "failures": "failures", "schoolsup": "schoolsup",
    "famsup": "famsup", "paid": "paid", "activities": "activities", "nursery": "nursery",
    "higher": "higher", "internet": "internet", "romantic": "romantic", "famrel": "famrel",
    "freetime": "freetime", "goout": "goout", "Dalc": "dalc", "Walc": "walc", "health": "health",
    "absences": "absences",
}  # fmt: skip
GRADES = ("G1", "G2", "G3")


def spec(week: int | None = None) -> FeatureSpec:
    """The UCI contract; with ``week=1`` the "as of period 1" variant (G1 only)."""
    base = load_spec(SPEC_PATH)
    if week is None:
        return base
    _check_week(week)
    return base.model_copy(update={"weeks": week})


def load(
    path: Path | str, *, week: int | None = None, subjects: tuple[str, ...] = ("mat", "por")
) -> PooledTables:
    """Both subjects (or ``subjects``) of the download at ``path`` as pooled export tables."""
    if week is not None:
        _check_week(week)
    unknown = sorted(set(subjects) - set(SUBJECTS))
    if unknown or not subjects:
        raise DataContractError(f"subjects must be among {sorted(SUBJECTS)}, got {list(subjects)}")
    files = DatasetFiles(path, tuple(SUBJECTS[s] for s in subjects), "UCI Student Performance")
    contract = load_spec(SPEC_PATH)
    frames = [_read_subject(files, subject, contract) for subject in subjects]
    records = pd.concat(frames, ignore_index=True)
    horizon = week or WEEKS
    ids, terms = records["student_id"].to_numpy(), records["term"].to_numpy()
    activity = pd.DataFrame(
        {
            "student_id": np.repeat(ids, horizon),
            "term": np.repeat(terms, horizon),
            "week": np.tile(np.arange(1, horizon + 1), len(records)),
            "period_grade": records[list(GRADES[:horizon])].to_numpy().reshape(-1),
        }
    )
    g3 = records["G3"].to_numpy()
    outcomes = pd.DataFrame(
        {
            "student_id": ids,
            "term": terms,
            "final_grade": g3,
            "final_result": np.where(g3 >= contract.target.at_risk_below_grade, "pass", "fail"),
        }
    )
    static = [a.name for a in contract.static]
    students = records[["student_id", "term", *static]].copy()
    school = records["school"].to_numpy(dtype=object)
    groups = {"school": school, "school-subject": school + "-" + records["subject"].to_numpy()}
    return PooledTables(students, activity, outcomes, groups)


def to_exports(
    path: Path | str,
    out_dir: Path,
    *,
    partition: str = DEFAULT_PARTITION,
    week: int | None = None,
    seed: int = 0,
    alpha: float = 0.5,
    clients: int | None = None,
    subjects: tuple[str, ...] = ("mat", "por"),
) -> list[Path]:
    """Write one institution export per part of ``partition`` into ``out_dir``."""
    contract = spec(week)
    tables = load(path, week=week, subjects=subjects)
    about = {"dataset": NAME, "source": str(path), "citation": CITATION}
    return export_partitions(
        tables, contract, out_dir, partition, seed=seed, alpha=alpha, clients=clients, about=about
    )


def _check_week(week: int) -> None:
    if week not in (1, WEEKS):
        raise DataContractError(f"the cut-off period must be 1 (G1) or 2 (G1 and G2), got {week}")


def _read_subject(files: DatasetFiles, subject: str, contract: FeatureSpec) -> pd.DataFrame:
    name = SUBJECTS[subject]
    raw = files.read_text(name, (*COLUMNS, *GRADES), sep=";")
    where = files.where(name)
    out = pd.DataFrame({"student_id": [f"{subject}-{i + 1:03d}" for i in range(len(raw))]})
    out["term"] = TERM
    attrs = {a.name: a for a in contract.static}
    for column, attr_name in COLUMNS.items():
        attr = attrs[attr_name]
        if attr.kind == "categorical":
            out[attr_name] = category(raw[column], attr.categories, column, where)
        else:
            values = integers(raw[column], column, where)
            _in_range(values, attr.min, attr.max, column, where)
            out[attr_name] = values.astype(np.int64)
    out["subject"] = subject
    for grade in GRADES:
        values = integers(raw[grade], grade, where)
        _in_range(values, 0, 20, grade, where)
        out[grade] = values.astype(np.int64)
    return out


def _in_range(
    values: np.ndarray, lo: float | None, hi: float | None, column: str, where: str
) -> None:
    low, high = (-np.inf if lo is None else lo), (np.inf if hi is None else hi)
    bad = (values < low) | (values > high)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataContractError(
            f"{where} line {row + 2}, column '{column}': {values[row]:g} is outside "
            f"[{low:g}, {high:g}] (see student.txt)"
        )
