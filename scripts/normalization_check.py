"""What per-institution z-scoring costs on UCI Portuguese (the federated gap, docs/results.md).

Every edufl node z-scores its features with its own training split's statistics; centralized
training z-scores the pooled split. On UCI the two schools' grades differ in level (GP's G1/G2
mean about 12, MS's about 10.4), and pass/fail is an absolute threshold (G3 >= 10), so
per-school z-scores hide part of the signal. This fits the same logistic regression on G1 and G2
both ways, on the same per-school 70/30 splits, and prints accuracy and ROC-AUC (mean of seeds).

    python scripts/normalization_check.py [--data ../shared/datasets/uci_student_performance]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, roc_auc_score
from sklearn.model_selection import train_test_split

FEATURES = ["G1", "G2"]


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
    data = pd.read_csv(args.data / "student-por.csv", sep=";")
    data["at_risk"] = (data["G3"] < 10).astype(int)
    scores: dict[str, list[tuple[float, float]]] = {
        "pooled z-scores": [],
        "per-school z-scores": [],
    }
    for seed in range(args.seeds):
        parts = [
            train_test_split(g, test_size=0.3, random_state=seed, stratify=g["at_risk"])
            for _, g in data.groupby("school")
        ]
        train = pd.concat([p[0] for p in parts])
        test = pd.concat([p[1] for p in parts])
        for name, per_school in (("pooled z-scores", False), ("per-school z-scores", True)):
            model = LogisticRegression().fit(_zscored(train, train, per_school), train["at_risk"])
            prob = model.predict_proba(_zscored(test, train, per_school))[:, 1]
            scores[name].append(
                (accuracy_score(test["at_risk"], prob > 0.5), roc_auc_score(test["at_risk"], prob))
            )
    print(
        f"UCI Portuguese, logistic regression on G1 and G2, {args.seeds} seeds of 70/30 per school"
    )
    print("| normalisation | accuracy | ROC-AUC |\n|---|---|---|")
    for name, values in scores.items():
        acc, auc = np.mean(values, axis=0)
        print(f"| {name} | {acc:.3f} | {auc:.3f} |")


if __name__ == "__main__":
    main()
