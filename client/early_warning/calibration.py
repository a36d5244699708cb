"""Local calibration: the federated model's P(at risk) mapped onto this institution's own rates.

A DP-trained global model ranks students usefully but its probabilities are squeezed towards the
middle (clipped, noised gradients), so the paper's 0.40 / 0.70 tiers would mean little. Each
institution fits a monotone map from raw to calibrated probability on its own validation split,
on its own machine: nothing leaves it, so there is no privacy cost. The map is stored as a small
JSON beside the model (never a pickle) and applied by scoring and the report.

Methods (scikit-learn): ``isotonic`` (`IsotonicRegression`, a monotone step fit), ``sigmoid``
(Platt scaling: a logistic regression on the logit of the raw probability) and ``identity``.

``auto`` fits isotonic regression once the validation split holds `ISOTONIC_MIN_STUDENTS`
labelled students, `ISOTONIC_MIN_PER_OUTCOME` of each outcome; on a smaller split it picks the
method with the lowest cross-validated Brier score (isotonic has one free step per distinct
score and overfits a few dozen students, which only out-of-fold predictions reveal; Brier rather
than log-loss because isotonic maps reach exactly 0 or 1, where log-loss is infinite on one
wrong student). The size rule is Niculescu-Mizil & Caruana's (ICML 2005: Platt scaling wins on
small calibration sets, isotonic regression once there is enough data not to overfit), and it
is what we measured (docs/results.md, "Choosing the calibration"; `python
scripts/calibration_study.py`): DP-SGD squeezes probabilities in a shape a sigmoid does not
follow, so on 16 demo institutions (4 seeds) Platt scaling left a test-split ECE above 0.05 in
46 % of re-drawn splits and isotonic in none, while the cross-validated Brier score, whose
differences between the two were within its noise, picked Platt for 2 of the 16.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from shared_models.atomic import write_text_atomic
from shared_models.errors import DataContractError
from shared_models.user_files import describe_read_error, loads_json, read_text

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
FORMAT = 1
METHODS = ("isotonic", "sigmoid", "identity")
Method = Literal["isotonic", "sigmoid", "identity"]
_EPS = 1e-6  # raw probabilities are clipped away from 0 and 1 before the logit
_FOLDS = 5
#: From this many labelled validation students (and this many of each outcome) on, ``auto`` is
#: isotonic regression: measured on the demo's DP models, isotonic's mean ECE on new students
#: was lower than Platt scaling's and than the cross-validated choice's from 200 calibration
#: students on (0.041 vs 0.050 and 0.045 at 200; 0.031 vs 0.047 and 0.035 at 600) and level
#: at 100 (0.052 vs 0.054 and 0.054).
ISOTONIC_MIN_STUDENTS = 200
ISOTONIC_MIN_PER_OUTCOME = 20


@dataclass(frozen=True)
class Calibrator:
    """A fitted monotone map from raw to calibrated P(at risk).

    Attributes:
        x, y: isotonic knots (raw, calibrated), increasing; linear in between, clipped outside.
        slope, intercept: sigmoid map ``1 / (1 + exp(-(slope * logit(p) + intercept)))``.
    """

    method: Method
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    slope: float = 1.0
    intercept: float = 0.0

    def apply(self, probability: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, same shape and dtype as ``probability``."""
        p = np.asarray(probability)
        dtype = p.dtype if np.issubdtype(p.dtype, np.floating) else np.float64
        raw = p.astype(np.float64)
        if self.method == "isotonic":
            out = np.interp(raw, self.x, self.y)  # sklearn's out_of_bounds="clip"
        elif self.method == "sigmoid":
            z = self.slope * _logit(raw) + self.intercept
            out = 1.0 / (1.0 + np.exp(-z))
        else:
            out = raw
        return np.clip(out, 0.0, 1.0).astype(dtype)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, **_params(self)}

    @classmethod
    def from_json(cls, data: Any, where: Path | str = "calibration") -> Calibrator:
        """Rebuild from `to_json`'s output, refusing anything that is not a monotone map.

        Raises:
            DataContractError: malformed, non-finite or non-monotone parameters.
        """
        problem = None
        method = data.get("method") if isinstance(data, dict) else None
        try:
            if method == "isotonic":
                x = tuple(float(v) for v in data["x"])
                y = tuple(float(v) for v in data["y"])
                finite = all(math.isfinite(v) for v in (*x, *y))
                if not x or len(x) != len(y) or not finite:
                    problem = "x and y must be equally long lists of finite numbers"
                elif any(b < a for seq in (x, y) for a, b in itertools.pairwise(seq)):
                    problem = "x and y must be non-decreasing (a monotone map)"
                elif min(y) < 0 or max(y) > 1:
                    problem = "y must lie in [0, 1]"
                else:
                    return cls("isotonic", x=x, y=y)
            elif method == "sigmoid":
                slope, intercept = float(data["slope"]), float(data["intercept"])
                if not (math.isfinite(slope) and math.isfinite(intercept)) or slope <= 0:
                    problem = "slope must be a positive finite number, intercept finite"
                else:
                    return cls("sigmoid", slope=slope, intercept=intercept)
            elif method == "identity":
                return cls("identity")
            else:
                problem = f"method must be one of {', '.join(METHODS)}, not {method!r}"[:200]
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"[:200]
        raise DataContractError(
            f"{where}: not a valid calibration ({problem}); adopt the model again "
            "(edufl client adopt)"
        )


