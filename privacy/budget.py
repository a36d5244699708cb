"""An institution's privacy budget and the noise calibrated up front to stay within it.

Neighbouring relation (`NEIGHBOURING`): two datasets of one institution are neighbours when one
holds one more *student* than the other (all of that student's records, every term). The unit of
privacy is therefore the student: DP-SGD samples students, not records, and each sampled student
gives one clipped gradient per step (`privacy.sampling`); delta must stay below 1/n_students.

Everything that leaves a DP node besides the DP-SGD update is a Gaussian mechanism of L2
sensitivity 1 (adding or removing one student changes it by at most 1 in L2), accounted in the
same accountant history as a segment ``(std, 1.0, 1)`` and signed as its own ledger entry
(`privacy.releases`):

- the **count** of training students, released once per run with noise of standard deviation
  `DEFAULT_COUNT_NOISE_STD`; its rounded value ``n_public`` (at least 1) is all the node's plan,
  its ledger and the server's aggregation weight ever see (`DPPlan.for_training`);
- the **histograms** of predicted risk that answer a federated evaluation, each count noised
  with standard deviation `histogram_noise_std` of the run's planned evaluations:
  `DEFAULT_HISTOGRAM_NOISE_STD` for one, ``sqrt(k)`` times it for each of ``k``, so that all
  of a run's evaluations together always cost what one at `DEFAULT_HISTOGRAM_NOISE_STD` costs.

Each institution chooses its own ``(epsilon, delta)`` for a whole federation run. The DP-SGD
noise multiplier is calibrated once for everything the run is planned to release: the count,
``planned_rounds`` training rounds (rounds x local steps) and ``planned_evaluations`` histogram
releases (`privacy.accountant_store.calibrate_noise`), so the accountant, which composes across
rounds and restarts, ends the planned run at or below ``epsilon``. A calibrated multiplier above
the node's ceiling (`PrivacyBudget.max_noise_multiplier`, default
`DEFAULT_MAX_NOISE_MULTIPLIER`) means the budget left cannot pay for a useful round: the node
declines it instead of sending noise.

A budget is ``PrivacyBudget | None`` (None: train without DP) from the CLI and TOML to the node;
its defaults are written here only. `node_budget` is the policy a node applies to the server's
proposal. Importing this module imports neither torch nor Opacus (the CLI starts without them).
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared_models.errors import PrivacyConfigError

logger = logging.getLogger(__name__)

Mechanism = Literal["rdp", "prv"]
DPMode = Literal["required", "off"]

#: The budget of an institution that requires DP but set none of its own (and the server's
#: proposal when asked for DP without an epsilon): the seed papers' and the demo's usual one.
DEFAULT_EPSILON = 8.0
DEFAULT_DELTA = 1e-5  # must stay below 1 / n_students of every institution
DEFAULT_MAX_GRAD_NORM = 1.0
DEFAULT_ACCOUNTANT: Mechanism = "rdp"

#: Opacus' PRV accountant returns the upper end of an interval this wide (absolute epsilon).
PRV_EPS_ERROR = 0.01

#: The neighbouring relation every DP ledger entry claims and the audit recomputes under.
NEIGHBOURING = "add-remove-one-student"
#: What a ledger entry without the field was accounted under (before students were the unit).
LEGACY_NEIGHBOURING = "add-remove-one-record"

#: Standard deviation of the Gaussian noise on the released student count (sensitivity 1). The
#: count only sets the sampling rate, the step count and the aggregation weight, so +-20 on a
#: few hundred students costs little utility; at epsilon 1 it takes under a fifth of the budget.
DEFAULT_COUNT_NOISE_STD = 20.0
#: Standard deviation of the Gaussian noise on each count of the risk histograms when a run
#: plans one federated evaluation (the server's default under DP: after the last round). Each
#: student sits in one bin of one histogram (sensitivity 1). The evaluations' share of the
#: budget is fixed, whatever their number: ``k`` planned evaluations get ``sqrt(k)`` times this
#: std each (`histogram_noise_std`), and k Gaussian releases at ``std * sqrt(k)`` have the RDP
#: (and zCDP) cost of one at ``std``: ``alpha / (2 std^2)`` at every order alpha. 9 is 20 (the
#: earlier per-evaluation std, paid for five evaluations a run) over sqrt(5) = 8.94, rounded up:
#: no more epsilon than those five, one evaluation more than twice as precise. A node holds
#: 30-60 test students: at std 20 per count its histograms, and the ROC-AUC from them, were
#: noise (0.38 for a model at 0.82).
DEFAULT_HISTOGRAM_NOISE_STD = 9.0
#: The largest DP-SGD noise multiplier a node accepts: above it an update is mostly noise, so
#: the node declines the round. The demo's institutions (113-300 training students, batch 32,
#: 3 epochs x 5 rounds, one evaluation) calibrate 1.1-1.5 at epsilon 8 and 5.9-9.3 at epsilon 1.
DEFAULT_MAX_NOISE_MULTIPLIER = 15.0
#: Below this multiplier DP-SGD protects little, and PRV's calibration gets slow.
_MIN_NOISE_MULTIPLIER = 0.3


__all__ = [  # PrivacyConfigError lives in shared_models.errors so the wire protocol can raise it
    "DEFAULT_ACCOUNTANT",
    "DEFAULT_COUNT_NOISE_STD",
    "DEFAULT_DELTA",
    "DEFAULT_EPSILON",
    "DEFAULT_HISTOGRAM_NOISE_STD",
    "DEFAULT_MAX_GRAD_NORM",
    "DEFAULT_MAX_NOISE_MULTIPLIER",
    "NEIGHBOURING",
    "DPPlan",
    "PrivacyBudget",
    "PrivacyConfigError",
    "histogram_noise_std",
    "node_budget",
]


class PrivacyBudget(BaseModel):
    """What one institution allows a federation run to spend (validated at the config edge)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # a typo in a TOML key fails loudly

    epsilon: Annotated[float, Field(gt=0)] = DEFAULT_EPSILON  # per institution, whole run
    delta: Annotated[float, Field(gt=0, lt=1)] = DEFAULT_DELTA  # must stay below 1 / n_students
    max_grad_norm: Annotated[float, Field(gt=0)] = DEFAULT_MAX_GRAD_NORM  # per-student clip
    accountant: Mechanism = DEFAULT_ACCOUNTANT  # rdp: conservative, closed form; prv: tighter
    #: A round calibrated above this noise multiplier is declined (set by the node only).
    max_noise_multiplier: Annotated[float, Field(gt=0)] = DEFAULT_MAX_NOISE_MULTIPLIER

    def check_delta(self, n_students: int) -> None:
        """Refuse a delta that is not below ``1 / n_students``.

        With ``delta >= 1/n`` a mechanism that publishes one random student's record outright is
        (0, delta)-DP: such a delta protects nobody.

        Raises:
            PrivacyConfigError: ``delta >= 1 / n_students`` or there are no students.
        """
        if n_students < 1:
            raise PrivacyConfigError("no training students: nothing to train with DP")
        if self.delta * n_students >= 1:
            raise PrivacyConfigError(
                f"delta {self.delta:g} is not below 1/n = {1 / n_students:.3g} for "
                f"{n_students} students; choose delta < {1 / n_students:.3g} (1/n^1.1 or "
                "1e-5 are usual)"
            )


