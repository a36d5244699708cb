"""The privacy accountant's state on the institution's own disk, so a restarted node keeps counting.

Opacus' accountants keep their whole state in one list of ``(noise_multiplier, sample_rate,
steps)`` triples. `AccountantState` stores that list, with the budget and the calibrated noise it
was spent under, as one JSON file written atomically (temporary file, fsync, rename): a crash
leaves either the old or the new state, never half of one. Only aggregate parameters are stored;
nothing about any student.
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privacy.budget import PRV_EPS_ERROR, DPPlan, Mechanism, PrivacyBudget, calibrate_noise
from shared_models.atomic import write_text_atomic
from shared_models.errors import EduflError
from shared_models.user_files import describe_read_error, loads_json, read_text

logger = logging.getLogger(__name__)

STATE_FILE = "accountant.json"
LOCK_FILE = ".accountant.lock"
STATE_FORMAT: Literal[1] = 1

#: One accountant history segment: ``(noise_multiplier, sample_rate, steps)``, as in Opacus.
Segment = tuple[float, float, int]


class AccountantStateError(EduflError, ValueError):
    """The accountant state file is unreadable or belongs to another institution or budget."""


#: A stored segment, with the ranges Opacus' accountants accept (the file is not trusted).
_StoredSegment = tuple[
    Annotated[float, Field(ge=0)],  # noise multiplier
    Annotated[float, Field(gt=0, le=1)],  # sample rate
    Annotated[int, Field(ge=0)],  # steps
]


class AccountantState(BaseModel):
    """Everything an institution's node must remember between rounds and restarts."""

    # No NaN or infinity anywhere: a damaged file must not read back as "nothing spent".
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    format: Literal[1] = STATE_FORMAT
    institution: Annotated[str, Field(min_length=1, max_length=64)]
    accountant: Mechanism
    delta: Annotated[float, Field(gt=0, lt=1)]
    epsilon_budget: Annotated[float, Field(gt=0)]
    # calibrated for the plan below (or what remained of it)
    noise_multiplier: Annotated[float, Field(ge=0)]
    plan: DPPlan
    history: list[_StoredSegment] = Field(default_factory=list)
    rounds_done: Annotated[int, Field(ge=0)] = 0
    epsilon_spent: Annotated[float, Field(ge=0)] = 0.0
    last_entry: dict[str, Any] | None = None  # the last signed ledger entry (ledger repair)


def extend_history(history: Sequence[Segment], segment: Segment) -> list[Segment]:
    """``history`` plus ``segment``, merged as Opacus' accountants merge equal consecutive steps."""
    out = [tuple(h) for h in history]
    sigma, rate, steps = segment
    if out and out[-1][0] == sigma and out[-1][1] == rate:
        out[-1] = (sigma, rate, int(out[-1][2]) + steps)
    elif steps > 0:
        out.append((sigma, rate, steps))
    return out  # type: ignore[return-value]


def make_accountant(mechanism: Mechanism, history: Sequence[Segment] = ()) -> IAccountant:
    """An Opacus accountant of ``mechanism`` that already holds ``history``."""
    accountant: IAccountant = RDPAccountant() if mechanism == "rdp" else PRVAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


def compute_epsilon(mechanism: Mechanism, history: Sequence[Segment], delta: float) -> float:
    """Epsilon spent by ``history`` at ``delta`` under Opacus' accountant ``mechanism``.

    PRV returns the upper end of its error interval (``PRV_EPS_ERROR``), so it never understates.
    """
    key = tuple((float(s), float(q), int(n)) for s, q, n in history if n > 0)
    return _epsilon(mechanism, key, float(delta))


# A pure function of its arguments, and each round asks for the same value twice (check before
# training, commit after); Opacus' fractional RDP orders take a noticeable fraction of a second.
@functools.lru_cache(maxsize=256)
def _epsilon(mechanism: Mechanism, history: tuple[Segment, ...], delta: float) -> float:
    if not history:
        return 0.0
    accountant = make_accountant(mechanism, history)
    with warnings.catch_warnings():
        # RDP's "optimal order is the largest alpha" only says the bound could be tighter.
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha", UserWarning)
        if mechanism == "prv":
            return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
        return float(accountant.get_epsilon(delta))