@dataclass(frozen=True)
class Reliability:
    """Reliability-diagram data of one set of probabilities (equal-width bins on [0, 1]).

    Attributes:
        predicted, observed, count: per non-empty bin, the mean predicted probability, the
            observed at-risk rate and the number of students.
    """

    ece: float
    n: int
    n_bins: int
    predicted: tuple[float, ...]
    observed: tuple[float, ...]
    count: tuple[int, ...]


@dataclass(frozen=True)
class CalibrationReport:
    """What `calibration.json` holds: the map, how it was chosen, how it does on the test split.

    Attributes:
        selection: cross-validated Brier score of each candidate method on the validation split.
        raw, calibrated: reliability of the raw and calibrated probabilities on the test split.
        ece_noise_floor: the median ECE a perfectly calibrated model would still show on a test
            split of this size (sampling noise alone): an observed ECE near it is as good as the
            split can tell.
    """

    calibrator: Calibrator
    fitted_on: dict[str, Any]
    selection: dict[str, float]
    raw: Reliability | None
    calibrated: Reliability | None
    ece_noise_floor: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "calibrator": self.calibrator.to_json(),
            "fitted_on": self.fitted_on,
            "selection": self.selection,
            "test": None
            if self.raw is None or self.calibrated is None
            else {"raw": asdict(self.raw), "calibrated": asdict(self.calibrated)},
            "ece_noise_floor": self.ece_noise_floor,
            "extra": self.extra,
        }


def fit_calibrator(
    probability: np.ndarray, at_risk: np.ndarray, method: str = "auto", seed: int = 0
) -> tuple[Calibrator, dict[str, float]]:
    """Fit a calibrator on labelled raw probabilities (the validation split).

    Args:
        method: ``auto``, or one of `METHODS`.
        seed: shuffles the folds of ``auto``'s cross-validation.

    Returns:
        The calibrator, and for ``auto`` the cross-validated Brier score of each candidate.

    Raises:
        DataContractError: an unknown method, or no labelled records of both outcomes.
    """
    p, y = _labelled(probability, at_risk)
    if method not in (*METHODS, "auto"):
        raise DataContractError(
            f"calibration method {method!r}: use auto, {', '.join(METHODS)}"[:200]
        )
    if method == "identity":
        return Calibrator("identity"), {}
    if len(np.unique(y)) < 2:
        raise DataContractError(
            f"calibration needs at-risk and not-at-risk students in the validation split; it "
            f"has {len(y)} labelled record(s), {int(y.sum())} at risk: adopt with an export "
            "whose outcomes are known (a past term), or --calibration identity"
        )
    if method != "auto":
        return _fit(method, p, y), {}
    scores = _cross_validated_brier(p, y, seed)
    if not scores:  # too few of one outcome to hold any out: Platt's two parameters at most
        return _fit("sigmoid", p, y), {}
    if len(y) >= ISOTONIC_MIN_STUDENTS and np.bincount(y.astype(int)).min() >= (
        ISOTONIC_MIN_PER_OUTCOME
    ):
        best, why = "isotonic", f"{len(y)} validation students: enough for isotonic"
    else:
        best = min(scores, key=lambda m: (scores[m], METHODS.index(m)))
        why = f"{len(y)} validation students: lowest cross-validated Brier"
    logger.info(
        "calibration: %s (%s; cross-validated Brier %s)",
        best,
        why,
        ", ".join(f"{m} {s:.4f}" for m, s in scores.items()),
    )
    return _fit(best, p, y), scores


