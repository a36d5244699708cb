"""Values a DP node releases besides its DP-SGD update: Gaussian mechanisms, each accounted.

Every such value is a vector that adding or removing one student changes by at most 1 in L2
(sensitivity 1, `privacy.budget.NEIGHBOURING`), released with Gaussian noise of standard
deviation ``std`` drawn from the node's CSPRNG (`privacy.noise.SecureRandom`). Its privacy cost
is recorded before it leaves, in the same accountant history as DP-SGD, as the segment
``(std, 1.0, 1)`` (a Gaussian mechanism without subsampling, which Opacus' RDP and PRV
accountants and dp-accounting's compose exactly), and as its own signed ledger entry
(``kind`` ``count`` or ``histogram``; ``noise_multiplier`` = std, ``max_grad_norm`` = 1).

- `release_count`: the node's number of training students, once per run. A retry, a restart or
  an evaluation of the same run gets the stored release back: never a second draw, which would
  let the server average the noise away (it would be accounted, but waste budget).
- `noised_histogram` (through ``DPSession.release_histogram``): the risk histograms answering a
  federated evaluation.

A release the budget cannot pay for is refused before any noise is drawn
(``PrivacyBudgetExceeded``): nothing is sent instead, least of all the exact value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from privacy.accountant_store import (
    KEEP_HISTOGRAMS,
    AccountantState,
    AccountantStore,
    check_state,
    compute_epsilon,
    extend_history,
)
from privacy.budget import DEFAULT_COUNT_NOISE_STD, NEIGHBOURING, PrivacyBudget
from privacy.ledger.entries import Kind
from privacy.ledger.institution import InstitutionLedger
from privacy.noise import SecureRandom
from shared_models.errors import PrivacyBudgetExceeded

logger = logging.getLogger(__name__)

#: The L2 sensitivity of every release: one student moves one count by one.
SENSITIVITY = 1.0


@dataclass(frozen=True)
class Release:
    """One released vector as it left the node, with its signed ledger entry."""

    values: tuple[float, ...]  # the noised values, exactly as sent
    noise_std: float
    entry: dict[str, Any]
    n_public: int  # the run's released student count (a count release: its rounded value)

    def to_json(self) -> dict[str, Any]:
        return {
            "values": list(self.values),
            "noise_std": self.noise_std,
            "entry": self.entry,
            "n_public": self.n_public,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Release:
        return cls(
            tuple(float(v) for v in raw["values"]),
            float(raw["noise_std"]),
            dict(raw["entry"]),
            int(raw["n_public"]),
        )


def count_key(run_id: str) -> str:
    return f"count|{run_id}"


def histogram_key(run_id: str, server_round: int, digest: str) -> str:
    return f"histogram|{run_id}|{int(server_round)}|{digest}"


def public_count(n_noised: float) -> int:
    """The count a node uses and sends: the noised count rounded, at least 1."""
    return max(1, round(n_noised))


def stored_count(state_dir: Path | str, run_id: str) -> Release | None:
    """The run's count release, if this node already made it."""
    state = AccountantStore(state_dir).load()
    raw = state.releases.get(count_key(run_id)) if state is not None else None
    return Release.from_json(raw) if raw is not None else None


def release_count(
    state_dir: Path | str,
    budget: PrivacyBudget,
    *,
    institution: str,
    run_id: str,
    server_round: int,
    node: str,
    n_students: int,
    noise_std: float = DEFAULT_COUNT_NOISE_STD,
    signing_key: ec.EllipticCurvePrivateKey | Path | None = None,
) -> Release:
    """The run's noised count of training students: ``n + N(0, noise_std**2)``, once per run.

    Args:
        n_students: the exact number of distinct training students; it never leaves the node.

    Raises:
        PrivacyBudgetExceeded: the budget cannot pay for it (nothing drawn, nothing written).
        AccountantStateError: the state belongs to another institution or budget.
    """
    store = AccountantStore(state_dir)
    ledger = InstitutionLedger(state_dir, institution, signing_key)
    with store.locked():
        state = check_state(store.load(), budget, institution)
        ledger.repair(state.last_entry)
        done = state.releases.get(count_key(run_id))
        if done is not None:
            return Release.from_json(done)
        state, release = gaussian_release(
            state,
            ledger,
            budget,
            key=count_key(run_id),
            kind="count",
            exact=[float(n_students)],
            noise_std=noise_std,
            n_public=None,
            fields={"node": str(node), "run_id": str(run_id), "round": int(server_round)},
        )
        store.save(state)
        ledger.append(release.entry)
    logger.info(
        "%s released its student count for run %s (noise std %g): %d",
        institution,
        run_id,
        noise_std,
        release.n_public,
    )
    return release


def gaussian_release(
    state: AccountantState,
    ledger: InstitutionLedger,
    budget: PrivacyBudget,
    *,
    key: str,
    kind: Kind,
    exact: Sequence[float],
    noise_std: float,
    n_public: int | None,
    fields: dict[str, Any],
) -> tuple[AccountantState, Release]:
    """Check, draw, sign: the new state and the release (the caller saves, then appends).

    Call with the store locked. ``n_public`` None: this is the count release, whose rounded
    value becomes the run's ``n_public``.

    Raises:
        PrivacyBudgetExceeded: the release would exceed the budget; nothing was drawn.
    """
    ledger.refuse_if_voided()
    segment = (float(noise_std), 1.0, 1)
    history = extend_history(state.history, segment)
    epsilon = max(compute_epsilon(budget.accountant, history, budget.delta), state.epsilon_spent)
    if epsilon > budget.epsilon:
        raise PrivacyBudgetExceeded(
            f"{state.institution}: releasing the {kind} (noise std {noise_std:g}) would raise "
            f"epsilon from {state.epsilon_spent:.4g} to {epsilon:.4g}, above its budget "
            f"{budget.epsilon:g}; this node declines it and sends nothing instead"
        )
    noise = SecureRandom().normal((len(exact),), noise_std).numpy()
    values = tuple(float(v) for v in np.asarray(exact, dtype=np.float64) + noise)
    n_public = public_count(values[0]) if n_public is None else n_public
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"a {kind} release must be finite")
    entry = ledger.sign_next(
        {
            **fields,
            "kind": kind,
            "private": True,
            "accountant": budget.accountant,
            "neighbouring": NEIGHBOURING,
            "noise_multiplier": float(noise_std) / SENSITIVITY,
            "sample_rate": 1.0,
            "steps": 1,
            "max_grad_norm": SENSITIVITY,
            "delta": float(budget.delta),
            "n_students": int(n_public),
            "n_noised": True,
            "epsilon_after": float(epsilon),
            "epsilon_budget": float(budget.epsilon),
        }
    )
    release = Release(values, float(noise_std), entry, n_public)
    releases = dict(state.releases)
    if kind == "histogram":
        old = [k for k in releases if k.startswith("histogram|")]
        for stale in old[: max(0, len(old) - KEEP_HISTOGRAMS + 1)]:
            del releases[stale]
    releases[key] = release.to_json()
    new_state = state.model_copy(
        update={
            "history": history,
            "epsilon_spent": epsilon,
            "last_entry": entry,
            "releases": releases,
            "evaluations_done": state.evaluations_done + (kind == "histogram"),
        }
    )
    return new_state, release
