"""An institution's privacy budget and the noise calibrated up front to stay within it.

The unit of privacy is one student's record at one institution. Each institution chooses its own
``(epsilon, delta)`` for a whole federation run; the Gaussian noise multiplier is calibrated once
for every step the run is planned to take (rounds x local steps), so that the accountant, which
composes across rounds, ends the planned run at or below ``epsilon``.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from typing import Annotated, Literal

from opacus.accountants.utils import get_noise_multiplier
from pydantic import BaseModel, ConfigDict, Field

from shared_models.errors import EduflError

logger = logging.getLogger(__name__)

Mechanism = Literal["rdp", "prv"]

#: Opacus' PRV accountant returns the upper end of an interval this wide (absolute epsilon).
PRV_EPS_ERROR = 0.01


class PrivacyConfigError(EduflError, ValueError):
    """A privacy budget that cannot protect this institution's students as configured."""


class PrivacyBudget(BaseModel):
    """What one institution allows a federation run to spend (validated at the config edge)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # a typo in a TOML key fails loudly

    epsilon: Annotated[float, Field(gt=0)] = 8.0  # per institution, whole federation run
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5  # must stay below 1 / n_students
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0  # per-student gradient clipping bound
    accountant: Mechanism = "rdp"  # rdp: conservative, closed form; prv: tighter, numerical

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
