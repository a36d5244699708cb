"""How each calibration method does on the demo's DP models (docs/results.md, "Choosing the
calibration").

For every institution of every demo folder given, the adopted model's raw P(at risk) is computed
on the institution's validation and test students (held out of training, the node's own
splits). Then, for each method, a calibrator is fitted on the validation split and its expected
calibration error (10 equal-width bins, as the demo reports it) measured on the test split; and,
to see beyond one split, the validation and test students are pooled and re-drawn ``--redraws``
times into a calibration part of the validation split's size and an evaluation part, and at
smaller calibration sizes (``--sizes``) too. Methods: isotonic, sigmoid (Platt scaling), ``auto``
(what `edufl client adopt` does) and ``cv-brier`` (the cross-validated Brier choice ``auto``
made for every size before; kept to compare).

    for s in 0 1 2 3; do edufl demo --seed $s --out runs/demo$s; done
    python scripts/calibration_study.py runs/demo0 runs/demo1 runs/demo2 runs/demo3
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from client.early_warning import calibration as cal
from client.early_warning.scoring import load_scoring_model
from shared_models.data.contract import default_spec
from shared_models.data.node import split_node
from shared_models.evaluation import predict

Fit = Callable[[np.ndarray, np.ndarray], cal.Calibrator]


def _cv_brier(p: np.ndarray, y: np.ndarray) -> cal.Calibrator:
    scores = cal._cross_validated_brier(p, y, 0)
    if not scores:
        return cal._fit("sigmoid", p, y)
    return cal._fit(min(scores, key=lambda m: (scores[m], cal.METHODS.index(m))), p, y)


METHODS: dict[str, Fit] = {
    "isotonic": lambda p, y: cal._fit("isotonic", p, y),
    "sigmoid": lambda p, y: cal._fit("sigmoid", p, y),
    "auto": lambda p, y: cal.fit_calibrator(p, y, "auto")[0],
    "cv-brier": _cv_brier,
}


def held_out_scores(demo: Path) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(name, raw val, y val, raw test, y test) of every institution of one demo folder."""
    spec = default_spec()
    found = []
    for home in sorted((demo / "institutions").iterdir()):
        model_dir = home / "models" / (home / "models" / "LATEST").read_text().strip()
        adoption = json.loads((model_dir / "adoption.json").read_text())
        seed = json.loads((model_dir / "calibration.json").read_text())["fitted_on"]["seed"]
        scorer = load_scoring_model(model_dir, spec, calibrated=False)
        splits = split_node(Path(adoption["data_dir"]), spec, seed=seed)
        raw = [
            predict(scorer.model, scorer.normalizer.transform(part))["risk"]
            for part in (splits.val, splits.test)
        ]
        labels = [np.asarray(part.at_risk, dtype=float) for part in (splits.val, splits.test)]
        found.append((f"{demo.name}/{home.name}", raw[0], labels[0], raw[1], labels[1]))
    return found


def _ece(fit: Fit, p_fit: np.ndarray, y_fit: np.ndarray, p: np.ndarray, y: np.ndarray) -> float:
    return cal.expected_calibration_error(fit(p_fit, y_fit).apply(p), y).ece


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demos", nargs="+", type=Path, help="folders written by `edufl demo`")
    parser.add_argument("--redraws", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="*", default=[100, 200, 400, 600, 800])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    missing = [d for d in args.demos if not (d / "institutions").is_dir()]
    if missing:
        print(f"not a demo folder (no institutions/): {', '.join(map(str, missing))}")
        return 2
    rng = np.random.default_rng(args.seed)
    rows = [row for demo in args.demos for row in held_out_scores(demo)]

    print("| institution | n val / test | raw | " + " | ".join(METHODS) + " | noise floor |")
    print("|---|---|---|" + "---|" * len(METHODS) + "---|")
    redrawn: dict[str, list[float]] = {m: [] for m in METHODS}
    for name, pv, yv, pt, yt in rows:
        fixed = [_ece(fit, pv, yv, pt, yt) for fit in METHODS.values()]
        floor = cal.ece_noise_floor(np.clip(METHODS["isotonic"](pv, yv).apply(pt), 0, 1))
        raw = cal.expected_calibration_error(pt, yt).ece
        cells = " | ".join(f"{v:.3f}" for v in fixed)
        print(f"| {name} | {len(pv)} / {len(pt)} | {raw:.3f} | {cells} | {floor:.3f} |")
        pooled_p, pooled_y = np.r_[pv, pt], np.r_[yv, yt]
        for _ in range(args.redraws):
            order = rng.permutation(len(pooled_p))
            a, b = order[: len(pv)], order[len(pv) :]
            for method, fit in METHODS.items():
                redrawn[method].append(
                    _ece(fit, pooled_p[a], pooled_y[a], pooled_p[b], pooled_y[b])
                )
    print(f"\nre-drawn splits ({args.redraws} per institution, validation-sized calibration part):")
    for method, eces in redrawn.items():
        e = np.asarray(eces)
        print(
            f"  {method:9s} ECE mean {e.mean():.3f}, 90th percentile {np.percentile(e, 90):.3f}, "
            f"max {e.max():.3f}, share above 0.05 {np.mean(e > 0.05):.0%}"
        )
    print("\nby calibration size (5 re-draws per institution): ECE mean / 90th percentile")
    for size in args.sizes:
        by: dict[str, list[float]] = {m: [] for m in METHODS}
        for _, pv, yv, pt, yt in rows:
            pooled_p, pooled_y = np.r_[pv, pt], np.r_[yv, yt]
            for _ in range(5):
                order = rng.permutation(len(pooled_p))
                a, b = order[:size], order[size:]
                if len(np.unique(pooled_y[a])) < 2:
                    continue
                for method, fit in METHODS.items():
                    by[method].append(_ece(fit, pooled_p[a], pooled_y[a], pooled_p[b], pooled_y[b]))
        cells = ", ".join(
            f"{m} {np.mean(v):.3f} / {np.percentile(v, 90):.3f}" for m, v in by.items() if v
        )
        print(f"  n={size}: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
