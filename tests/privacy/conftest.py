"""Tiny cohorts, keys and one-round helpers for the privacy tests (no files beyond tmp_path)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import ec

from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from shared_models.data.cohort import ModelInputs
from shared_models.models.registry import build_model
from shared_models.training import make_loader, make_optimizer, set_seed, train_one_epoch

WEEKS, DYNAMIC, STATIC = 4, 3, 2
BATCH = 8


def random_inputs(n: int, seed: int = 0) -> ModelInputs:
    """Students with random features and random labels: only memorising can fit them."""
    rng = np.random.default_rng(seed)
    return ModelInputs(
        dynamic=rng.normal(size=(n, WEEKS, DYNAMIC)).astype(np.float32),
        week_mask=np.ones((n, WEEKS), dtype=np.float32),
        static=rng.normal(size=(n, STATIC)).astype(np.float32),
        grade=np.full(n, np.nan, dtype=np.float32),
        at_risk=(rng.random(n) < 0.5).astype(np.float32),
    )


def tiny_model(hidden: int = 8) -> Any:
    return build_model("lstm", WEEKS, DYNAMIC, STATIC, {"hidden_size": hidden, "dropout": 0.0})


RunRound = Callable[..., dict[str, Any]]


@pytest.fixture
def students() -> ModelInputs:
    return random_inputs(64)


@pytest.fixture
def budget() -> PrivacyBudget:
    return PrivacyBudget(epsilon=2.0, delta=1e-3, max_grad_norm=1.0, accountant="rdp")


@pytest.fixture
def plan(students: ModelInputs) -> DPPlan:
    return DPPlan.for_training(len(students), BATCH, local_epochs=1, planned_rounds=3)


@pytest.fixture
def run_round(students: ModelInputs) -> RunRound:
    """Open a session on ``state_dir``, train one round as a ClientApp would, spend it."""

    def run(
        state_dir: Path,
        budget: PrivacyBudget,
        plan: DPPlan,
        server_round: int,
        *,
        institution: str = "uni_a",
        epochs: int = 1,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> dict[str, Any]:
        session = DPSession.open(state_dir, budget, plan, institution=institution, signing_key=key)
        set_seed(server_round)
        model = tiny_model()
        loader = make_loader(students, BATCH, shuffle=True, seed=server_round)
        model, optimizer, loader = session.make_private(model, make_optimizer(model), loader)
        for _ in range(epochs):
            train_one_epoch(model, loader, optimizer, "risk")
        return session.spend_round("run-1", server_round, "node-7")

    return run


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and lose a lot when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
