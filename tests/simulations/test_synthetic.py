from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from shared_models.data.cohort import CohortArrays, Normalizer
from shared_models.data.loader import load_cohort
from simulations.synthetic import write_consortium


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    write_consortium(tmp_path / "a", institutions=2, students=100, seed=3)
    write_consortium(tmp_path / "b", institutions=2, students=100, seed=3)
    write_consortium(tmp_path / "c", institutions=2, students=100, seed=4)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert _digests(tmp_path / "a") != _digests(tmp_path / "c")


def test_sizes_add_up_and_weeks_are_configurable(tmp_path: Path) -> None:
    folders = write_consortium(tmp_path, institutions=3, students=250, weeks=10, seed=1)
    manifest = tomllib.loads((tmp_path / "consortium.toml").read_text())
    assert sum(i["n_students"] for i in manifest["institutions"]) == 250
    assert manifest["weeks"] == 10
    assert len(folders) == 3


@pytest.fixture(scope="module")
def default_consortium(tmp_path_factory: pytest.TempPathFactory) -> list[CohortArrays]:
    """The README's embedded default: 4 institutions, 1200 students, 15 weeks, seed 0."""
    out = tmp_path_factory.mktemp("default")
    return [load_cohort(f) for f in write_consortium(out, seed=0)]


def test_institutions_are_not_iid(default_consortium: list[CohortArrays]) -> None:
    sizes = [len(c) for c in default_consortium]
    risk = [float(np.mean(c.at_risk)) for c in default_consortium]
    attendance = [float(np.nanmean(c.dynamic[..., 0])) for c in default_consortium]
    programs = np.array([c.static[:, 8:13].mean(axis=0) for c in default_consortium])
    assert max(sizes) > 1.5 * min(sizes)
    assert max(risk) - min(risk) > 0.1
    assert max(attendance) - min(attendance) > 0.03
    assert np.abs(programs - programs.mean(axis=0)).max() > 0.1


def test_about_five_percent_missing(default_consortium: list[CohortArrays]) -> None:
    for cohort in default_consortium:
        observed = cohort.dynamic[cohort.week_mask > 0]
        assert 0.02 < np.isnan(observed).mean() < 0.08


def test_at_risk_students_disengage_over_the_term(default_consortium: list[CohortArrays]) -> None:
    pooled = CohortArrays.concatenate(default_consortium)
    logins = pooled.dynamic[..., 1]
    drop = np.nanmean(logins[:, :4], axis=1) - np.nanmean(logins[:, -4:], axis=1)
    risk = pooled.at_risk == 1
    assert np.nanmean(drop[risk]) > np.nanmean(drop[~risk]) + 0.5


def test_label_is_learnable_but_not_trivial(default_consortium: list[CohortArrays]) -> None:
    pooled = CohortArrays.concatenate(default_consortium)
    idx = np.arange(len(pooled))
    train, test = train_test_split(idx, test_size=0.3, random_state=0, stratify=pooled.at_risk)
    norm = Normalizer(0.0, 4.0).fit(pooled.subset(train))
    a, b = norm.transform(pooled.subset(train)), norm.transform(pooled.subset(test))

    def auc(features: str) -> float:
        xa, xb = (a.flat(), b.flat()) if features == "all" else (a.static, b.static)
        model = LogisticRegression(max_iter=2000, C=0.1).fit(xa, a.at_risk)
        return float(roc_auc_score(b.at_risk, model.predict_proba(xb)[:, 1]))

    with_sequence, static_only = auc("all"), auc("static")
    assert 0.85 <= with_sequence <= 0.96
    assert with_sequence > static_only + 0.1
