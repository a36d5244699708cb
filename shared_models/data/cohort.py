"""In-memory tensors of one cohort, built from an institution export and the data contract.

`CohortArrays` is the hand-off between data loading (``client``/``simulations``) and every model,
training loop and baseline in edufl. It holds raw (unnormalised) values with missing cells as NaN;
`Normalizer` (from the contract's constants, or fitted on a training split) turns them into
model inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from shared_models.errors import DataContractError

if TYPE_CHECKING:
    from shared_models.data.contract import FeatureSpec


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
        dynamic: (n, weeks, n_dynamic), clamped and scaled by the contract's ranges (or z-scored
            with training statistics, see `Normalizer`); 0 where missing and in unobserved weeks.
        week_mask: (n, weeks), 1.0 for observed weeks.
        static: (n, n_static), numeric columns scaled like ``dynamic``, one-hot columns 0/1 under
            contract normalisation (z-scored under train-zscore); 0 where missing.
        grade: (n,), the grade scaled to [0, 1] by the contract's range; NaN when ungraded.
        at_risk: (n,), 0.0 / 1.0.
        student_ids: (n,), the pseudonymous student of each record (the unit of privacy: DP-SGD
            samples students, `privacy.sampling`); empty when unknown (each record its own).
    """

    dynamic: np.ndarray
    week_mask: np.ndarray
    static: np.ndarray
    grade: np.ndarray
    at_risk: np.ndarray
    student_ids: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))

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
    """Turns raw cohort values into model inputs: clamp, centre and scale, impute missing as 0.

    Two ways to get one:

    - `Normalizer.from_contract` (``contract``): clamp bounds, centres and scales are constants of
      the data contract, so no statistic of any student's data enters preprocessing and one
      student's records cannot move another's inputs. The default of every federation node.
    - `fit` (``train-zscore``): z-scores with the statistics of a training split (the CNN-LSTM
      paper's per-semester z-score); no clamping. Outside the DP guarantee: the statistics depend
      on every training record. Kept for centralized baselines and for comparison.

    Either is then applied to training, validation, test and scoring data alike.
    """

    grade_min: float
    grade_max: float
    dyn_mean: np.ndarray | None = None  # the centre (a mean for train-zscore)
    dyn_std: np.ndarray | None = None  # the scale (a standard deviation for train-zscore)
    static_mean: np.ndarray | None = None
    static_std: np.ndarray | None = None
    # Clamp bounds applied before centring (-inf / inf: unbounded); None: no clamping.
    dyn_low: np.ndarray | None = None
    dyn_high: np.ndarray | None = None
    static_low: np.ndarray | None = None
    static_high: np.ndarray | None = None
    method: str = "train-zscore"
    # Dynamic columns mapped by log(1 + value) after clamping (the contract's `transform`);
    # None: none. Contract normalisation only.
    dyn_log1p: np.ndarray | None = None

    @classmethod
    def from_contract(cls, spec: FeatureSpec) -> Normalizer:
        """A normaliser from the contract's constants alone; no data is looked at.

        Each numeric feature is clamped to its training range (``clip_min``/``clip_max``, else
        ``min``/``max``), then mapped by ``(value - center) / scale``: by default the range onto
        [-1, 1]. A dynamic feature with ``transform = "log1p"`` is mapped by ``log(1 + value)``
        after clamping; its centre and scale (and their defaults) are in those log units. One-hot
        columns stay 0/1.

        Raises:
            DataContractError: a numeric feature has no lower or no upper bound in the contract.
        """
        dyn = [(f.name, f.training_range, f.center, f.scale) for f in spec.dynamic]
        static: list[tuple[str, tuple[float | None, float | None], float | None, float | None]]
        static = []
        for attr in spec.static:
            if attr.kind == "numeric":
                static.append((attr.name, attr.training_range, attr.center, attr.scale))
            else:  # one-hot: already in [0, 1]; a missing category stays all zeros
                static += [(n, (0.0, 1.0), 0.0, 1.0) for n in attr.encoded_names]
        unbounded = [name for name, (lo, hi), _, _ in dyn + static if lo is None or hi is None]
        if unbounded:
            raise DataContractError(
                f"contract '{spec.name}' {spec.version}: {', '.join(unbounded)} "
                f"{'has' if len(unbounded) == 1 else 'have'} no training range, which "
                "normalisation inside the privacy guarantee needs; add `min`/`max` (values "
                "outside are export errors) or `clip_min`/`clip_max` (values outside are clamped) "
                "to each such [[dynamic]] or [[static]] entry of the spec"
            )

        def arrays(rows: list[Any], log1p: np.ndarray) -> tuple[np.ndarray, ...]:
            lo = np.array([r[1][0] for r in rows], dtype=np.float64).reshape(len(rows))
            hi = np.array([r[1][1] for r in rows], dtype=np.float64).reshape(len(rows))
            # The default centre and scale come from the range as the model sees it.
            seen_lo = np.where(log1p, np.log1p(np.where(log1p, lo, 0.0)), lo)
            seen_hi = np.where(log1p, np.log1p(np.where(log1p, hi, 0.0)), hi)
            center = np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=np.float64)
            scale = np.array([np.nan if r[3] is None else r[3] for r in rows], dtype=np.float64)
            center = np.where(np.isnan(center), (seen_lo + seen_hi) / 2, center)
            scale = np.where(np.isnan(scale), (seen_hi - seen_lo) / 2, scale)
            return center.reshape(len(rows)), scale.reshape(len(rows)), lo, hi

        d_log1p = np.array([f.transform == "log1p" for f in spec.dynamic], dtype=bool)
        d_center, d_scale, d_lo, d_hi = arrays(dyn, d_log1p)
        s_center, s_scale, s_lo, s_hi = arrays(static, np.zeros(len(static), dtype=bool))
        return cls(
            spec.target.grade_min,
            spec.target.grade_max,
            d_center,
            d_scale,
            s_center,
            s_scale,
            d_lo,
            d_hi,
            s_lo,
            s_hi,
            method="contract",
            dyn_log1p=d_log1p if d_log1p.any() else None,
        )

    def fit(self, cohort: CohortArrays) -> Normalizer:
        """Z-score statistics of ``cohort`` (a training split); see the class docstring."""
        observed = cohort.dynamic[cohort.week_mask > 0]  # (cells, n_dynamic)
        self.dyn_mean = _nan_stat(np.nanmean, observed, 0.0)
        self.dyn_std = _nan_stat(np.nanstd, observed, 1.0)
        self.static_mean = _nan_stat(np.nanmean, cohort.static, 0.0)
        self.static_std = _nan_stat(np.nanstd, cohort.static, 1.0)
        self.method = "train-zscore"
        self.dyn_log1p = None  # the contract's transform is contract normalisation's alone
        return self

    def transform(self, cohort: CohortArrays) -> ModelInputs:
        if self.dyn_mean is None or self.dyn_std is None:
            raise RuntimeError("Normalizer.transform called before fit")
        assert self.static_mean is not None and self.static_std is not None
        dyn = _clamped(cohort.dynamic, self.dyn_low, self.dyn_high)
        if self.dyn_log1p is not None:
            if dyn is cohort.dynamic:  # not clamped, so not yet a copy: the cohort stays raw
                dyn = dyn.copy()
            dyn[..., self.dyn_log1p] = np.log1p(dyn[..., self.dyn_log1p])  # NaN stays NaN
        dyn = (dyn - self.dyn_mean) / self.dyn_std
        dyn = np.where(np.isnan(dyn), 0.0, dyn)
        dyn = dyn * cohort.week_mask[..., None]
        static = _clamped(cohort.static, self.static_low, self.static_high)
        static = (static - self.static_mean) / self.static_std
        static = np.where(np.isnan(static), 0.0, static)
        span = self.grade_max - self.grade_min
        grade = (cohort.grade - self.grade_min) / span
        return ModelInputs(
            dynamic=dyn.astype(np.float32),
            week_mask=cohort.week_mask.astype(np.float32),
            static=static.astype(np.float32),
            grade=grade.astype(np.float32),
            at_risk=cohort.at_risk.astype(np.float32),
            student_ids=cohort.student_ids,
        )

    def dynamic_reference(self) -> np.ndarray:
        """Each weekly feature's centre on the export's own scale (the training mean for
        ``train-zscore``; the contract's ``center`` mapped back through its ``transform``)."""
        if self.dyn_mean is None:
            raise RuntimeError("Normalizer.dynamic_reference called before fit")
        if self.dyn_log1p is None:
            return self.dyn_mean
        return np.where(self.dyn_log1p, np.expm1(self.dyn_mean), self.dyn_mean)

    def grade_to_scale(self, scaled: np.ndarray) -> np.ndarray:
        """Map a model's [0, 1] grade output back to the contract's grade scale."""
        return self.grade_min + np.asarray(scaled) * (self.grade_max - self.grade_min)

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state (saved next to model weights; no pickle)."""
        if self.dyn_mean is None:
            raise RuntimeError("Normalizer.state called before fit")
        assert self.dyn_std is not None and self.static_mean is not None
        assert self.static_std is not None
        out: dict[str, Any] = {
            "grade_min": self.grade_min,
            "grade_max": self.grade_max,
            "dyn_mean": self.dyn_mean.tolist(),
            "dyn_std": self.dyn_std.tolist(),
            "static_mean": self.static_mean.tolist(),
            "static_std": self.static_std.tolist(),
            "method": self.method,
        }
        for key in ("dyn_low", "dyn_high", "static_low", "static_high"):
            bounds = getattr(self, key)
            if bounds is not None:  # JSON has no infinity: an unbounded side is null
                out[key] = [float(b) if np.isfinite(b) else None for b in bounds]
        if self.dyn_log1p is not None:
            out["dyn_log1p"] = [bool(b) for b in self.dyn_log1p]
        return out

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Normalizer:
        def arr(key: str) -> np.ndarray:
            return np.asarray(state[key], dtype=np.float64)

        def bounds(key: str, missing: float) -> np.ndarray | None:
            if state.get(key) is None:  # cards written before clamping existed
                return None
            return np.array([missing if b is None else b for b in state[key]], dtype=np.float64)

        return cls(
            grade_min=float(state["grade_min"]),
            grade_max=float(state["grade_max"]),
            dyn_mean=arr("dyn_mean"),
            dyn_std=arr("dyn_std"),
            static_mean=arr("static_mean"),
            static_std=arr("static_std"),
            dyn_low=bounds("dyn_low", -np.inf),
            dyn_high=bounds("dyn_high", np.inf),
            static_low=bounds("static_low", -np.inf),
            static_high=bounds("static_high", np.inf),
            method=str(state.get("method", "train-zscore")),
            # Cards written before the contract's `transform`: no column is transformed.
            dyn_log1p=(
                None if state.get("dyn_log1p") is None else np.asarray(state["dyn_log1p"], bool)
            ),
        )


def _clamped(values: np.ndarray, low: np.ndarray | None, high: np.ndarray | None) -> np.ndarray:
    if low is None and high is None:
        return values
    return np.clip(values, low, high)  # NaN (missing) stays NaN


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
