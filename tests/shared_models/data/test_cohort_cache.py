"""An export is read and validated once per change of its files, whatever the seed of the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared_models.data import node
from shared_models.data.contract import default_spec
from shared_models.data.node import cached_cohort, clear_cohorts, split_node
from shared_models.errors import DataContractError


@pytest.fixture(autouse=True)
def _empty_cache():
    clear_cohorts()
    yield
    clear_cohorts()


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = node.load_cohort

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(node, "load_cohort", counting)
    return calls


def test_splits_of_other_seeds_reuse_the_read_export(export_copy: Path, reads: list[str]):
    spec = default_spec()
    first = split_node(export_copy, spec, seed=0)
    other = split_node(export_copy, spec, seed=1)
    again = split_node(export_copy, spec, seed=0)
    assert len(reads) == 1
    assert not np.array_equal(first.train.student_ids, other.train.student_ids)
    np.testing.assert_array_equal(first.train.student_ids, again.train.student_ids)
    np.testing.assert_array_equal(first.test.dynamic, again.test.dynamic)
    # The splits are copies: training code may write to them.
    first.train.dynamic[0, 0, 0] = 123.0
    assert split_node(export_copy, spec, seed=0).train.dynamic[0, 0, 0] != 123.0


def test_the_shared_cohort_is_read_only(export_copy: Path):
    cohort = cached_cohort(export_copy, default_spec())
    with pytest.raises(ValueError, match="read-only"):
        cohort.dynamic[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        cohort.at_risk[0] = 1.0


def test_a_changed_added_or_removed_file_is_read_again(export_copy: Path, reads: list[str]):
    spec = default_spec()
    before = cached_cohort(export_copy, spec)
    students = export_copy / "students.csv"
    text = students.read_text()
    students.write_text("".join(text.splitlines(keepends=True)[:-1]))  # one student fewer
    with pytest.raises(DataContractError, match=r"is not in students\.csv"):
        cached_cohort(export_copy, spec)
    students.write_text(text)  # the same content, written again: still a change
    assert cached_cohort(export_copy, spec) is not before
    (export_copy / "notes.txt").write_text("an added file is a change too")
    cached_cohort(export_copy, spec)
    (export_copy / "notes.txt").unlink()
    after = cached_cohort(export_copy, spec)
    assert len(reads) == 5
    np.testing.assert_array_equal(before.student_ids, after.student_ids)
    assert cached_cohort(export_copy, spec) is after


def test_another_institution_name_or_contract_is_another_entry(export_copy: Path, reads):
    spec = default_spec()
    named = cached_cohort(export_copy, spec, institution="uni_x")
    assert set(named.institution) == {"uni_x"}
    default = cached_cohort(export_copy, spec)
    assert set(default.institution) == {"export"}
    assert len(reads) == 2
    assert cached_cohort(export_copy, spec, institution="uni_x") is named
    assert len(reads) == 2
