"""Membership inference against a federation's global model (`edufl audit attack RUN_DIR`).

Each institution trained on the train split of its own export (the federation's seed fixes the
split) and normalised with that split's statistics; its test split never reached training. So
the members are the union of the institutions' train splits and the non-members the union of
their test splits, each normalised as its institution did. Whoever holds the exports (an
institution for its own students, a researcher for a simulation) can run it; nothing leaves.
The claimed epsilon defaults to the largest any institution recorded in the run's ledger.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privacy.audit.attack import AttackResult, membership_inference
from privacy.budget import DEFAULT_DELTA
from privacy.ledger.entries import LEDGER_FILE, LedgerError, parse_entries
from shared_models.data.cohort import ModelInputs
from shared_models.data.contract import FeatureSpec
from shared_models.data.node import prepare_node_data
from shared_models.errors import DataContractError
from shared_models.models.checkpoints import (
    CheckpointError,
    checkpoint_model,
    checkpoint_seed,
    latest_checkpoint,
    read_checkpoint,
)

logger = logging.getLogger(__name__)


def attack_federated_run(
    run_dir: Path,
    data_dirs: Sequence[Path],
    spec: FeatureSpec,
    *,
    claimed_epsilon: float | None = None,
    delta: float | None = None,
) -> AttackResult:
    """Attack the last committed global model of ``run_dir`` with the given exports' students.

    Raises:
        DataContractError: no usable checkpoint, another contract, or an export that fails.
    """
    try:
        checkpoint = read_checkpoint(latest_checkpoint(run_dir))
        seed = checkpoint_seed(checkpoint)
        model = checkpoint_model(checkpoint, spec)
    except CheckpointError as exc:
        raise DataContractError(str(exc)) from None
    members, others = [], []
    for data_dir in data_dirs:
        node = prepare_node_data(data_dir, spec, seed=seed)
        members.append(node.train)
        others.append(node.test)
    ledger_epsilon, ledger_delta = _ledger_claim(run_dir)
    claimed = claimed_epsilon if claimed_epsilon is not None else ledger_epsilon
    return membership_inference(
        model,
        ModelInputs.concatenate(members),
        ModelInputs.concatenate(others),
        delta=float(delta if delta is not None else ledger_delta),
        claimed_epsilon=claimed,
        seed=seed,
    )


def _ledger_claim(run_dir: Path) -> tuple[float | None, float]:
    """The largest epsilon any institution recorded in the run's ledger, and its delta."""
    path = run_dir / LEDGER_FILE
    if not path.is_file():
        return None, DEFAULT_DELTA
    try:
        entries = parse_entries(path)
    except LedgerError as exc:
        raise DataContractError(f"{path}: {exc}; check it with `edufl audit verify`") from None
    last: dict[str, Any] = {}
    for entry in entries:
        last[entry.institution] = entry
    if not last or any(e.epsilon_after is None for e in last.values()):
        return None, DEFAULT_DELTA  # no DP claim, or an institution trained without DP
    worst = max(last.values(), key=lambda e: float(e.epsilon_after))
    return float(worst.epsilon_after), float(worst.delta or DEFAULT_DELTA)
