"""The auditor's second check: does every claimed epsilon hold up?

`recompute_budget` recomputes every claimed epsilon from the recorded (noise multiplier, sample
rate, steps, delta) with Google's ``dp-accounting``, an implementation independent of the Opacus
accountants that produced the claims: its RDP accountant for ``rdp`` claims, its
privacy-loss-distribution (PLD) accountant for ``prv`` claims (PLD and PRV are both numerically
tight accountants of the same subsampled Gaussian mechanism).

Every entry is composed into its institution's chain: DP-SGD rounds (``kind`` ``train``) as
Poisson-subsampled Gaussians, and the node's other releases (``count``, ``histogram``: Gaussian
mechanisms of sensitivity 1, `privacy.releases`) as the same event with sample rate 1.

Besides the claims it checks what the accounting assumes of each entry: the neighbouring
relation it claims is `privacy.budget.NEIGHBOURING` (add or remove one student; an entry
written before entries named one was accounted per record and is reported as record-level,
never as student-level; any other relation fails), no epsilon above the institution's budget
(no tolerance: the tolerance is for claimed vs recomputed), delta below 1/n, a sample rate that
a batch size gives for n students (Opacus' Poisson rate is 1 / ceil(n / batch size)), a release
recorded as one unsubsampled step of sensitivity 1, and each entry counted once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp

from privacy.budget import LEGACY_NEIGHBOURING, NEIGHBOURING, PRV_EPS_ERROR
from privacy.ledger.entries import LedgerEntry

logger = logging.getLogger(__name__)

#: Claimed and recomputed epsilon must agree to 1 % (PRV claims: plus Opacus' error window).
#: It is not a tolerance on the budget: a claim above the budget fails however small the excess.
TOLERANCE = 0.01
#: Relative float error allowed when reading a batch count back from a sample rate.
_RATE_REL_TOL = 1e-9
#: PLD grid for PRV claims; 1e-3 agrees with 1e-4 to 0.01 % here at a tenth of the cost.
PLD_DISCRETIZATION = 1e-3


@dataclass(frozen=True)
class BudgetRow:
    """One ledger entry: what the institution claimed and what the auditor recomputed."""

    institution: str
    run_id: str
    round: int
    seq: int
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float | None
    claimed: float | None  # None: DP was off (unbounded)
    recomputed: float  # math.inf once DP was off
    budget: float | None
    # ok | overstated (conservative) | UNDERSTATED | OVER BUDGET | NOT PRIVATE | DELTA NOT
    # BELOW 1/N | SAMPLE RATE INCONSISTENT | RELEASE NOT AS ACCOUNTED | UNKNOWN NEIGHBOURING
    # RELATION | DUPLICATE (a round already counted), or, for an entry without its DP
    # parameters or with ones no accountant can evaluate (and every later entry of its chain):
    # INCOMPLETE | UNVERIFIABLE; ", record-level (legacy entry)" follows an old entry's status
    status: str
    kind: str = "train"  # train | count | histogram
    neighbouring: str = NEIGHBOURING  # LEGACY_NEIGHBOURING for an entry that names none

    @property
    def failed(self) -> bool:
        return self.status.split(",")[0].isupper()  # the legacy note is not a failure


@dataclass(frozen=True)
class InstitutionSummary:
    institution: str
    rounds: int
    budget: float | None
    claimed: float | None
    recomputed: float
    remaining: float | None  # budget minus the larger of claimed and recomputed
    ok: bool
    #: The weakest relation of the chain: record-level if any entry was accounted per record.
    neighbouring: str = NEIGHBOURING


@dataclass
class BudgetReport:
    rows: list[BudgetRow]
    summaries: list[InstitutionSummary]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.summaries)


def recompute_budget(entries: Sequence[LedgerEntry]) -> BudgetReport:
    """Recompute every entry's cumulative epsilon with dp-accounting; compare with its claim."""
    chains: dict[str, list[LedgerEntry]] = {}
    for entry in entries:
        chains.setdefault(entry.institution, []).append(entry)
    rows: list[BudgetRow] = []
    summaries = []
    for name in sorted(chains):
        chain = sorted(chains[name], key=lambda e: e.seq)
        chain_rows = list(_recompute_chain(chain))
        rows.extend(chain_rows)
        end = chain_rows[-1]
        used = max(end.recomputed, end.claimed if end.claimed is not None else math.inf)
        summaries.append(
            InstitutionSummary(
                institution=name,
                rounds=len(chain_rows),
                budget=end.budget,
                claimed=end.claimed,
                recomputed=end.recomputed,
                remaining=None if end.budget is None else end.budget - used,
                ok=not any(r.failed for r in chain_rows),
                neighbouring=(
                    LEGACY_NEIGHBOURING
                    if any(r.neighbouring == LEGACY_NEIGHBOURING for r in chain_rows)
                    else NEIGHBOURING
                ),
            )
        )
    return BudgetReport(rows, summaries)