def histogram_noise_std(planned_evaluations: int) -> float:
    """The std of each histogram count when a run plans ``planned_evaluations`` evaluations.

    ``DEFAULT_HISTOGRAM_NOISE_STD * sqrt(k)``: whatever ``k``, the run's evaluations together
    cost what one at `DEFAULT_HISTOGRAM_NOISE_STD` costs (none planned: the one-evaluation std).
    """
    return DEFAULT_HISTOGRAM_NOISE_STD * math.sqrt(max(1, planned_evaluations))


class DPPlan(BaseModel):
    """Everything a federation run is planned to release at one institution.

    Noise is calibrated once for ``planned_rounds * steps_per_round`` DP-SGD steps at
    ``sample_rate`` plus ``planned_evaluations`` histogram releases
    (`privacy.accountant_store.calibrate_noise`).
    ``n_students`` is the *released* (noised) count under DP, never the exact one.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_students: Annotated[int, Field(ge=1)]  # students (n_public under DP); delta < 1 / n
    sample_rate: Annotated[float, Field(gt=0, le=1)]  # Poisson rate per student: 1 / batches
    steps_per_round: Annotated[int, Field(ge=1)]  # optimizer steps per round (epochs x batches)
    planned_rounds: Annotated[int, Field(ge=1)]  # rounds this institution may take part in
    planned_evaluations: Annotated[int, Field(ge=0)] = 0  # histogram releases planned
    #: Not given (or None): `histogram_noise_std` of ``planned_evaluations``; a stored plan
    #: keeps the std it was made with.
    histogram_noise_std: Annotated[float, Field(gt=0)] = DEFAULT_HISTOGRAM_NOISE_STD
    n_noised: bool = False  # n_students is a released (noised) count, as on a node

    @model_validator(mode="before")
    @classmethod
    def _evaluation_noise(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("histogram_noise_std") is None:
            evaluations = data.get("planned_evaluations", 0)
            if isinstance(evaluations, int) and not isinstance(evaluations, bool):
                data = {**data, "histogram_noise_std": histogram_noise_std(evaluations)}
        return data

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.planned_rounds

    @property
    def expected_batch_size(self) -> int:
        """Students per step on average, from public values only (Opacus scales by it)."""
        return max(1, round(self.sample_rate * self.n_students))

    @classmethod
    def for_training(
        cls,
        n_students: int,
        batch_size: int,
        local_epochs: int,
        planned_rounds: int,
        *,
        planned_evaluations: int = 0,
        histogram_noise_std: float | None = None,
        n_noised: bool = False,
    ) -> DPPlan:
        """The plan for ``n_students`` (under DP: the released ``n_public``) and a batch size.

        Opacus' convention: ``batches = ceil(n / batch_size)`` steps per epoch, each student
        sampled with probability ``1 / batches`` (about ``batch_size / n``) at every step. Built
        from the released count, neither the rate nor the step count depends on the exact n.
        """
        if n_students < 1 or batch_size < 1:
            raise PrivacyConfigError("n_students and batch_size must be at least 1")
        batches = math.ceil(n_students / batch_size)
        return cls(
            n_students=n_students,
            sample_rate=1.0 / batches,
            steps_per_round=local_epochs * batches,
            planned_rounds=planned_rounds,
            planned_evaluations=planned_evaluations,
            histogram_noise_std=histogram_noise_std,
            n_noised=n_noised,
        )


Segment = tuple[float, float, int]  # (noise multiplier, sample rate, steps), as in Opacus


def planned_history(
    plan: DPPlan, sigma: float, *, rounds: int | None = None, evaluations: int | None = None
) -> list[Segment]:
    """The segments ``rounds`` training rounds at ``sigma`` and ``evaluations`` releases add.

    None takes the plan's whole count of each.
    """
    rounds = plan.planned_rounds if rounds is None else max(0, rounds)
    evaluations = plan.planned_evaluations if evaluations is None else max(0, evaluations)
    out: list[Segment] = []
    if rounds:
        out.append((float(sigma), plan.sample_rate, rounds * plan.steps_per_round))
    if evaluations:
        out.append((plan.histogram_noise_std, 1.0, evaluations))
    return out


def node_budget(
    mode: DPMode | None,
    own_epsilon: float | None,
    own_delta: float | None,
    *,
    proposed_epsilon: float | None,
    proposed_delta: float | None = None,
    max_grad_norm: float | None = None,
    accountant: Mechanism | None = None,
    max_noise_multiplier: float | None = None,
) -> PrivacyBudget | None:
    """The budget a node trains a round under, or None to train without DP.

    The institution's own policy wins over the server's proposal: a node that requires DP
    (``mode="required"``) trains with DP-SGD even when the server proposes none, under its own
    epsilon/delta when set, else `DEFAULT_EPSILON`/`DEFAULT_DELTA`; a server proposing a smaller
    epsilon or delta gets it, a larger one not. Without a mode of its own (a simulation), or
    with ``"off"``, the server's proposal decides, DP or not; the node's epsilon/delta still
    replace the proposed ones.

    Args:
        mode: the node's DP mode; None leaves the decision to the server.
        own_epsilon: the institution's epsilon for the run, if it set one.
        own_delta: the institution's delta for the run, if it set one.
        proposed_epsilon: the server's epsilon; None proposes no DP.
        proposed_delta: the server's delta (None: `DEFAULT_DELTA`).
        max_grad_norm: the server's clipping bound (None: `DEFAULT_MAX_GRAD_NORM`).
        accountant: the server's accountant (None: `DEFAULT_ACCOUNTANT`).
        max_noise_multiplier: the node's own ceiling on the noise multiplier (None:
            `DEFAULT_MAX_NOISE_MULTIPLIER`); the server cannot set it.

    Raises:
        PrivacyConfigError: the resulting budget is not valid (the message says which value).
    """
    server_delta = DEFAULT_DELTA if proposed_delta is None else proposed_delta
    if mode == "required":
        # The server may ask for more privacy than the institution's budget, never less.
        cap = own_epsilon or DEFAULT_EPSILON
        epsilon = min(cap, proposed_epsilon or cap)
        delta = own_delta or min(server_delta, DEFAULT_DELTA)
    elif proposed_epsilon:
        epsilon = own_epsilon or proposed_epsilon
        delta = own_delta or server_delta
    else:
        return None
    try:
        return PrivacyBudget(
            epsilon=epsilon,
            delta=delta,
            max_grad_norm=DEFAULT_MAX_GRAD_NORM if max_grad_norm is None else max_grad_norm,
            accountant=DEFAULT_ACCOUNTANT if accountant is None else accountant,
            max_noise_multiplier=(
                DEFAULT_MAX_NOISE_MULTIPLIER
                if max_noise_multiplier is None
                else max_noise_multiplier
            ),
        )
    except ValidationError as exc:
        raise PrivacyConfigError(f"this node's DP budget is not valid: {exc}") from None
