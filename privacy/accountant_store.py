"""The privacy accountant's state on the institution's own disk, so a restarted node keeps counting.

Opacus' accountants keep their whole state in one list of ``(noise_multiplier, sample_rate,
steps)`` triples. `AccountantState` stores that list, with the budget and the calibrated noise it
was spent under, as one JSON file written atomically (temporary file, fsync, rename): a crash
leaves either the old or the new state, never half of one. Only aggregate parameters and the
values already released (the noised count, noised histograms: `privacy.releases`) are stored;
nothing exact about any student.

The history holds every mechanism the node ran: DP-SGD segments ``(sigma, q, steps)`` and each
release of sensitivity 1 as ``(std, 1.0, 1)`` (a Gaussian mechanism without subsampling), so
Opacus' RDP and PRV accountants compose them exactly.

Under RDP a segment's curve (its RDP at each of Opacus' orders) is ``steps`` times the curve of
one step of ``(sigma, q)``, and only that per-step curve is costly (the fractional orders). A
node forks a fresh process for every message, so the curves of the mechanisms in the history are
kept on disk beside the state (`CURVES_FILE`) and read back with it: a round's epsilon is then
the same sum Opacus computes, over the same numbers, without recomputing them (`rdp_epsilon`).
"""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privacy.budget import (
    _MIN_NOISE_MULTIPLIER,
    PRV_EPS_ERROR,
    DPPlan,
    Mechanism,
    PrivacyBudget,
    PrivacyConfigError,
    Segment,
    planned_history,
)
from shared_models.atomic import write_text_atomic
from shared_models.errors import EduflError
from shared_models.user_files import describe_read_error, loads_json, read_text

logger = logging.getLogger(__name__)

STATE_FILE = "accountant.json"
#: The per-step RDP curves of the mechanisms in the history (a cache: deleting it costs time only).
CURVES_FILE = "accountant-rdp.json"
#: Opacus' RDP orders: the curves are computed, stored and summed at these.
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
LOCK_FILE = ".accountant.lock"
STATE_FORMAT: Literal[1] = 1

#: Released values kept for idempotent retries (count releases are kept for every run).
KEEP_HISTOGRAMS = 8


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
    # calibrated for the plan below (or what remained of it); 0 before any plan
    noise_multiplier: Annotated[float, Field(ge=0)] = 0.0
    plan: DPPlan | None = None  # None while only a count was released
    history: list[_StoredSegment] = Field(default_factory=list)
    rounds_done: Annotated[int, Field(ge=0)] = 0
    evaluations_done: Annotated[int, Field(ge=0)] = 0
    epsilon_spent: Annotated[float, Field(ge=0)] = 0.0
    last_entry: dict[str, Any] | None = None  # the last signed ledger entry (ledger repair)
    #: Released values by release key (`privacy.releases`): a retry re-sends, never redraws.
    releases: dict[str, dict[str, Any]] = Field(default_factory=dict)


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
# training, commit after).
@functools.lru_cache(maxsize=256)
def _epsilon(mechanism: Mechanism, history: tuple[Segment, ...], delta: float) -> float:
    if not history:
        return 0.0
    if mechanism == "rdp":
        return rdp_epsilon(history, delta)
    accountant = make_accountant(mechanism, history)
    with warnings.catch_warnings():
        # PRV takes log(1 - q) = -inf for a release without subsampling (q = 1) and handles it.
        warnings.filterwarnings("ignore", "divide by zero encountered in log", RuntimeWarning)
        return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))


def rdp_epsilon(history: Sequence[Segment], delta: float) -> float:
    """Opacus' ``RDPAccountant.get_epsilon`` of ``history``, from the per-step curves.

    The same operations on the same numbers as Opacus 1.6 (``compute_rdp`` is the per-step
    curve times ``steps``; the segments are summed in order from 0), so the same float, with each
    ``(sigma, q)``'s curve computed once per process or read from `CURVES_FILE`.
    """
    segments = [(float(s), float(q), int(n)) for s, q, n in history]
    if not segments:
        return 0.0
    rdp = sum([np.asarray(rdp_curve(sigma, q)) * steps for sigma, q, steps in segments])
    with warnings.catch_warnings():
        # RDP's "optimal order is the largest alpha" only says the bound could be tighter.
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha", UserWarning)
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


_curves: dict[tuple[float, float], tuple[float, ...]] = {}


def rdp_curve(sigma: float, q: float) -> tuple[float, ...]:
    """RDP of one step of the subsampled Gaussian (``sigma``, ``q``) at each of `RDP_ORDERS`."""
    key = (float(sigma), float(q))
    curve = _curves.get(key)
    if curve is None:
        values = rdp_analysis.compute_rdp(
            q=key[1], noise_multiplier=key[0], steps=1, orders=list(RDP_ORDERS)
        )
        curve = _curves[key] = tuple(float(v) for v in values)
    return curve


