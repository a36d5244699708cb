"""In-memory tensors of one cohort, built from an institution export and the data contract.

`CohortArrays` is the hand-off between data loading (``client``/``simulations``) and every model,
training loop and baseline in edufl. It holds raw (unnormalised) values with missing cells as NaN;
`Normalizer` is fitted on a training split only and turns them into model inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import numpy as np


@dataclass(frozen=True)
class CohortArrays:
    """Per-student arrays of one or more institution exports.

    Attributes:
        student_ids: pseudonymous ``student_id`` of each record, shape (n,).
        terms: ``term`` of each record, shape (n,). A record is one (student_id, term).
        dynamic: weekly features, float32 (n, weeks, n_dynamic); NaN where a value is missing.
        week_mask: 1.0 where the week was observed (a row exists), else 0.0; float32 (n, weeks).
        static: static attributes after one-hot encoding, float32 (n, n_static); NaN if missing.
        grade: final grade on the contract's scale, float32 (n,); NaN when not graded.
        at_risk: the contract's at-risk label, float32 (n,): 0.0 / 1.0, NaN when the outcome
            is not known yet (scoring-only exports).
        dynamic_names: names of the dynamic features, in tensor order.
        static_names: names of the static columns after encoding (``program=stem`` ...).
        institution: name of the institution of each record, shape (n,).
    """

    student_ids: np.ndarray
    terms: np.ndarray
    dynamic: np.ndarray
    week_mask: np.ndarray
    static: np.ndarray
    grade: np.ndarray
    at_risk: np.ndarray
    dynamic_names: tuple[str, ...]
    static_names: tuple[str, ...]
    institution: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))

    def __post_init__(self) -> None:
        n = len(self.student_ids)
        for name in ("terms", "dynamic", "week_mask", "static", "grade", "at_risk"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"CohortArrays.{name} has {len(getattr(self, name))} rows, expected {n}"
                )
        if len(self.institution) not in (0, n):
            raise ValueError("CohortArrays.institution must be empty or have one entry per record")

    def __len__(self) -> int:
        return len(self.student_ids)

    @property
    def n_weeks(self) -> int:
        return int(self.dynamic.shape[1])

    @property
    def n_dynamic(self) -> int:
        return int(self.dynamic.shape[2])

    @property
    def n_static(self) -> int:
        return int(self.static.shape[1])

    def subset(self, index: np.ndarray) -> CohortArrays:
        """Rows ``index`` (an integer or boolean array) as a new cohort."""
        inst = self.institution[index] if len(self.institution) else self.institution
        return CohortArrays(
            student_ids=self.student_ids[index],
            terms=self.terms[index],
            dynamic=self.dynamic[index],
            week_mask=self.week_mask[index],
            static=self.static[index],
            grade=self.grade[index],
            at_risk=self.at_risk[index],
            dynamic_names=self.dynamic_names,
            static_names=self.static_names,
            institution=inst,
        )

    def truncate_weeks(self, observed_weeks: int) -> CohortArrays:
        """The cohort as seen after ``observed_weeks`` weeks: later weeks are masked out.

        Shapes stay the same (the contract fixes them); later weeks become missing, which is
        what early-warning scoring part-way through a term sees.
        """
        if not 1 <= observed_weeks <= self.n_weeks:
            raise ValueError(f"observed_weeks must be in 1..{self.n_weeks}, got {observed_weeks}")
        dynamic = self.dynamic.copy()
        dynamic[:, observed_weeks:, :] = np.nan
        mask = self.week_mask.copy()
        mask[:, observed_weeks:] = 0.0
        return CohortArrays(
            student_ids=self.student_ids,
            terms=self.terms,
            dynamic=dynamic,
            week_mask=mask,
            static=self.static,
            grade=self.grade,
            at_risk=self.at_risk,
            dynamic_names=self.dynamic_names,
            static_names=self.static_names,
            institution=self.institution,
        )

    @staticmethod
    def concatenate(parts: list[CohortArrays]) -> CohortArrays:
        """Pool several cohorts built from the same contract (centralized upper bound)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if p.dynamic_names != first.dynamic_names or p.static_names != first.static_names:
                raise ValueError("cohorts were built from different data contracts")
            if p.n_weeks != first.n_weeks:
                raise ValueError("cohorts have different numbers of weeks")
        insts = [
            p.institution if len(p.institution) else np.full(len(p), "", dtype=object)
            for p in parts
        ]
        return CohortArrays(
            student_ids=np.concatenate([p.student_ids for p in parts]),
            terms=np.concatenate([p.terms for p in parts]),
            dynamic=np.concatenate([p.dynamic for p in parts]),
            week_mask=np.concatenate([p.week_mask for p in parts]),
            static=np.concatenate([p.static for p in parts]),
            grade=np.concatenate([p.grade for p in parts]),
            at_risk=np.concatenate([p.at_risk for p in parts]),
            dynamic_names=first.dynamic_names,
            static_names=first.static_names,
            institution=np.concatenate(insts),
        )


