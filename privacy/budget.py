"""An institution's privacy budget and the noise calibrated up front to stay within it.

The unit of privacy is one student's record at one institution. Each institution chooses its own
``(epsilon, delta)`` for a whole federation run; the Gaussian noise multiplier is calibrated once
for every step the run is planned to take (rounds x local steps), so that the accountant, which
composes across rounds, ends the planned run at or below ``epsilon``.

A budget is ``PrivacyBudget | None`` (None: train without DP) from the CLI and TOML to the node;
its defaults are written here only. `node_budget` is the policy a node applies to the server's
proposal. Importing this module imports neither torch nor Opacus (the CLI starts without them).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


__all__ = [  # PrivacyConfigError lives in shared_models.errors so the wire protocol can raise it
    "DEFAULT_ACCOUNTANT",
    "DEFAULT_DELTA",
    "DEFAULT_EPSILON",
    "DEFAULT_MAX_GRAD_NORM",
    "DPPlan",
    "PrivacyBudget",
    "PrivacyConfigError",
    "calibrate_noise",
    "node_budget",
]


class PrivacyBudget(BaseModel):
    """What one institution allows a federation run to spend (validated at the config edge)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # a typo in a TOML key fails loudly

    epsilon: Annotated[float, Field(gt=0)] = DEFAULT_EPSILON  # per institution, whole run
    delta: Annotated[float, Field(gt=0, lt=1)] = DEFAULT_DELTA  # must stay below 1 / n_students
    max_grad_norm: Annotated[float, Field(gt=0)] = DEFAULT_MAX_GRAD_NORM  # per-student clip
    accountant: Mechanism = DEFAULT_ACCOUNTANT  # rdp: conservative, closed form; prv: tighter

    def check_delta(self, n_students: int) -> None:
        """Refuse a delta that is not below ``1 / n_students``.

        With ``delta >= 1/n`` a mechanism that publishes one random student's record outright is
        (0, delta)-DP: such a delta protects nobody.

        Raises:
            PrivacyConfigError: ``delta >= 1 / n_students`` or there are no students.
        """
        if n_students < 1:
            raise PrivacyConfigError("no training records: nothing to train with DP")
        if self.delta * n_students >= 1:
            raise PrivacyConfigError(
                f"delta {self.delta:g} is not below 1/n = {1 / n_students:.3g} for "
                f"{n_students} students; choose delta < {1 / n_students:.3g} (1/n^1.1 or "
                "1e-5 are usual)"
            )


class DPPlan(BaseModel):
    """How much DP-SGD a federation run is planned to take at one institution.

    Noise is calibrated once for ``planned_rounds * steps_per_round`` steps at ``sample_rate``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_students: Annotated[int, Field(ge=1)]  # training records; delta must stay below 1 / n
    sample_rate: Annotated[float, Field(gt=0, le=1)]  # Poisson rate: 1 / batches per epoch
    steps_per_round: Annotated[int, Field(ge=1)]  # optimizer steps per round (epochs x batches)
    planned_rounds: Annotated[int, Field(ge=1)]  # rounds this institution may take part in

    @property
    def total_steps(self) -> int:
        return self.steps_per_round * self.planned_rounds

    @classmethod
    def for_training(
        cls, n_students: int, batch_size: int, local_epochs: int, planned_rounds: int
    ) -> DPPlan:
        """The plan Opacus' ``make_private`` implies for a loader of ``batch_size`` batches.

        Opacus samples each student with probability ``1 / len(loader)`` and takes
        ``len(loader)`` steps per epoch, where ``len(loader) = ceil(n / batch_size)``.
        """
        if n_students < 1 or batch_size < 1:
            raise PrivacyConfigError("n_students and batch_size must be at least 1")
        batches = math.ceil(n_students / batch_size)
        return cls(
            n_students=n_students,
            sample_rate=1.0 / batches,
            steps_per_round=local_epochs * batches,
            planned_rounds=planned_rounds,
        )


@functools.lru_cache(maxsize=64)  # deterministic, and a PRV calibration takes seconds
def calibrate_noise(budget: PrivacyBudget, plan: DPPlan) -> float:
    """The smallest noise multiplier (to 1 % of epsilon) that keeps the whole plan in budget.

    Uses Opacus' ``get_noise_multiplier`` with the budget's accountant over
    ``plan.total_steps`` steps; the result never overshoots ``budget.epsilon``.

    Raises:
        PrivacyConfigError: delta is not below 1/n, or no finite noise reaches the budget.
    """
    from opacus.accountants.utils import get_noise_multiplier  # torch: only when training

    budget.check_delta(plan.n_students)
    extra = {"eps_error": PRV_EPS_ERROR} if budget.accountant == "prv" else {}
    with warnings.catch_warnings():
        # RDP's "optimal order is the largest alpha" only says the bound could be tighter.
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha", UserWarning)
        try:
            sigma = get_noise_multiplier(
                target_epsilon=budget.epsilon,
                target_delta=budget.delta,
                sample_rate=plan.sample_rate,
                steps=plan.total_steps,
                accountant=budget.accountant,
                epsilon_tolerance=0.01 * budget.epsilon,
                **extra,
            )
        except ValueError as exc:  # "The privacy budget is too low."
            raise PrivacyConfigError(
                f"epsilon {budget.epsilon:g} cannot be reached for {plan.total_steps} steps at "
                f"sample rate {plan.sample_rate:.3g} ({exc}); plan fewer rounds or steps"
            ) from None
    logger.info(
        "calibrated noise multiplier %.4f for epsilon %g, delta %g, %d steps at q=%.4g (%s)",
        sigma,
        budget.epsilon,
        budget.delta,
        plan.total_steps,
        plan.sample_rate,
        budget.accountant,
    )
    return float(sigma)


def node_budget(
    mode: DPMode | None,
    own_epsilon: float | None,
    own_delta: float | None,
    *,
    proposed_epsilon: float | None,
    proposed_delta: float | None = None,
    max_grad_norm: float | None = None,
    accountant: Mechanism | None = None,
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
        )
    except ValidationError as exc:
        raise PrivacyConfigError(f"this node's DP budget is not valid: {exc}") from None
