"""From a validated export to `CohortArrays`: per-student (weeks, features) tensors and targets."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from shared_models.data.cohort import CohortArrays
from shared_models.data.contract import STUDENT_ID, TERM, WEEK, FeatureSpec, default_spec
from shared_models.data.validate import ParsedExport, validate_export
from shared_models.errors import DataContractError

log = logging.getLogger(__name__)


def load_cohort(
    data_dir: Path | str,
    spec: FeatureSpec | None = None,
    *,
    mapping_path: Path | None = None,
    observed_weeks: int | None = None,
    drop_incomplete: bool = True,
    institution: str | None = None,
) -> CohortArrays:
    """Validate and load one institution export.

    Args:
        data_dir: the export directory.
        spec: the data contract; the default spec when None.
        mapping_path: a mapping file other than ``DATA_DIR/mapping.toml``.
        observed_weeks: build the cohort as seen after this many weeks (early warning); later
            weeks are treated as not yet observed and completeness is judged on the weeks so far.
        drop_incomplete: drop records below the spec's ``min_completeness``.
        institution: name stored with every record; the directory name by default.

    Raises:
        DataContractError: the export is not usable; the message lists the first problems.
    """
    spec = spec or default_spec()
    data_dir = Path(data_dir)
    report, parsed = validate_export(data_dir, spec, mapping_path)
    if parsed is None:
        shown = "\n".join(f"  {p}" for p in report.errors[:10])
        more = len(report.errors) - 10
        tail = (
            f"\n  ... and {more} more; run `edufl client validate {data_dir}`" if more > 0 else ""
        )
        raise DataContractError(f"{data_dir}: export is not usable:\n{shown}{tail}")
    return build_cohort(
        parsed,
        spec,
        observed_weeks=observed_weeks,
        drop_incomplete=drop_incomplete,
        institution=institution or data_dir.resolve().name,
    )


def build_cohort(
    parsed: ParsedExport,
    spec: FeatureSpec,
    *,
    observed_weeks: int | None = None,
    drop_incomplete: bool = True,
    institution: str = "",
) -> CohortArrays:
    """Tensors from typed tables (see `load_cohort` for the arguments)."""
    weeks = spec.weeks
    if observed_weeks is not None and not 1 <= observed_weeks <= weeks:
        raise DataContractError(
            f"observed_weeks must be between 1 and {weeks}, got {observed_weeks}"
        )
    horizon = observed_weeks or weeks
    students = parsed.students
    n, names = len(students), list(spec.dynamic_names)

    index = pd.MultiIndex.from_frame(students[[STUDENT_ID, TERM]])
    activity = parsed.activity[parsed.activity[WEEK] <= horizon]
    pos = index.get_indexer(pd.MultiIndex.from_frame(activity[[STUDENT_ID, TERM]]))
    keep = pos >= 0  # validation already refused unknown students; be safe regardless
    pos, week_idx = pos[keep], activity[WEEK].to_numpy()[keep] - 1
    dynamic = np.full((n, weeks, len(names)), np.nan, dtype=np.float32)
    dynamic[pos, week_idx] = activity[names].to_numpy(dtype=np.float32)[keep]
    week_mask = np.zeros((n, weeks), dtype=np.float32)
    week_mask[pos, week_idx] = 1.0

    static = _encode_static(students, spec)
    grade, at_risk = _targets(parsed.outcomes, index, spec)

    cohort = CohortArrays(
        student_ids=students[STUDENT_ID].to_numpy(dtype=object),
        terms=students[TERM].to_numpy(dtype=object),
        dynamic=dynamic,
        week_mask=week_mask,
        static=static,
        grade=grade,
        at_risk=at_risk,
        dynamic_names=spec.dynamic_names,
        static_names=spec.static_names,
        institution=np.full(n, institution, dtype=object),
    )
    if not drop_incomplete:
        return cohort
    complete = completeness(cohort, horizon) >= spec.min_completeness
    if not complete.all():
        log.info(
            "%s: dropped %d of %d records below %.0f %% completeness",
            institution,
            int((~complete).sum()),
            n,
            100 * spec.min_completeness,
        )
    return cohort.subset(np.flatnonzero(complete))


def completeness(cohort: CohortArrays, horizon: int | None = None) -> np.ndarray:
    """Share of observed (week, feature) cells per record over the first ``horizon`` weeks."""
    horizon = horizon or cohort.n_weeks
    cells = ~np.isnan(cohort.dynamic[:, :horizon, :])
    return cells.reshape(len(cohort), -1).mean(axis=1) if len(cohort) else np.zeros(0)


def _encode_static(students: pd.DataFrame, spec: FeatureSpec) -> np.ndarray:
    cols: list[np.ndarray] = []
    for attr in spec.static:
        values = students[attr.name]
        if attr.kind == "numeric":
            cols.append(values.to_numpy(dtype=np.float32)[:, None])
        else:
            # A missing category is all zeros: "none of the known categories".
            onehot = np.stack(
                [(values == c).to_numpy(dtype=np.float32) for c in attr.categories], 1
            )
            cols.append(onehot)
    if not cols:
        return np.zeros((len(students), 0), dtype=np.float32)
    return np.concatenate(cols, axis=1).astype(np.float32)


def _targets(
    outcomes: pd.DataFrame | None, index: pd.MultiIndex, spec: FeatureSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Grade and at-risk label per record; NaN for both when the outcome is unknown."""
    n = len(index)
    grade = np.full(n, np.nan, dtype=np.float32)
    at_risk = np.full(n, np.nan, dtype=np.float32)
    if outcomes is None or not len(outcomes):
        return grade, at_risk
    pos = index.get_indexer(pd.MultiIndex.from_frame(outcomes[[STUDENT_ID, TERM]]))
    keep = pos >= 0
    grades = outcomes["grade"].to_numpy(dtype=np.float64)
    results = outcomes["result"].to_numpy(dtype=object)
    labels = np.array(
        [
            spec.target.at_risk(
                None if np.isnan(g) else float(g), r if isinstance(r, str) else None
            )
            for g, r in zip(grades, results, strict=True)
        ],
        dtype=np.float32,
    )
    grade[pos[keep]] = grades[keep]
    at_risk[pos[keep]] = labels[keep]
    return grade, at_risk