class AccountantStore:
    """The accountant state file in an institution's state directory, with a process lock."""

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / STATE_FILE

    def load(self) -> AccountantState | None:
        """The stored state, or None before the first round."""
        try:
            raw = read_text(self.path)
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            reason: object = describe_read_error(exc)
        else:
            try:
                return AccountantState.model_validate(loads_json(raw))
            except (ValueError, ValidationError) as exc:
                reason = _first_problem(exc)
        # Never start again from zero over a damaged file: that would forget spent budget.
        raise AccountantStateError(
            f"{self.path}: damaged accountant state ({reason}); restore it from a backup; "
            "deleting it would forget the privacy budget already spent"
        )

    def save(self, state: AccountantState) -> None:
        """Write ``state`` atomically (temporary file, fsync, rename, fsync of the folder)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps(state.model_dump(mode="json"), indent=2, allow_nan=False)
        write_text_atomic(self.path, data + "\n", mode=0o600, durable=True)
        logger.debug("saved accountant state (%d segments) to %s", len(state.history), self.path)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock so two processes of one node cannot both spend the budget."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / LOCK_FILE).open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _first_problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(state)"
        return f"{where}: {err['msg']}"
    return str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def reconcile_state(
    state: AccountantState | None, budget: PrivacyBudget, plan: DPPlan, institution: str
) -> AccountantState:
    """The stored state, calibrated for ``budget`` and ``plan`` (recalibrated if they changed)."""
    fresh = AccountantState(
        institution=institution,
        accountant=budget.accountant,
        delta=budget.delta,
        epsilon_budget=budget.epsilon,
        noise_multiplier=0.0,
        plan=plan,
    )
    if state is None or not state.history:
        if state is not None and state.institution != institution:
            raise AccountantStateError(f"this state folder belongs to {state.institution!r}")
        return fresh.model_copy(update={"noise_multiplier": calibrate_noise(budget, plan)})
    if state.institution != institution:
        raise AccountantStateError(
            f"this state folder belongs to {state.institution!r}, not {institution!r}"
        )
    if state.accountant != budget.accountant or state.delta != budget.delta:
        raise AccountantStateError(
            f"{institution} started spending with delta {state.delta:g} ({state.accountant}); "
            f"delta and accountant are fixed once spending began (asked: {budget.delta:g}, "
            f"{budget.accountant}); use a new state folder for a new budget"
        )
    if state.plan == plan and state.epsilon_budget == budget.epsilon:
        return state
    sigma = _calibrate_remaining(budget, plan, state)
    logger.warning(
        "%s: budget or plan changed after %d round(s); noise multiplier %.4f -> %.4f",
        institution,
        state.rounds_done,
        state.noise_multiplier,
        sigma,
    )
    return state.model_copy(
        update={"plan": plan, "epsilon_budget": budget.epsilon, "noise_multiplier": sigma}
    )


def _calibrate_remaining(budget: PrivacyBudget, plan: DPPlan, state: AccountantState) -> float:
    """Smallest noise that fits the remaining planned rounds on top of what was spent."""
    rounds = plan.planned_rounds - state.rounds_done
    if rounds <= 0:
        return state.noise_multiplier  # the budget check refuses once the budget is used up

    def fits(sigma: float) -> bool:
        segment = (sigma, plan.sample_rate, rounds * plan.steps_per_round)
        history = extend_history(state.history, segment)
        return compute_epsilon(budget.accountant, history, budget.delta) <= budget.epsilon

    # A floor of 0.3: below it DP-SGD gives no meaningful protection, and PRV gets slow.
    low, high = 0.3, max(state.noise_multiplier, 0.5)
    while not fits(high):
        low, high = high, 2 * high
        if high > 1e4:
            return state.noise_multiplier  # nothing fits: the round check will refuse
    while high - low > 0.005 * high:
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
    return high
