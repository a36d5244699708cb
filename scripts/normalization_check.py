"""What each normalisation costs a federated model on UCI Portuguese (docs/results.md).

Nodes used to z-score their features with their own training split's statistics ("per-school
z-scores"); now they scale by the data contract's constants (``contract``: the UCI spec's 0-20
grade range onto [-1, 1], the same map at every school). Centralized training z-scores the pooled
split ("pooled z-scores", the reference). On UCI the two schools' grades differ in level (GP's
G1/G2 mean about 12, MS's about 10.4) and pass/fail is an absolute threshold (G3 >= 10), so
per-school z-scores hide part of the signal. This fits one logistic regression on G1 and G2 over
both schools' training records (what a federation of the two schools fits), on the same
per-school 70/30 splits, each way, and prints accuracy and ROC-AUC (mean and standard deviation
over seeds). Skips with a message when the dataset is absent.

    python scripts/normalization_check.py [--data ../shared/datasets/uci_student_performance]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split

from shared_models.data.cohort import Normalizer
from shared_models.data.contract import load_spec

FEATURES = ["G1", "G2"]
UCI_SPEC = Path(__file__).resolve().parents[1] / "simulations/datasets/uci/spec.toml"


def _contract_scaled(frame: pd.DataFrame) -> pd.DataFrame:
    """G1, G2 as the contract's ``period_grade`` (week 1, week 2): clamped, centred, scaled."""
    norm = Normalizer.from_contract(load_spec(UCI_SPEC))
    assert norm.dyn_low is not None and norm.dyn_high is not None
    assert norm.dyn_mean is not None and norm.dyn_std is not None
    values = frame[FEATURES].astype(float).clip(norm.dyn_low[0], norm.dyn_high[0])
    return (values - norm.dyn_mean[0]) / norm.dyn_std[0]


def _zscored(frame: pd.DataFrame, reference: pd.DataFrame, per_school: bool) -> pd.DataFrame:
    if not per_school:
        return (frame[FEATURES] - reference[FEATURES].mean()) / reference[FEATURES].std()
    out = frame[FEATURES].astype(float).copy()
    for school in frame["school"].unique():
        ref = reference.loc[reference["school"] == school, FEATURES]
        rows = frame["school"] == school
        out.loc[rows] = (frame.loc[rows, FEATURES] - ref.mean()) / ref.std()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=Path("../shared/datasets/uci_student_performance")
    )
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    source = args.data / "student-por.csv"
    if not source.is_file():
        print(f"skipped: {source} not found (see ../shared/datasets/README.md)", file=sys.stderr)
        return
    data = pd.read_csv(source, sep=";")
    data["at_risk"] = (data["G3"] < 10).astype(int)
    ways = {
        "pooled z-scores (centralized reference)": lambda f, ref: _zscored(f, ref, False),
        "per-school z-scores (nodes' train splits)": lambda f, ref: _zscored(f, ref, True),
        "contract constants (the default)": lambda f, ref: _contract_scaled(f),
    }
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for seed in range(args.seeds):
        parts = [
            train_test_split(g, test_size=0.3, random_state=seed, stratify=g["at_risk"])
            for _, g in data.groupby("school")
        ]
        train = pd.concat([p[0] for p in parts])
        test = pd.concat([p[1] for p in parts])
        for name, scaled in ways.items():
            model = LogisticRegression().fit(scaled(train, train), train["at_risk"])
            prob = model.predict_proba(scaled(test, train))[:, 1]
            scores[name].append(
                (accuracy_score(test["at_risk"], prob > 0.5), roc_auc_score(test["at_risk"], prob))
            )
    print(
        f"UCI Portuguese, logistic regression on G1 and G2, {args.seeds} seeds of 70/30 per school"
    )
    print("| normalisation | accuracy | ROC-AUC |\n|---|---|---|")
    for name, values in scores.items():
        (acc, auc), (acc_sd, auc_sd) = np.mean(values, axis=0), np.std(values, axis=0)
        print(f"| {name} | {acc:.3f} ± {acc_sd:.3f} | {auc:.3f} ± {auc_sd:.3f} |")


if __name__ == "__main__":
    main()
