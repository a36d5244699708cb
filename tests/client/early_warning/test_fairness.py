from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from client.early_warning import fairness
from client.early_warning.fairness import (
    MIN_GROUP,
    UNKNOWN,
    abroca,
    fairness_by_group,
    fairness_markdown,
    protected_attributes,
    protected_groups,
)
from shared_models.data.cohort import CohortArrays
from shared_models.data.contract import default_spec, load_spec, parse_spec

SPEC = default_spec()
OULAD_SPEC = Path(__file__).resolve().parents[3] / "simulations/datasets/oulad/spec.toml"


def _cohort(static: np.ndarray, names: tuple[str, ...]) -> CohortArrays:
    n = len(static)
    return CohortArrays(
        student_ids=np.array([f"s{i}" for i in range(n)], dtype=object),
        terms=np.array(["t"] * n, dtype=object),
        dynamic=np.zeros((n, 2, 1), dtype=np.float32),
        week_mask=np.ones((n, 2), dtype=np.float32),
        static=static.astype(np.float32),
        grade=np.zeros(n, dtype=np.float32),
        at_risk=np.zeros(n, dtype=np.float32),
        dynamic_names=("x",),
        static_names=names,
    )


def _biased(n: int, seed: int, gap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, scores and a two-group label; the scores separate worse in group "b" by ``gap``."""
    rng = np.random.default_rng(seed)
    group = np.where(rng.random(n) < 0.5, "a", "b").astype(object)
    y = (rng.random(n) < 0.4).astype(float)
    signal = np.where(group == "a", 2.0, 2.0 - gap)
    p = 1 / (1 + np.exp(-(signal * (y - 0.5) + rng.normal(0, 1, n))))
    return y, p, group


def test_shipped_contracts_mark_their_protected_attributes() -> None:
    assert protected_attributes(load_spec(OULAD_SPEC)) == (
        "gender", "imd_band", "age_band", "disability"
    )  # fmt: skip
    assert set(protected_attributes(SPEC)) == {"gender", "age_band", "first_generation"}
    assert "program" not in protected_attributes(SPEC)


def test_protected_flag_survives_the_spec_round_trip_and_changes_the_fingerprint() -> None:
    again = parse_spec(SPEC.to_toml())
    assert protected_attributes(again) == protected_attributes(SPEC)
    unmarked = SPEC.model_copy(
        update={"static": tuple(a.model_copy(update={"protected": False}) for a in SPEC.static)}
    )
    assert unmarked.fingerprint != SPEC.fingerprint


def test_protected_groups_read_categories_values_and_missing_as_unknown() -> None:
    spec = parse_spec(
        SPEC.to_toml() + '\n[[static]]\nname = "age"\nkind = "numeric"\nprotected = true\n'
    )
    names = spec.static_names
    static = np.full((3, len(names)), 0.0)
    static[0, names.index("gender=female")] = 1
    static[1, names.index("gender=male")] = 1
    static[2, [j for j, n in enumerate(names) if n.startswith("gender=")]] = np.nan
    static[:, names.index("age")] = [19, 42, np.nan]
    groups = protected_groups(_cohort(static, names), spec)
    assert list(groups["gender"]) == ["female", "male", UNKNOWN]
    assert list(groups["age"]) == ["19", "42", UNKNOWN]
    assert "program" not in groups


def test_group_metrics_match_their_definitions() -> None:
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=float)
    p = np.array([0.9, 0.5, 0.45, 0.1, 0.3, 0.75, 0.2, 0.1])
    group = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
    (result,) = fairness_by_group(y, p, {"g": group}, n_permutations=0)
    a, b = result.groups
    assert (a.group, a.n, a.positives, a.base_rate) == ("a", 4, 2, 0.5)
    assert a.roc_auc == pytest.approx(roc_auc_score(y[:4], p[:4]))
    # a: flagged at 0.40 = {0.9, 0.5, 0.45}: both positives, one of two negatives.
    assert (a.recall["moderate+"], a.fpr["moderate+"]) == (1.0, 0.5)
    assert (a.recall["high"], a.fpr["high"]) == (0.5, 0.0)
    # b: its one positive (0.3) is missed; the negative at 0.75 is flagged "high".
    assert (b.recall["moderate+"], b.fpr["high"]) == (0.0, pytest.approx(1 / 3))
    assert b.mean_predicted == pytest.approx(p[4:].mean())
    assert a.ece == pytest.approx(np.mean([0.1, 0.5, 0.45, 0.1]))  # one record per bin
    assert a.note.startswith("too small to judge") and f"n < {MIN_GROUP}" in a.note


def test_abroca_is_zero_for_identical_curves_and_one_for_opposite_ones() -> None:
    y = np.array([1, 0, 1, 0, 1, 0] * 10, dtype=bool)
    p = np.tile([0.9, 0.1, 0.8, 0.2, 0.7, 0.3], 10)
    twin = np.arange(60) % 12 < 6  # both halves hold the same (label, score) pairs
    assert abroca(y, p, twin) == pytest.approx(0.0, abs=1e-12)
    inverted = np.where(np.arange(60) < 30, p, 1 - p)  # the rest is ranked exactly backwards
    assert abroca(y, inverted, np.arange(60) < 30) == pytest.approx(1.0, abs=2e-3)


def test_abroca_needs_both_outcomes_in_both_groups() -> None:
    y = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    p = np.linspace(0, 1, 6)
    assert abroca(y, p, np.array([1, 1, 0, 0, 0, 0], dtype=bool)) is None


class _Identity:
    """A generator whose "permutation" keeps the order: the null statistic is the observed one."""

    def permutation(self, values: np.ndarray) -> np.ndarray:
        return np.array(values)


def test_vectorised_null_statistic_equals_the_roc_curve_abroca() -> None:
    y, p, group = _biased(400, seed=3, gap=1.2)
    p = np.round(p, 2)  # ties: several records share a score, as with calibrated steps
    member = group == "a"
    null = fairness._permuted_abrocas(y.astype(bool), p, member, 1, _Identity())  # type: ignore[arg-type]
    assert null[0] == pytest.approx(abroca(y, p, member), abs=1e-12)


def test_permutation_test_separates_a_real_gap_from_chance() -> None:
    y, p, group = _biased(1200, seed=0, gap=1.6)
    (real,) = fairness_by_group(y, p, {"g": group}, n_permutations=300, seed=1)
    y, p, group = _biased(1200, seed=0, gap=0.0)
    (none,) = fairness_by_group(y, p, {"g": group}, n_permutations=300, seed=1)
    assert real.groups[0].abroca_p is not None and real.groups[0].abroca_p < 0.01
    assert none.groups[0].abroca_p is not None and none.groups[0].abroca_p > 0.05
    assert real.groups[0].abroca > none.groups[0].abroca
    # Two groups: "a vs the rest" is "b vs the rest", one comparison.
    assert real.groups[0].abroca == real.groups[1].abroca


def test_permutation_p_value_is_reproducible_with_a_seed() -> None:
    y, p, group = _biased(300, seed=5, gap=0.5)
    runs = [fairness_by_group(y, p, {"g": group}, n_permutations=200, seed=9) for _ in range(2)]
    assert runs[0][0].groups[0].abroca_p == runs[1][0].groups[0].abroca_p


def test_small_or_one_outcome_groups_are_flagged_not_judged() -> None:
    y, p, group = _biased(300, seed=2, gap=0.0)
    group[:12] = "tiny"
    y[:12] = 0.0
    (result,) = fairness_by_group(y, p, {"g": group}, n_permutations=50)
    tiny = next(g for g in result.groups if g.group == "tiny")
    assert tiny.n == 12 and tiny.roc_auc is None and tiny.abroca is None
    assert "n < 30" in tiny.note and "no at-risk students" in tiny.note
    assert all(g.note == "" for g in result.groups if g.group != "tiny")


def test_records_without_an_outcome_are_left_out() -> None:
    y, p, group = _biased(200, seed=4, gap=0.0)
    y[:20] = np.nan
    (result,) = fairness_by_group(y, p, {"g": group}, n_permutations=0)
    assert sum(g.n for g in result.groups) == 180


def test_markdown_table_has_one_row_per_group() -> None:
    y, p, group = _biased(200, seed=6, gap=0.0)
    lines = fairness_markdown(fairness_by_group(y, p, {"gender": group}, n_permutations=20))
    rows = [line for line in lines if line.startswith("| a ") or line.startswith("| b ")]
    assert lines[0] == "**gender**" and len(rows) == 2
    assert re.search(r"\(p=\d\.\d{3}\)", rows[0])


def test_advisor_report_has_a_fairness_section_on_the_test_split(
    consortium_dir: Path, tmp_path: Path
) -> None:
    from client.early_warning.report import score_and_report
    from shared_models.data.loader import load_cohort
    from shared_models.data.node import split_node
    from simulations.scoring_figures import train_risk_model

    train = load_cohort(consortium_dir / "institution_01", SPEC)
    model = train_risk_model(train, SPEC, tmp_path / "model", max_epochs=2)
    export = consortium_dir / "institution_02"
    result = score_and_report(export, model, tmp_path / "report", observed_weeks=8)
    page = result.html.read_text("utf-8")
    assert 'id="fairness"' in page
    tables = re.findall(r'<table class="fairness" data-attribute="([a-z_]+)">(.*?)</table>', page,
                        flags=re.S)  # fmt: skip
    assert [name for name, _ in tables] == ["gender", "age_band", "first_generation"]
    test = split_node(export, SPEC, seed=0).test
    for _, body in tables:
        ns = [int(n) for n in re.findall(r"<tr><td>[^<]*</td><td>(\d+)</td>", body)]
        assert sum(ns) == int((~np.isnan(test.at_risk)).sum())
    assert "ABROCA" in page and "test split" in page


def test_report_says_why_there_is_no_fairness_table_without_outcomes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class _Warning:
        spec = SPEC.model_copy(
            update={"static": tuple(a.model_copy(update={"protected": False}) for a in SPEC.static)}
        )

    results, why = fairness.held_out_fairness(_Warning())  # type: ignore[arg-type]
    assert results == [] and "marks no attribute protected" in why
    html: Any = fairness.fairness_html(results, why)
    assert 'id="fairness"' in html and "protected" in html


def test_reasons_refuse_to_name_a_protected_attribute() -> None:
    from client.early_warning.reasons import Attribution, explain

    attribution = Attribution(
        blocks=(("attendance_rate", "last4"), ("gender", "last4")),
        contribution=np.array([[0.2, 0.3]], dtype=np.float32),
        probability=np.array([0.8]),
    )
    with pytest.raises(ValueError, match=r"protected attribute.*gender"):
        explain(attribution, {"observed_weeks": np.array([6.0])}, SPEC, np.zeros(7))