def expected_calibration_error(
    probability: np.ndarray, at_risk: np.ndarray, n_bins: int = 10
) -> Reliability:
    """ECE over ``n_bins`` equal-width bins: the count-weighted mean |predicted - observed|.

    Equal-width bins as in Guo et al. (2017), the usual definition; records without an
    outcome are left out.
    """
    p, y = _labelled(probability, at_risk)
    index = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    predicted = np.bincount(index, weights=p, minlength=n_bins)
    observed = np.bincount(index, weights=y, minlength=n_bins)
    used = count > 0
    mean_p, mean_y = predicted[used] / count[used], observed[used] / count[used]
    ece = float((count[used] * np.abs(mean_p - mean_y)).sum() / max(len(p), 1))
    return Reliability(
        ece=ece,
        n=len(p),
        n_bins=n_bins,
        predicted=tuple(float(v) for v in mean_p),
        observed=tuple(float(v) for v in mean_y),
        count=tuple(int(v) for v in count[used]),
    )


def ece_noise_floor(
    probability: np.ndarray, n_bins: int = 10, draws: int = 400, seed: int = 0
) -> float:
    """Median ECE of outcomes drawn from ``probability`` itself: a perfectly calibrated model."""
    p = np.asarray(probability, dtype=np.float64)
    rng = np.random.default_rng(seed)
    eces = [
        expected_calibration_error(p, (rng.random(len(p)) < p).astype(float), n_bins).ece
        for _ in range(draws)
    ]
    return float(np.median(eces)) if eces else float("nan")


def save_calibration(model_dir: Path, report: CalibrationReport) -> Path:
    """Write ``calibration.json`` into ``model_dir`` (atomically); returns its path."""
    path = Path(model_dir) / CALIBRATION_FILE
    write_text_atomic(path, json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
    return path


def load_calibration(model_dir: Path) -> tuple[Calibrator, dict[str, Any]] | None:
    """The calibrator beside a model and the whole ``calibration.json``; None if there is none.

    Raises:
        DataContractError: the file exists but is unreadable or malformed.
    """
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        raw = loads_json(read_text(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataContractError(f"{path}: cannot read ({describe_read_error(exc)})") from None
    except ValueError as exc:
        raise DataContractError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataContractError(f"{path}: not a calibration file of format {FORMAT}")
    return Calibrator.from_json(raw.get("calibrator"), path), raw


def _fit(method: str, p: np.ndarray, y: np.ndarray) -> Calibrator:
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        iso.fit(p, y)
        return Calibrator(
            "isotonic",
            x=tuple(float(v) for v in iso.X_thresholds_),
            y=tuple(float(v) for v in iso.y_thresholds_),
        )
    if method == "sigmoid":
        # Platt scaling on the logit: the identity map is slope 1, intercept 0, so a model that
        # is already calibrated is left alone. Unregularised: one feature, no overfitting risk.
        lr = LogisticRegression(C=np.inf).fit(_logit(p)[:, None], y)
        slope = float(lr.coef_[0, 0])
        if slope <= 0:  # the model ranks no better than chance here: a decreasing map is absurd
            logger.warning("sigmoid calibration found no increasing map; keeping raw scores")
            return Calibrator("identity")
        return Calibrator("sigmoid", slope=slope, intercept=float(lr.intercept_[0]))
    return Calibrator("identity")


def _cross_validated_brier(p: np.ndarray, y: np.ndarray, seed: int) -> dict[str, float]:
    from sklearn.metrics import brier_score_loss
    from sklearn.model_selection import StratifiedKFold

    folds = min(_FOLDS, int(np.bincount(y.astype(int)).min()))
    if folds < 2:
        return {}
    out = {m: np.empty_like(p) for m in METHODS}
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for train, held in splitter.split(p, y):
        for method in METHODS:
            fitted = (
                _fit(method, p[train], y[train])
                if len(np.unique(y[train])) == 2
                else Calibrator("identity")
            )
            out[method][held] = fitted.apply(p[held])
    return {m: float(brier_score_loss(y, out[m])) for m in METHODS}


def _labelled(probability: np.ndarray, at_risk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probability, dtype=np.float64).ravel()
    y = np.asarray(at_risk, dtype=np.float64).ravel()
    known = ~np.isnan(y) & ~np.isnan(p)
    return p[known], y[known]


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, _EPS, 1 - _EPS)
    return np.log(q / (1 - q))


def _params(c: Calibrator) -> dict[str, Any]:
    if c.method == "isotonic":
        return {"x": list(c.x), "y": list(c.y)}
    if c.method == "sigmoid":
        return {"slope": c.slope, "intercept": c.intercept}
    return {}
