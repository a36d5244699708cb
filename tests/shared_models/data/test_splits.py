"""Splits by student: a keyed hash of the pseudonymous id decides each student's part."""

from __future__ import annotations

import numpy as np
import pytest

from shared_models.data.cohort import CohortArrays
from shared_models.data.splits import kfold_splits, split_cohort


def _cohort(ids: list[str], terms_per_student: int = 1, seed: int = 0) -> CohortArrays:
    rng = np.random.default_rng(seed)
    student_ids = np.repeat(np.array(ids, dtype=object), terms_per_student)
    n = len(student_ids)
    terms = np.tile(np.array([f"t{k}" for k in range(terms_per_student)], dtype=object), len(ids))
    return CohortArrays(
        student_ids=student_ids,
        terms=terms,
        dynamic=rng.random((n, 3, 2)).astype(np.float32),
        week_mask=np.ones((n, 3), dtype=np.float32),
        static=rng.random((n, 1)).astype(np.float32),
        grade=rng.random(n).astype(np.float32),
        at_risk=(rng.random(n) < 0.3).astype(np.float32),
        dynamic_names=("a", "b"),
        static_names=("s",),
    )


def _part_of(cohort: CohortArrays, seed: int = 0) -> dict[tuple[str, str], str]:
    split = split_cohort(cohort, seed=seed)
    return {
        (str(cohort.student_ids[i]), str(cohort.terms[i])): name
        for name in ("train", "val", "test")
        for i in getattr(split, name)
    }


def test_split_keeps_every_term_of_a_student_in_one_part() -> None:
    cohort = _cohort([f"s{i:04d}" for i in range(300)], terms_per_student=3)
    parts = _part_of(cohort)
    by_student: dict[str, set[str]] = {}
    for (sid, _), part in parts.items():
        by_student.setdefault(sid, set()).add(part)
    assert len(parts) == 900
    assert all(len(p) == 1 for p in by_student.values())


def test_kfold_keeps_every_term_of_a_student_in_one_part() -> None:
    cohort = _cohort([f"s{i:04d}" for i in range(120)], terms_per_student=2)
    for stratified in (True, False):
        for fold in kfold_splits(cohort, 5, stratified=stratified, seed=3):
            ids = [set(cohort.student_ids[getattr(fold, p)]) for p in ("train", "val", "test")]
            assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
            assert all(len(i) for i in ids)


def test_adding_or_removing_one_student_moves_no_other_student() -> None:
    ids = [f"s{i:04d}" for i in range(182)]
    before = _part_of(_cohort(ids))
    added = _part_of(_cohort([*ids, "newcomer"]))
    removed = _part_of(_cohort(ids[1:]))
    assert {k: v for k, v in added.items() if k[0] != "newcomer"} == before
    assert removed == {k: v for k, v in before.items() if k[0] != ids[0]}


def test_split_is_a_function_of_id_and_seed_only() -> None:
    ids = [f"s{i:04d}" for i in range(200)]
    shuffled = list(np.random.default_rng(1).permutation(ids))
    assert _part_of(_cohort(ids)) == _part_of(_cohort(shuffled, seed=5))
    assert _part_of(_cohort(ids), seed=0) != _part_of(_cohort(ids), seed=1)


def test_split_proportions_are_70_15_15_in_expectation() -> None:
    cohort = _cohort([f"s{i:05d}" for i in range(6000)])
    split = split_cohort(cohort, seed=7)
    shares = np.array([len(split.train), len(split.val), len(split.test)]) / len(cohort)
    np.testing.assert_allclose(shares, [0.70, 0.15, 0.15], atol=0.02)


def test_tiny_cohort_still_gets_every_part() -> None:
    split = split_cohort(_cohort(["a", "b", "c"]), seed=0)
    assert len(split.train) and len(split.val) and len(split.test)


def test_stratified_mode_splits_as_random() -> None:
    cohort = _cohort([f"s{i:04d}" for i in range(100)])
    a, b = split_cohort(cohort, mode="random"), split_cohort(cohort, mode="stratified")
    assert all(np.array_equal(getattr(a, p), getattr(b, p)) for p in ("train", "val", "test"))


def test_kfold_refuses_fewer_students_than_folds() -> None:
    with pytest.raises(Exception, match="at least 5 students"):
        kfold_splits(_cohort(["a", "b", "c"], terms_per_student=3), 5)