@dataclass(frozen=True)
class ModelInputs:
    """Normalised, imputed float32 arrays ready for a model or a baseline.

    Attributes:
        dynamic: (n, weeks, n_dynamic), z-scored with training statistics; 0 where missing and
            in unobserved weeks.
        week_mask: (n, weeks), 1.0 for observed weeks.
        static: (n, n_static), numeric columns z-scored, one-hot columns as 0/1; 0 where missing.
        grade: (n,), the grade scaled to [0, 1] by the contract's range; NaN when ungraded.
        at_risk: (n,), 0.0 / 1.0.
    """

    dynamic: np.ndarray
    week_mask: np.ndarray
    static: np.ndarray
    grade: np.ndarray
    at_risk: np.ndarray

    def __len__(self) -> int:
        return len(self.at_risk)

    def flat(self) -> np.ndarray:
        """Flattened features for the scikit-learn baselines: dynamic, mask, static."""
        n = len(self)
        return np.concatenate(
            [self.dynamic.reshape(n, -1), self.week_mask, self.static], axis=1
        ).astype(np.float32)

    @staticmethod
    def concatenate(parts: list[ModelInputs]) -> ModelInputs:
        """Pool several institutions' inputs, each normalised as its institution did."""
        return ModelInputs(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(ModelInputs))
        )


@dataclass
class Normalizer:
    """Z-scores dynamic and static numeric features with statistics of a training split only.

    Fitted on the training split (the CNN-LSTM paper's per-semester z-score), then applied to
    validation, test and scoring data so nothing leaks from held-out students.
    """

    grade_min: float
    grade_max: float
    dyn_mean: np.ndarray | None = None
    dyn_std: np.ndarray | None = None
    static_mean: np.ndarray | None = None
    static_std: np.ndarray | None = None

    def fit(self, cohort: CohortArrays) -> Normalizer:
        observed = cohort.dynamic[cohort.week_mask > 0]  # (cells, n_dynamic)
        self.dyn_mean = _nan_stat(np.nanmean, observed, 0.0)
        self.dyn_std = _nan_stat(np.nanstd, observed, 1.0)
        self.static_mean = _nan_stat(np.nanmean, cohort.static, 0.0)
        self.static_std = _nan_stat(np.nanstd, cohort.static, 1.0)
        return self

    def transform(self, cohort: CohortArrays) -> ModelInputs:
        if self.dyn_mean is None or self.dyn_std is None:
            raise RuntimeError("Normalizer.transform called before fit")
        assert self.static_mean is not None and self.static_std is not None
        dyn = (cohort.dynamic - self.dyn_mean) / self.dyn_std
        dyn = np.where(np.isnan(dyn), 0.0, dyn)
        dyn = dyn * cohort.week_mask[..., None]
        static = (cohort.static - self.static_mean) / self.static_std
        static = np.where(np.isnan(static), 0.0, static)
        span = self.grade_max - self.grade_min
        grade = (cohort.grade - self.grade_min) / span
        return ModelInputs(
            dynamic=dyn.astype(np.float32),
            week_mask=cohort.week_mask.astype(np.float32),
            static=static.astype(np.float32),
            grade=grade.astype(np.float32),
            at_risk=cohort.at_risk.astype(np.float32),
        )

    def grade_to_scale(self, scaled: np.ndarray) -> np.ndarray:
        """Map a model's [0, 1] grade output back to the contract's grade scale."""
        return self.grade_min + np.asarray(scaled) * (self.grade_max - self.grade_min)

    def state(self) -> dict[str, list[float] | float]:
        """JSON-serialisable state (saved next to model weights; no pickle)."""
        if self.dyn_mean is None:
            raise RuntimeError("Normalizer.state called before fit")
        assert self.dyn_std is not None and self.static_mean is not None
        assert self.static_std is not None
        return {
            "grade_min": self.grade_min,
            "grade_max": self.grade_max,
            "dyn_mean": self.dyn_mean.tolist(),
            "dyn_std": self.dyn_std.tolist(),
            "static_mean": self.static_mean.tolist(),
            "static_std": self.static_std.tolist(),
        }

    @classmethod
    def from_state(cls, state: dict[str, object]) -> Normalizer:
        def arr(key: str) -> np.ndarray:
            return np.asarray(state[key], dtype=np.float64)

        return cls(
            grade_min=float(state["grade_min"]),  # type: ignore[arg-type]
            grade_max=float(state["grade_max"]),  # type: ignore[arg-type]
            dyn_mean=arr("dyn_mean"),
            dyn_std=arr("dyn_std"),
            static_mean=arr("static_mean"),
            static_std=arr("static_std"),
        )


def _nan_stat(fn: Callable[..., np.ndarray], values: np.ndarray, fallback: float) -> np.ndarray:
    """Column statistic ignoring NaN; ``fallback`` for all-missing or zero-spread columns."""
    n_cols = values.shape[-1]
    if values.size == 0:
        return np.full(n_cols, fallback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns are handled below
        out = np.asarray(fn(values, axis=0), dtype=np.float64)
    bad = ~np.isfinite(out)
    if fallback == 1.0:
        bad |= out < 1e-8
    out[bad] = fallback
    return out
