"""DP-SGD across rounds: budgets hold, refusals come first, restarts keep counting."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from privacy.accountant_store import STATE_FILE, compute_epsilon
from privacy.audit.verify import verify_ledger
from privacy.budget import DPPlan, PrivacyBudget, PrivacyConfigError
from privacy.dp import DPSession
from privacy.ledger.entries import LEDGER_FILE
from privacy.ledger.institution import record_non_private_round
from shared_models.data.cohort import ModelInputs
from shared_models.errors import PrivacyBudgetExceeded
from shared_models.training import make_loader, make_optimizer, train_one_epoch
from tests.privacy.conftest import BATCH, RunRound, tiny_model


def _snapshot(state_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (state_dir / STATE_FILE, state_dir / LEDGER_FILE)}


def test_epsilon_grows_every_round_and_ends_within_budget_after_planned_rounds(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound
) -> None:
    entries = [run_round(tmp_path, budget, plan, r) for r in range(1, plan.planned_rounds + 1)]

    epsilons = [e["epsilon_after"] for e in entries]
    assert all(a < b for a, b in itertools.pairwise(epsilons))
    assert epsilons[-1] <= budget.epsilon
    assert epsilons[-1] >= 0.95 * budget.epsilon  # calibrated for the plan, not wasted
    assert [e["steps"] for e in entries] == [plan.steps_per_round] * plan.planned_rounds


def test_one_accountant_composes_all_rounds_not_a_fresh_one_per_round(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound
) -> None:
    first = run_round(tmp_path, budget, plan, 1)
    second = run_round(tmp_path, budget, plan, 2)

    sigma, rate = first["noise_multiplier"], first["sample_rate"]
    two_rounds = [(sigma, rate, 2 * plan.steps_per_round)]
    assert second["epsilon_after"] == pytest.approx(
        compute_epsilon("rdp", two_rounds, budget.delta)
    )
    assert second["epsilon_after"] > first["epsilon_after"]


def test_client_refuses_round_that_would_exceed_budget(
    tmp_path: Path,
    budget: PrivacyBudget,
    plan: DPPlan,
    run_round: RunRound,
    students: ModelInputs,
) -> None:
    for r in range(1, plan.planned_rounds + 1):
        run_round(tmp_path, budget, plan, r)
    before = _snapshot(tmp_path)
    session = DPSession.open(tmp_path, budget, plan, institution="uni_a")
    model = tiny_model()
    weights = [p.detach().clone() for p in model.parameters()]

    with pytest.raises(PrivacyBudgetExceeded, match="above its budget"):
        session.make_private(model, make_optimizer(model), make_loader(students, BATCH))

    assert _snapshot(tmp_path) == before  # nothing spent, nothing written
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert session.epsilon_spent <= budget.epsilon


def test_restarted_session_keeps_its_spent_budget(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound
) -> None:
    run_round(tmp_path, budget, plan, 1)
    second = run_round(tmp_path, budget, plan, 2)

    restarted = DPSession.open(tmp_path, budget, plan, institution="uni_a")

    assert restarted.rounds_done == 2
    assert restarted.epsilon_spent == second["epsilon_after"]
    assert restarted.check_round() > second["epsilon_after"]
    third = run_round(tmp_path, budget, plan, 3)
    assert third["seq"] == 2 and third["epsilon_after"] > second["epsilon_after"]


def test_round_taking_more_steps_than_checked_is_stopped_and_not_spent(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, students: ModelInputs
) -> None:
    session = DPSession.open(tmp_path, budget, plan, institution="uni_a")
    model = tiny_model()
    model, optimizer, loader = session.make_private(
        model, make_optimizer(model), make_loader(students, BATCH, shuffle=True)
    )
    train_one_epoch(model, loader, optimizer, "risk")

    with pytest.raises(PrivacyBudgetExceeded, match=r"more than the \d+ DP steps"):
        train_one_epoch(model, loader, optimizer, "risk")  # a second epoch was not planned

    assert not (tmp_path / STATE_FILE).exists()
    session.abandon_round()
    assert session.check_round() > 0 and session.epsilon_spent == 0.0


def test_loader_with_another_batch_size_than_planned_is_refused(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, students: ModelInputs
) -> None:
    session = DPSession.open(tmp_path, budget, plan, institution="uni_a")
    model = tiny_model()

    with pytest.raises(PrivacyConfigError, match="calibrated for"):
        session.make_private(model, make_optimizer(model), make_loader(students, 2 * BATCH))


def test_physical_batch_limit_splits_batches_but_not_privacy_steps(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, students: ModelInputs
) -> None:
    session = DPSession.open(tmp_path, budget, plan, institution="uni_a", max_physical_batch_size=3)
    model = tiny_model()
    model, optimizer, loader = session.make_private(
        model, make_optimizer(model), make_loader(students, BATCH, shuffle=True)
    )
    sizes: list[int] = []

    def recording(batches: Iterable[Any]) -> Iterator[Any]:
        # Iterate only while training: BatchMemoryManager queues a skip signal per chunk.
        for batch in batches:
            sizes.append(len(batch[0]))
            yield batch

    train_one_epoch(model, recording(loader), optimizer, "risk")
    entry = session.spend_round("run-1", 1, "node-7")

    assert max(sizes) <= 3 and len(sizes) > plan.steps_per_round
    assert entry["steps"] == plan.steps_per_round


def test_delta_not_below_one_over_n_is_refused(tmp_path: Path, plan: DPPlan) -> None:
    too_large = PrivacyBudget(epsilon=2.0, delta=1 / plan.n_students)

    with pytest.raises(PrivacyConfigError, match="not below 1/n"):
        DPSession.open(tmp_path, too_large, plan, institution="uni_a")

    assert not any(tmp_path.iterdir())


def test_state_of_another_institution_or_delta_is_refused(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound
) -> None:
    run_round(tmp_path, budget, plan, 1)

    with pytest.raises(ValueError, match="belongs to 'uni_a'"):
        DPSession.open(tmp_path, budget, plan, institution="uni_b")
    with pytest.raises(ValueError, match="delta and accountant are fixed"):
        other_delta = PrivacyBudget(epsilon=budget.epsilon, delta=budget.delta / 10)
        DPSession.open(tmp_path, other_delta, plan, institution="uni_a")


def test_changed_plan_recalibrates_noise_for_the_remaining_rounds(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound
) -> None:
    run_round(tmp_path, budget, plan, 1)
    first_sigma = DPSession.open(tmp_path, budget, plan, institution="uni_a").noise_multiplier
    longer = DPPlan(**(plan.model_dump() | {"planned_rounds": 4}))

    session = DPSession.open(tmp_path, budget, longer, institution="uni_a")
    entries = [run_round(tmp_path, budget, longer, r) for r in (2, 3, 4)]

    assert session.noise_multiplier > first_sigma  # more rounds to share the same budget
    assert entries[-1]["noise_multiplier"] == session.noise_multiplier
    assert budget.epsilon * 0.95 <= entries[-1]["epsilon_after"] <= budget.epsilon


def test_crash_between_state_commit_and_ledger_append_is_repaired_on_open(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound
) -> None:
    run_round(tmp_path, budget, plan, 1)
    run_round(tmp_path, budget, plan, 2)
    ledger = tmp_path / LEDGER_FILE
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(lines[0])  # the second entry never reached the ledger

    DPSession.open(tmp_path, budget, plan, institution="uni_a")

    assert ledger.read_bytes() == b"".join(lines)
    assert verify_ledger(ledger).ok


def test_round_without_dp_is_recorded_and_voids_later_dp_claims(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound
) -> None:
    run_round(tmp_path, budget, plan, 1)
    entry = record_non_private_round(
        tmp_path,
        institution="uni_a",
        run_id="run-1",
        server_round=2,
        node="node-7",
        n_students=plan.n_students,
        steps=4,
    )

    assert entry["private"] is False and entry["epsilon_after"] is None
    with pytest.raises(PrivacyBudgetExceeded, match="without DP"):
        DPSession.open(tmp_path, budget, plan, institution="uni_a").check_round()
    assert verify_ledger(tmp_path / LEDGER_FILE).ok


def test_prv_accountant_is_selectable_and_stays_within_budget(
    tmp_path: Path, plan: DPPlan, run_round: RunRound
) -> None:
    prv = PrivacyBudget(epsilon=2.0, delta=1e-3, accountant="prv")

    entries = [run_round(tmp_path, prv, plan, r) for r in (1, 2)]

    assert [e["accountant"] for e in entries] == ["prv"] * 2
    assert entries[0]["epsilon_after"] < entries[1]["epsilon_after"] <= prv.epsilon
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["accountant"] == "prv" and state["history"][0][2] == 2 * plan.steps_per_round


def _three_term_cohort(n_students: int = 40) -> tuple[ModelInputs, np.ndarray]:
    """Students with one term each, except student "s0", who has three."""
    from tests.privacy.conftest import random_inputs

    inputs = random_inputs(n_students + 2, seed=3)
    ids = np.array(["s0", "s0", "s0", *(f"s{i}" for i in range(1, n_students))], dtype=object)
    return dataclasses.replace(inputs, student_ids=ids), ids


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_a_student_with_three_terms_moves_each_step_by_one_clipped_contribution(
    tmp_path: Path,
) -> None:
    inputs, ids = _three_term_cohort()
    budget = PrivacyBudget(epsilon=8.0, delta=1e-3, max_grad_norm=1.0)
    plan = DPPlan.for_training(40, 20, local_epochs=1, planned_rounds=1)  # q = 1/2: s0 often in
    session = DPSession.open(tmp_path, budget, plan, institution="uni_a")
    model = tiny_model()
    _, optimizer, loader = session.make_private(
        model, make_optimizer(model), make_loader(inputs, 20), student_ids=ids
    )
    seen_s0 = 0
    for _ in range(30):  # many passes: each student is sampled at most once per step
        for batch in loader.batch_sampler:
            students = ids[batch]
            assert len(set(students)) == len(students), "a student gave two records to one step"
            seen_s0 += int("s0" in set(students))
    assert seen_s0 > 0

    # Removing s0 changes one step's clipped sum by one clipped gradient: at most C.
    # Poisson sampling: s0 is in a given step with probability 1/2, so look over many passes.
    batch = next(b for _ in range(50) for b in loader.batch_sampler if "s0" in set(ids[b]))
    without = [i for i in batch if ids[i] != "s0"]
    summed = [_clipped_sum(model, optimizer, inputs, rows) for rows in (batch, without)]
    moved = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(*summed, strict=True)))
    assert 0 < float(moved) <= budget.max_grad_norm * (1 + 1e-5)
    session.abandon_round()


def _clipped_sum(
    model: torch.nn.Module, optimizer: Any, inputs: ModelInputs, rows: list[int]
) -> list[torch.Tensor]:
    """Opacus' per-student clipped gradient sum for the records ``rows`` (no noise added)."""
    from shared_models.evaluation import input_tensors
    from shared_models.losses import task_loss

    batch = [t[rows] for t in input_tensors(inputs)]
    optimizer.zero_grad(set_to_none=True)
    out = model(batch[0], batch[1], batch[2])
    task_loss(out, batch[3], batch[4], "risk").backward()
    optimizer.clip_and_accumulate()
    sums = [p.summed_grad.detach().clone() for p in optimizer.params]
    optimizer.zero_grad(set_to_none=True)
    return sums


