"""The student, not the record, is the unit: on the synthetic consortium's own files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from shared_models.data.contract import default_spec
from shared_models.data.node import prepare_node_data
from shared_models.models.registry import build_model
from shared_models.training import make_loader, make_optimizer
from simulations.synthetic import write_consortium
from tests.privacy.test_dp_session import _clipped_sum

TABLES = ("students", "activity", "outcomes")


def _three_terms(export: Path, student: str) -> None:
    """Give ``student`` two more terms: copies of their rows under other term labels."""
    for table in TABLES:
        path = export / f"{table}.csv"
        frame = pd.read_csv(path, dtype={"student_id": str, "term": str})
        rows = frame[frame["student_id"] == student]
        extra = [rows.assign(term=f"{term}-extra") for term in ("2031-1", "2031-2")]
        pd.concat([frame, *extra]).to_csv(path, index=False)


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = write_consortium(tmp_path_factory.mktemp("unit"), institutions=1, students=80)[0]
    first = prepare_node_data(folder, default_spec(), seed=0)
    student = str(first.train.student_ids[0])  # in the training split, under the keyed hash
    _three_terms(folder, student)
    return folder, student


def test_a_students_three_terms_stay_in_one_split(export: tuple[Path, str]) -> None:
    folder, student = export
    node = prepare_node_data(folder, default_spec(), seed=0)
    where = {
        part: int(np.sum(getattr(node, part).student_ids == student))
        for part in ("train", "val", "test")
    }
    assert where == {"train": 3, "val": 0, "test": 0}


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_a_student_with_three_terms_moves_the_update_by_one_clipped_contribution(
    export: tuple[Path, str], tmp_path: Path
) -> None:
    folder, student = export
    node = prepare_node_data(folder, default_spec(), seed=0)
    inputs, ids = node.train, np.asarray(node.train.student_ids)
    n_students = len(set(ids))
    budget = PrivacyBudget(epsilon=8.0, delta=1e-3, max_grad_norm=1.0)
    batch_size = (n_students + 1) // 2  # two batches an epoch: q = 1/2, the student often in
    plan = DPPlan.for_training(n_students, batch_size, 1, 1)
    session = DPSession.open(tmp_path, budget, plan, institution="institution_01")
    weeks, n_dynamic, n_static = node.shapes
    torch.manual_seed(0)
    model = build_model("lstm", weeks, n_dynamic, n_static, {"hidden_size": 8, "dropout": 0.0})
    _, optimizer, loader = session.make_private(
        model, make_optimizer(model), make_loader(inputs, batch_size), student_ids=ids
    )
    steps_with = 0
    for _ in range(20):
        for batch in loader.batch_sampler:
            assert len(set(ids[batch])) == len(batch), "a student gave two records to one step"
            steps_with += int(student in set(ids[batch]))
    assert steps_with > 0

    batch = next(b for _ in range(50) for b in loader.batch_sampler if student in set(ids[b]))
    without = [i for i in batch if ids[i] != student]
    summed = [_clipped_sum(model, optimizer, inputs, rows) for rows in (batch, without)]
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(*summed, strict=True)))
    assert 0 < float(moved) <= budget.max_grad_norm * (1 + 1e-5)
    session.abandon_round()