def _curve_key(sigma: float, q: float) -> str:
    return f"{float(sigma)!r}|{float(q)!r}"


def load_curves(state_dir: Path) -> int:
    """Read `CURVES_FILE` in ``state_dir`` into this process's curves; how many were new.

    A missing, unreadable or foreign file (other orders) is ignored: it only costs time. A
    curve must be finite and non-negative at every order, else it is ignored too.
    """
    try:
        raw = json.loads((state_dir / CURVES_FILE).read_text("utf-8"))
        if tuple(float(a) for a in raw["orders"]) != RDP_ORDERS:
            return 0
        stored = raw["curves"]
        if not isinstance(stored, dict):
            return 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    new = 0
    for key, values in stored.items():
        try:
            sigma, q = (float(x) for x in str(key).split("|"))
            curve = tuple(float(v) for v in values)
        except (TypeError, ValueError):
            continue
        if len(curve) != len(RDP_ORDERS) or not all(np.isfinite(curve)) or min(curve) < 0:
            continue
        if (sigma, q) not in _curves:
            _curves[(sigma, q)] = curve
            new += 1
    return new


def save_curves(state_dir: Path, history: Sequence[Segment]) -> None:
    """Keep the curves of ``history``'s mechanisms in `CURVES_FILE` (rewritten when one is new)."""
    keys = {(float(s), float(q)) for s, q, n in history if n > 0}
    wanted = {_curve_key(*k): rdp_curve(*k) for k in keys}
    wanted = {k: v for k, v in wanted.items() if all(np.isfinite(v))}
    path = state_dir / CURVES_FILE
    try:
        stored = set(json.loads(path.read_text("utf-8"))["curves"])
    except (OSError, ValueError, KeyError, TypeError):
        stored = set()
    if not wanted or set(wanted) <= stored:
        return
    data = {"orders": list(RDP_ORDERS), "curves": dict(sorted(wanted.items()))}
    write_text_atomic(path, json.dumps(data) + "\n", mode=0o600)


def calibrate_noise(
    budget: PrivacyBudget,
    plan: DPPlan,
    spent: tuple[Segment, ...] = (),
    *,
    rounds: int | None = None,
    evaluations: int | None = None,
) -> float:
    """The smallest DP-SGD noise multiplier (to 1 % of epsilon) that keeps the plan in budget.

    What the budget must pay for: ``spent`` (the accountant's history so far, e.g. the count
    release) plus `planned_history` (``rounds`` training rounds and ``evaluations`` histogram
    releases still to come; None: the plan's whole count). The result never overshoots
    ``budget.epsilon`` under the budget's accountant.

    Raises:
        PrivacyConfigError: delta is not below 1/n, or no finite noise reaches the budget (the
            releases alone may already exceed it).
    """
    budget.check_delta(plan.n_students)
    return _calibrate(budget, plan, tuple(spent), rounds, evaluations)


@functools.lru_cache(maxsize=64)  # deterministic, and a PRV calibration takes seconds
def _calibrate(
    budget: PrivacyBudget,
    plan: DPPlan,
    spent: tuple[Segment, ...],
    rounds: int | None,
    evaluations: int | None,
) -> float:
    def epsilon(sigma: float) -> float:
        history = [*spent, *planned_history(plan, sigma, rounds=rounds, evaluations=evaluations)]
        return compute_epsilon(budget.accountant, history, budget.delta)

    # What the run releases besides training, alone: training at any finite noise adds to it.
    # (Asking instead for the epsilon at noise 1e6 cost 4 s of Opacus' series at q = 0.5.)
    releases = [*spent, *planned_history(plan, 0.0, rounds=0, evaluations=evaluations)]
    high = None
    if compute_epsilon(budget.accountant, releases, budget.delta) < budget.epsilon:
        high = _search_noise(epsilon, budget.epsilon)
    if high is None:
        raise PrivacyConfigError(
            f"epsilon {budget.epsilon:g} cannot pay for what the run releases besides training "
            f"(the student count and {plan.planned_evaluations} evaluation histogram(s) at noise "
            f"std {plan.histogram_noise_std:g}); raise epsilon or plan fewer evaluations"
        )
    logger.info(
        "calibrated noise multiplier %.4f for epsilon %g, delta %g, %d steps at q=%.4g and "
        "%d evaluation(s) (%s)",
        high,
        budget.epsilon,
        budget.delta,
        plan.total_steps,
        plan.sample_rate,
        plan.planned_evaluations,
        budget.accountant,
    )
    return float(high)


