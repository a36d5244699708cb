"""DP-SGD for one institution across a whole federation run, with Opacus.

A `DPSession` owns one ``PrivacyEngine`` whose accountant starts from the history persisted on
the institution's disk, so rounds compose (a fresh engine per round would forget them) and a
restarted node keeps counting. Per round::

    session = DPSession.open(state_dir, budget, plan, institution="uni_a")
    model, optimizer, loader = session.make_private(model, optimizer, loader)  # refuses first
    ...train with train_one_epoch...
    entry = session.spend_round(run_id, server_round, node)  # persist, sign, append ledger

`make_private` refuses (``PrivacyBudgetExceeded``) before any step when one more round would
exceed the budget, or when the noise the budget left calls for is above the node's ceiling
(``budget.max_noise_multiplier``: such an update would be mostly noise), and stops training if a
round takes more steps than it was checked for. The model trained in a round may leave the node
only after `spend_round` returned.

The unit is the student (`privacy.budget.NEIGHBOURING`): given the records' student ids,
`make_private` samples students, one record each per step (`privacy.sampling`), at the plan's
rate, which comes from the released student count, as does the step count; Opacus averages the
clipped, noised sum over the plan's expected batch size (public), not the exact one.
`release_histogram` answers a federated evaluation with noised histograms, accounted in the
same history and ledger (`privacy.releases`).

Per-student gradients of the recurrent layers come from `privacy.fused_rnn` by default (the same
gradients as Opacus' hooks, computed faster: see ``docs/benchmarks.md``), and the weights'
per-student gradients are clipped from their factors (`privacy.fused_clip`: the same clip and
sum without materialising them); Opacus still drives the step, noises and accounts for it.

DP-SGD runs where the model is (``--device``, `shared_models.devices`): per-student gradients,
clipping and the update on the GPU when the model is there. Who is sampled and the noise itself
are still drawn on the CPU from the ChaCha20 keystream (`privacy.noise`), never from torch's
CUDA generator, and the noise is copied to the device: the same key gives the same noise on
every device (``bench/bench_gpu.py`` checks a GPU step against a CPU one).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import wrap_data_loader
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from privacy.accountant_store import (
    AccountantState,
    AccountantStore,
    compute_epsilon,
    extend_history,
    reconcile_state,
)
from privacy.budget import NEIGHBOURING, DPPlan, PrivacyBudget, PrivacyConfigError, Segment
from privacy.fused_clip import install_factored_clipping
from privacy.fused_rnn import fuse_recurrent_layers
from privacy.ledger.institution import InstitutionLedger
from privacy.noise import SecureRandom, install_secure_noise
from privacy.releases import Release, gaussian_release, histogram_key
from privacy.sampling import student_loader
from shared_models.devices import model_device
from shared_models.errors import PrivacyBudgetExceeded

logger = logging.getLogger(__name__)

#: The words of a node's refusal of a round its budget can only buy noise for (`check_round`).
#: Budget errors keep their text in a node's reply, so a caller that must tell this refusal
#: from a failure (`simulations.reproduce.pipeline`) looks for it.
DECLINES_ROUND = "declines this round"


@dataclass
class _Round:
    steps: int = 0


class DPSession:
    """One institution's DP-SGD budget, accountant and ledger (see the module docstring)."""

    def __init__(
        self,
        store: AccountantStore,
        state: AccountantState,
        budget: PrivacyBudget,
        ledger: InstitutionLedger,
        max_physical_batch_size: int | None,
        *,
        fused_rnn: bool = True,
    ) -> None:
        self._store = store
        self._state = state
        self.budget = budget
        self.ledger = ledger
        self._max_physical = max_physical_batch_size
        self._fused_rnn = fused_rnn
        self._unfuse: Callable[[], None] | None = None
        with warnings.catch_warnings():
            # secure_mode needs torchcsprng (not installable here): make_private installs a
            # ChaCha20 source (privacy.noise) for noise and sampling instead.
            warnings.filterwarnings("ignore", "Secure RNG turned off", UserWarning)
            self._engine = PrivacyEngine(accountant=budget.accountant)
        self._engine.accountant.history = list(state.history)
        self._round: _Round | None = None

    @classmethod
    def open(
        cls,
        state_dir: Path | str,
        budget: PrivacyBudget,
        plan: DPPlan,
        *,
        institution: str,
        signing_key: ec.EllipticCurvePrivateKey | Path | None = None,
        max_physical_batch_size: int | None = None,
        fused_rnn: bool = True,
    ) -> DPSession:
        """Open (or start) the institution's session in ``state_dir``; writes nothing.

        Args:
            state_dir: the institution's private folder; holds ``accountant.json`` and
                ``ledger.jsonl`` (and ``keys/INSTITUTION`` when no key is given).
            budget: the institution's (epsilon, delta) for the whole run.
            plan: students, sample rate, steps per round and rounds (`DPPlan.for_training`).
            institution: the institution's name, as registered with the consortium.
            signing_key: the institution's EC key (its node key) or its OpenSSH file; None
                uses ``state_dir/keys/INSTITUTION``, created on first use.
            max_physical_batch_size: split Poisson batches into chunks of at most this many
                students (Opacus' BatchMemoryManager); None keeps whole batches.
            fused_rnn: per-student gradients of ``DPLSTM``/``DPGRU`` layers from
                `privacy.fused_rnn`, clipped from their factors with those of wide
                ``nn.Linear`` layers (`privacy.fused_clip`; same values, faster); False leaves
                them to Opacus' hooks and clipping.

        Raises:
            PrivacyConfigError: delta is not below 1/n, or the budget cannot be reached.
            AccountantStateError: the state belongs to another institution or budget.
        """
        budget.check_delta(plan.n_students)
        state_dir = Path(state_dir)
        store = AccountantStore(state_dir)
        ledger = InstitutionLedger(state_dir, institution, signing_key)
        with store.locked():
            state = reconcile_state(store.load(), budget, plan, institution)
            ledger.repair(state.last_entry)
        return cls(store, state, budget, ledger, max_physical_batch_size, fused_rnn=fused_rnn)

    # -- what a ClientApp reads ----------------------------------------------------------------

    @property
    def noise_multiplier(self) -> float:
        return self._state.noise_multiplier

    @property
    def plan(self) -> DPPlan:
        plan = self._state.plan
        assert plan is not None, "DPSession.open reconciles the state with a plan"
        return plan

    @property
    def epsilon_spent(self) -> float:
        return self._state.epsilon_spent

    @property
    def epsilon_remaining(self) -> float:
        return max(0.0, self.budget.epsilon - self._state.epsilon_spent)

    @property
    def rounds_done(self) -> int:
        return self._state.rounds_done

    @property
    def public_key(self) -> str:
        """The ledger signing key as one OpenSSH line, for the consortium's registry."""
        return self.ledger.public_key

    # -- a round -------------------------------------------------------------------------------

    def check_round(self) -> float:
        """The epsilon one more full round would bring the institution to.

        Raises:
            PrivacyBudgetExceeded: that epsilon would exceed the budget, or the calibrated noise
                multiplier is above the node's ceiling (the round is declined).
        """
        self.ledger.refuse_if_voided()
        plan = self.plan
        ceiling = self.budget.max_noise_multiplier
        if self.noise_multiplier > ceiling:
            raise PrivacyBudgetExceeded(
                f"{self._state.institution} {DECLINES_ROUND}: the budget left "
                f"(epsilon {self.epsilon_spent:.4g} of {self.budget.epsilon:g} spent after "
                f"{self.rounds_done} round(s)) calls for noise multiplier "
                f"{self.noise_multiplier:.3g} over {plan.planned_rounds - self.rounds_done} "
                f"round(s), above this node's ceiling {ceiling:g} (dp-max-noise): the update "
                "would be mostly noise; nothing was trained or spent"
            )
        segment = (self.noise_multiplier, plan.sample_rate, plan.steps_per_round)
        projected = self._epsilon(extend_history(self._state.history, segment))
        if projected > self.budget.epsilon:
            raise PrivacyBudgetExceeded(
                f"{self._state.institution}: one more round would raise epsilon from "
                f"{self.epsilon_spent:.4g} to {projected:.4g}, above its budget "
                f"{self.budget.epsilon:g} (delta {self.budget.delta:g}, {self.budget.accountant}) "
                f"after {self.rounds_done} round(s); this institution takes no further DP rounds"
            )
        return projected

    def make_private(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        loader: DataLoader[Any],
        *,
        student_ids: Sequence[Any] | np.ndarray | None = None,
    ) -> tuple[nn.Module, Optimizer, DataLoader[Any]]:
        """Opacus' DP-SGD wrappers for one round, after checking the round fits the budget.

        Poisson sampling of students at the plan's rate (one record per sampled student per
        step), per-student clipping at ``max_grad_norm``, Gaussian noise at the calibrated
        multiplier, ``plan.steps_per_round / local epochs`` steps per pass over the loader.
        Matches ``client.local.Privatizer``. With ``fused_rnn`` the model's recurrent layers
        (and wide ``nn.Linear`` layers) are swapped for twins sharing their parameters until
        `spend_round` or `abandon_round` puts them back (`privacy.fused_rnn`). Trains on the
        model's device; batches are drawn on the CPU and copied there by
        `shared_models.training.train_one_epoch`.

        Args:
            loader: only its dataset is used: batches are drawn per student.
            student_ids: the pseudonymous student of each record of ``loader``'s dataset; None
                treats each record as its own student.

        Raises:
            PrivacyBudgetExceeded: the round would exceed the budget or needs noise above the
                node's ceiling (nothing was changed), or, during training, the round takes
                more steps than ``plan.steps_per_round``.
        """
        if self._round is not None:
            raise RuntimeError(
                "make_private called again before spend_round ended the round; call "
                "abandon_round() first if that round's training failed"
            )
        self.check_round()
        logger.debug("DP-SGD round on %s", model_device(model))
        plan = self.plan
        batches = round(1.0 / plan.sample_rate)
        size = loader.batch_size
        if size is not None and math.ceil(plan.n_students / size) != batches:
            raise PrivacyConfigError(
                f"the loader's batch size {size} gives {plan.n_students} students sampling rate "
                f"{1 / math.ceil(plan.n_students / size):.6g}, the budget was calibrated for "
                f"{plan.sample_rate:.6g}; build the plan with DPPlan.for_training(n, batch_size, "
                "local_epochs, rounds) from the same batch size"
            )
        # Noise and who is sampled come from a ChaCha20 keystream (privacy.noise), not
        # torch's generator: amplification by subsampling assumes no one can tell whether a
        # student was in a batch, and a Mersenne Twister's outputs predict its later ones.
        source = SecureRandom()
        students = student_loader(
            loader,
            student_ids,
            sample_rate=plan.sample_rate,
            steps_per_epoch=batches,
            source=source,
        )
        # Attach the persisted history: this engine's accountant composes across rounds.
        self._engine.accountant.history = list(self._state.history)
        if self._fused_rnn:
            self._unfuse = fuse_recurrent_layers(model, factored=True)
        try:
            with warnings.catch_warnings():
                # Every round rebuilds its loader over the same students: same logical dataset.
                warnings.filterwarnings("ignore", "PrivacyEngine detected new dataset", UserWarning)
                private_model, private_opt, private_loader = self._engine.make_private(
                    module=model,
                    optimizer=optimizer,
                    data_loader=students,
                    noise_multiplier=self.noise_multiplier,
                    max_grad_norm=self.budget.max_grad_norm,
                    poisson_sampling=False,  # students' Poisson sampling is `students`' own
                )
            install_secure_noise(private_opt, source)
            if self._fused_rnn:
                install_factored_clipping(private_opt)
            # Opacus divides the noised sum by len(dataset) * rate: records, and exact. The
            # plan's expected batch size comes from the released count only.
            private_opt.expected_batch_size = plan.expected_batch_size
            # Opacus forbids accumulating per-sample gradients across steps under Poisson
            # sampling (each step's clipped sum must stand alone); ours samples too.
            private_model.forbid_grad_accumulation()
        except BaseException:
            self._restore_layers()
            raise
        self._round = _Round()
        self._guard_steps(private_opt)
        if self._max_physical is not None:
            # What BatchMemoryManager's __enter__ returns (its __exit__ does nothing); the
            # Privatizer seam hands back a loader, not a context.
            private_loader = wrap_data_loader(
                data_loader=private_loader,
                max_batch_size=self._max_physical,
                optimizer=private_opt,
            )
        return private_model, private_opt, private_loader

    def release_histogram(
        self,
        run_id: str,
        server_round: int,
        node: str,
        counts: Sequence[float],
        *,
        digest: str = "",
    ) -> Release:
        """Release ``counts`` (each student in exactly one) with Gaussian noise, accounted.

        The noise's standard deviation is ``plan.histogram_noise_std``. The same run, round and
        ``digest`` (of the evaluated weights) get the stored release back, without a new draw.

        Raises:
            PrivacyBudgetExceeded: the budget cannot pay for it; nothing drawn or written.
        """
        plan = self.plan
        key = histogram_key(run_id, server_round, digest)
        with self._store.locked():
            base = self._store.load() or self._state
            if (done := base.releases.get(key)) is not None:
                return Release.from_json(done)
            state, release = gaussian_release(
                base,
                self.ledger,
                self.budget,
                key=key,
                kind="histogram",
                exact=counts,
                noise_std=plan.histogram_noise_std,
                n_public=plan.n_students,
                fields={"node": str(node), "run_id": str(run_id), "round": int(server_round)},
            )
            state = state.model_copy(
                update={"plan": plan, "noise_multiplier": self.noise_multiplier}
            )
            self._store.save(state)
            self.ledger.append(release.entry)
        self._state = state
        return release

    def spend_round(self, run_id: str, server_round: int, node: str) -> dict[str, Any]:
        """Commit the round's steps to disk and the ledger; returns the signed ledger entry.

        The accountant history is persisted atomically first (the commit point), then the entry
        is appended to ``ledger.jsonl`` (re-appended on the next open after a crash in between).
        The entry holds aggregate DP parameters only; send it with the round's reply.

        Raises:
            PrivacyBudgetExceeded: another process of this node spent the budget meanwhile;
                the round's model must not be released.
        """
        if self._round is None:
            raise RuntimeError("spend_round without make_private: no round was trained")
        self._restore_layers()
        steps, self._round = self._round.steps, None
        plan = self.plan
        segment: Segment = (self.noise_multiplier, plan.sample_rate, steps)
        mine = [tuple(h) for h in self._engine.accountant.history]
        if mine != extend_history(self._state.history, segment):
            raise RuntimeError("the engine's accountant diverged from the steps this round took")
        with self._store.locked():
            base = self._store.load() or self._state
            history = extend_history(base.history, segment)
            epsilon = max(self._epsilon(history), base.epsilon_spent)
            if epsilon > self.budget.epsilon:
                raise PrivacyBudgetExceeded(
                    f"{base.institution}: this round would bring epsilon to {epsilon:.4g}, above "
                    f"its budget {self.budget.epsilon:g}; its model must not leave the node"
                )
            entry = self._entry(run_id, server_round, node, steps, epsilon)
            state = base.model_copy(
                update={
                    "history": history,
                    "rounds_done": base.rounds_done + 1,
                    "epsilon_spent": epsilon,
                    "last_entry": entry,
                    "noise_multiplier": self.noise_multiplier,
                    "plan": plan,
                }
            )
            self._store.save(state)
            self.ledger.append(entry)
        self._state = state
        logger.info(
            "%s round %d: %d DP steps, epsilon %.4g of %g",
            state.institution,
            server_round,
            steps,
            epsilon,
            self.budget.epsilon,
        )
        return entry

    def abandon_round(self) -> None:
        """Forget a round whose training failed; its model must never leave the node.

        Nothing was committed for it, so nothing is spent; the next `make_private` starts from
        the persisted history again.
        """
        if self._round is not None:
            logger.warning("abandoning a DP round after %d step(s)", self._round.steps)
        self._restore_layers()
        self._round = None
        self._engine.accountant.history = list(self._state.history)

    # -- helpers -------------------------------------------------------------------------------

    def _restore_layers(self) -> None:
        """Put back the recurrent layers `make_private` swapped (no-op when none were)."""
        unfuse, self._unfuse = self._unfuse, None
        if unfuse is not None:
            unfuse()

    def _epsilon(self, history: list[Segment]) -> float:
        return compute_epsilon(self.budget.accountant, history, self.budget.delta)

    def _guard_steps(self, optimizer: DPOptimizer) -> None:
        """Stop a round at its checked number of steps, before the update that would exceed."""
        account = optimizer.step_hook
        limit = self.plan.steps_per_round
        current = self._round
        assert account is not None and current is not None

        def guarded(opt: DPOptimizer) -> None:
            if current.steps >= limit:
                raise PrivacyBudgetExceeded(
                    f"this round tried to take more than the {limit} DP steps it was checked for "
                    "(local epochs x batches); the round is stopped and its model not released"
                )
            account(opt)
            current.steps += 1

        optimizer.attach_step_hook(guarded)

    def _entry(
        self, run_id: str, server_round: int, node: str, steps: int, epsilon: float
    ) -> dict[str, Any]:
        self.ledger.refuse_if_voided()
        plan = self.plan
        return self.ledger.sign_next(
            {
                "kind": "train",
                "neighbouring": NEIGHBOURING,
                "n_noised": plan.n_noised,
                "node": str(node),
                "run_id": str(run_id),
                "round": int(server_round),
                "private": True,
                "accountant": self.budget.accountant,
                "noise_multiplier": float(self.noise_multiplier),
                "sample_rate": float(plan.sample_rate),
                "steps": int(steps),
                "max_grad_norm": float(self.budget.max_grad_norm),
                "delta": float(self.budget.delta),
                "n_students": int(plan.n_students),
                "epsilon_after": float(epsilon),
                "epsilon_budget": float(self.budget.epsilon),
            }
        )