def test_a_resume_past_the_planned_rounds_is_declined_not_trained_on_pure_noise(
    tmp_path: Path, budget: PrivacyBudget, plan: DPPlan, run_round: RunRound, students: ModelInputs
) -> None:
    """The scenario of the issue: a --resume with more rounds than planned recalibrated the
    little budget left to sigma ~121 and the server aggregated noise as a success."""
    for r in range(1, plan.planned_rounds + 1):
        run_round(tmp_path, budget, plan, r)
    before = _snapshot(tmp_path)
    longer = plan.model_copy(update={"planned_rounds": 2 * plan.planned_rounds})
    session = DPSession.open(tmp_path, budget, longer, institution="uni_a")
    assert session.noise_multiplier > budget.max_noise_multiplier  # what it would have used
    model = tiny_model()

    with pytest.raises(PrivacyBudgetExceeded, match="declines this round"):
        session.make_private(model, make_optimizer(model), make_loader(students, BATCH))

    assert _snapshot(tmp_path) == before  # nothing trained, nothing spent


def test_the_noise_pays_for_the_count_and_the_planned_evaluations_too(tmp_path: Path) -> None:
    from privacy.releases import release_count

    budget = PrivacyBudget(epsilon=2.0, delta=1e-3)
    release = release_count(
        tmp_path,
        budget,
        institution="uni_a",
        run_id="r",
        server_round=1,
        node="7",
        n_students=64,
    )
    again = release_count(
        tmp_path,
        budget,
        institution="uni_a",
        run_id="r",
        server_round=2,
        node="7",
        n_students=64,
    )
    assert again == release  # once per run: never a second draw
    plan = DPPlan.for_training(
        release.n_public,
        BATCH,
        local_epochs=1,
        planned_rounds=3,
        planned_evaluations=3,
        n_noised=True,
    )
    session = DPSession.open(tmp_path, budget, plan, institution="uni_a")
    bare = DPPlan.for_training(release.n_public, BATCH, local_epochs=1, planned_rounds=3)
    assert (
        session.noise_multiplier
        > DPSession.open(tmp_path / "bare", budget, bare, institution="uni_a").noise_multiplier
    )
    history = [
        (20.0, 1.0, 1),
        (session.noise_multiplier, plan.sample_rate, plan.total_steps),
        (plan.histogram_noise_std, 1.0, 3),
    ]
    planned = compute_epsilon("rdp", history, budget.delta)
    assert 0.97 * budget.epsilon <= planned <= budget.epsilon