#: Where the search for a noise multiplier gives up: a release this noisy carries nothing.
_MAX_NOISE_MULTIPLIER = 2.0**20


def _search_noise(epsilon: Callable[[float], float], target: float) -> float | None:
    """The smallest noise multiplier whose ``epsilon`` is at most ``target``, to 1 % of it.

    None when even `_MAX_NOISE_MULTIPLIER` is over ``target``.

    ``epsilon`` decreases with the noise; each value costs a tenth of a second or more under
    RDP (Opacus' fractional orders), so the search is a bracketed regula falsi in log-log space
    (with the Illinois step: the end kept twice is halved), where epsilon is nearly a line:
    about 5 values where a bisection took 12-16. Every step keeps ``low`` (over ``target``,
    never returned) and ``high`` (within it, returned), and stops as the bisection did: when
    ``high`` reaches 99 % of ``target``, or the bracket is 0.2 % of ``high`` wide.
    """
    low, high = _MIN_NOISE_MULTIPLIER, 1.0
    while epsilon(high) > target:
        if high >= _MAX_NOISE_MULTIPLIER:
            return None
        low, high = high, 2 * high
    if epsilon(low) <= target:
        return low  # the floor already fits: more noise would only waste utility

    def gap(sigma: float) -> float:  # > 0: over the target
        return math.log(epsilon(sigma)) - math.log(target)

    a, b = math.log(low), math.log(high)
    ga, gb = gap(low), gap(high)
    kept = 0  # which end the last step kept: -1 low, +1 high
    while high - low > 0.002 * high and epsilon(high) < 0.99 * target:
        c = b - gb * (b - a) / (gb - ga) if math.isfinite(ga) else (a + b) / 2
        if not a < c < b:
            c = (a + b) / 2
        gc = gap(math.exp(c))
        if gc <= 0:
            b, gb, high = c, gc, math.exp(c)
            ga = ga / 2 if kept == -1 else ga
            kept = -1
        else:
            a, ga, low = c, gc, math.exp(c)
            gb = gb / 2 if kept == 1 else gb
            kept = 1
    return high


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
                state = AccountantState.model_validate(loads_json(raw))
            except (ValueError, ValidationError) as exc:
                reason = _first_problem(exc)
            else:
                if state.accountant == "rdp" and state.history:
                    load_curves(self.state_dir)
                return state
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
        if state.accountant == "rdp":
            save_curves(self.state_dir, state.history)
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
    """The stored state, calibrated for ``budget`` and ``plan`` (recalibrated if they changed).

    The noise multiplier pays for what is spent (the history, e.g. the count release) plus the
    plan's rounds and evaluations not yet done.
    """
    state = check_state(state, budget, institution)
    unchanged = state.plan == plan and state.epsilon_budget == budget.epsilon
    if unchanged and state.history and state.noise_multiplier > 0:
        return state
    if plan.planned_rounds <= state.rounds_done and state.noise_multiplier > 0:
        # No planned round is left: keep the multiplier; the round check refuses past the budget.
        return state.model_copy(update={"plan": plan, "epsilon_budget": budget.epsilon})
    try:
        sigma = calibrate_noise(
            budget,
            plan,
            tuple((float(s), float(q), int(n)) for s, q, n in state.history),
            rounds=plan.planned_rounds - state.rounds_done,
            evaluations=plan.planned_evaluations - state.evaluations_done,
        )
    except PrivacyConfigError:
        if not state.history:
            raise
        # Nothing fits what is left: keep the old multiplier; the round check refuses.
        sigma = state.noise_multiplier
    if state.plan is not None and state.noise_multiplier and sigma != state.noise_multiplier:
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


def check_state(
    state: AccountantState | None, budget: PrivacyBudget, institution: str
) -> AccountantState:
    """``state`` (a fresh one if None) after checking it belongs to this institution and budget.

    Raises:
        AccountantStateError: another institution's state, or delta/accountant changed after
            spending began.
    """
    if state is None:
        return AccountantState(
            institution=institution,
            accountant=budget.accountant,
            delta=budget.delta,
            epsilon_budget=budget.epsilon,
        )
    if state.institution != institution:
        raise AccountantStateError(
            f"this state folder belongs to {state.institution!r}, not {institution!r}"
        )
    if state.history and (state.accountant != budget.accountant or state.delta != budget.delta):
        raise AccountantStateError(
            f"{institution} started spending with delta {state.delta:g} ({state.accountant}); "
            f"delta and accountant are fixed once spending began (asked: {budget.delta:g}, "
            f"{budget.accountant}); use a new state folder for a new budget"
        )
    if not state.history:
        state = state.model_copy(update={"accountant": budget.accountant, "delta": budget.delta})
    return state
