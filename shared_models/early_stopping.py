"""Early stopping on validation loss that keeps and restores the best weights."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from shared_models.models.weights import unwrap

logger = logging.getLogger(__name__)


class EarlyStopping:
    """Stop after ``patience`` epochs without an improvement larger than ``min_delta``.

    The CNN-LSTM and at-risk LSTM papers stop after ten epochs without improvement in
    validation loss and keep the best model; `restore` puts those weights back.
    """

    def __init__(self, patience: int = 10, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be non-negative, got {min_delta}")
        self.patience = patience
        self.min_delta = min_delta
        self.best_loss = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    def step(self, loss: float, model: nn.Module, epoch: int) -> bool:
        """Record epoch ``epoch``'s validation loss; True when training should stop.

        A NaN loss never counts as an improvement.
        """
        if math.isfinite(loss) and loss < self.best_loss - self.min_delta:
            self.best_loss = loss
            self.best_epoch = epoch
            self.bad_epochs = 0
            state = unwrap(model).state_dict()
            self._best_state = {k: v.detach().clone() for k, v in state.items()}
        else:
            self.bad_epochs += 1
        stop = self.bad_epochs >= self.patience
        if stop:
            logger.info(
                "early stopping at epoch %d: best validation loss %.6g at epoch %d",
                epoch,
                self.best_loss,
                self.best_epoch,
            )
        return stop

    def restore(self, model: nn.Module) -> bool:
        """Load the best weights seen into ``model``; False if no epoch had a finite loss."""
        if self._best_state is None:
            return False
        unwrap(model).load_state_dict(self._best_state)
        return True