def _recompute_chain(chain: Sequence[LedgerEntry]) -> Iterator[BudgetRow]:
    events: list[dp_accounting.DpEvent] = []
    accountant: Any = None
    mechanism = None
    voided = False
    unverifiable = False  # once one round cannot be recomputed, no later total can be
    counted: set[int] = set()
    for entry in chain:
        if entry.seq in counted:
            # `edufl audit verify` refuses such a ledger; never count a round twice.
            yield _row(entry, math.inf, "DUPLICATE")
            continue
        counted.add(entry.seq)
        voided = voided or not entry.private
        if voided:
            yield _row(entry, math.inf, "NOT PRIVATE")
            continue
        if entry.delta is None or entry.epsilon_after is None or entry.epsilon_budget is None:
            # `edufl audit verify` names such an entry; the claim cannot be checked.
            unverifiable = True
            yield _row(entry, math.inf, "INCOMPLETE")
            continue
        if unverifiable:
            yield _row(entry, math.inf, "UNVERIFIABLE")
            continue
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(
                entry.sample_rate, dp_accounting.GaussianDpEvent(entry.noise_multiplier)
            ),
            entry.steps,
        )
        events.append(event)
        if entry.accountant != mechanism:  # a new accountant replays the chain so far
            mechanism, accountant = entry.accountant, _accountant(entry.accountant)
            to_compose = events
        else:
            to_compose = [event]
        try:
            with _quiet_absl():
                for e in to_compose:
                    accountant.compose(e)
                recomputed = float(accountant.get_epsilon(entry.delta))
        except (ValueError, ArithmeticError, MemoryError) as exc:
            # Parameters no accountant can evaluate (noise 1e300, a rate of 1e-320, ...).
            logger.warning(
                "%s seq %d: cannot recompute epsilon (%s)", entry.institution, entry.seq, exc
            )
            recomputed = math.nan
        if math.isnan(recomputed):
            unverifiable = True
            yield _row(entry, math.inf, "UNVERIFIABLE")
            continue
        yield _row(entry, recomputed, _assumption_problem(entry) or _status(entry, recomputed))


def _assumption_problem(entry: LedgerEntry) -> str | None:
    """A failed status when the entry breaks what its accounting assumes; None if it holds."""
    assert entry.delta is not None
    if entry.neighbouring not in (None, NEIGHBOURING):
        return "UNKNOWN NEIGHBOURING RELATION"
    if entry.delta * entry.n_students >= 1:
        return "DELTA NOT BELOW 1/N"
    if entry.kind != "train":
        # A release is one Gaussian of sensitivity 1 on everyone's data: a smaller rate, more
        # steps or another sensitivity would misstate what the recorded noise protects.
        if (entry.sample_rate, entry.steps, entry.max_grad_norm) != (1.0, 1, 1.0):
            return "RELEASE NOT AS ACCOUNTED"
        return None
    if not sample_rate_fits(entry.sample_rate, entry.n_students):
        return "SAMPLE RATE INCONSISTENT"
    return None


def sample_rate_fits(sample_rate: float, n_students: int) -> bool:
    """Whether some batch size b gives Opacus' Poisson rate ``1 / ceil(n / b)`` for n students.

    A rate that no batch size gives means the recorded (q, n) are not what trained: e.g. a
    smaller q understates epsilon.
    """
    batches = round(1.0 / sample_rate)
    if batches < 1 or batches > n_students:
        return False
    if not math.isclose(1.0 / batches, sample_rate, rel_tol=_RATE_REL_TOL):
        return False
    # The smallest batch size with at most `batches` batches; larger ones give fewer.
    batch_size = math.ceil(n_students / batches)
    return math.ceil(n_students / batch_size) == batches


def _accountant(mechanism: str) -> Any:
    if mechanism == "prv":
        return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    return rdp.RdpAccountant()


def _status(entry: LedgerEntry, recomputed: float) -> str:
    claimed = entry.epsilon_after
    assert claimed is not None and entry.epsilon_budget is not None
    if claimed > entry.epsilon_budget:
        return "OVER BUDGET"
    if claimed < recomputed * (1 - TOLERANCE):
        # An understated claim may also hide an epsilon above the budget.
        return "OVER BUDGET" if recomputed > entry.epsilon_budget else "UNDERSTATED"
    # Opacus' PRV reports the upper end of its error window: compare with that end.
    expected = recomputed + (PRV_EPS_ERROR if entry.accountant == "prv" else 0.0)
    if claimed > expected * (1 + TOLERANCE):
        return "overstated (conservative)"
    return "ok"


def _row(entry: LedgerEntry, recomputed: float, status: str) -> BudgetRow:
    legacy = entry.neighbouring is None
    if legacy:
        # Accounted per record: a student with k records got about k times this epsilon.
        status += ", record-level (legacy entry)"
    return BudgetRow(
        institution=entry.institution,
        run_id=entry.run_id,
        round=entry.round,
        seq=entry.seq,
        accountant=entry.accountant,
        noise_multiplier=entry.noise_multiplier,
        sample_rate=entry.sample_rate,
        steps=entry.steps,
        delta=entry.delta,
        claimed=entry.epsilon_after,
        recomputed=recomputed,
        budget=entry.epsilon_budget,
        status=status,
        kind=entry.kind,
        neighbouring=LEGACY_NEIGHBOURING if legacy else str(entry.neighbouring),
    )


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """dp-accounting logs each RDP order it drops as unstable; the bound stays valid."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)
