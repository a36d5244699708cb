"""At-risk LSTM (the at-risk LSTM paper): LSTM(64) -> dropout 0.2 -> dense -> sigmoid.

Trained with binary cross-entropy and Adam 1e-3 with early stopping on validation loss.
"""

from __future__ import annotations

from typing import Annotated

from opacus.layers import DPLSTM
from pydantic import Field
from torch import Tensor

from shared_models.models.base import (
    ModelConfig,
    OutputHeads,
    StudentModel,
    last_observed,
    masked_dynamic,
)


class LSTMConfig(ModelConfig):
    """Hyper-parameters of the at-risk LSTM; defaults from the paper."""

    hidden_size: Annotated[int, Field(ge=1)] = 64  # LSTM units
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2  # after the LSTM


class LSTMModel(StudentModel):
    """One DP-ready LSTM layer over the weekly features, summarised at the last observed week."""

    config: LSTMConfig

    def __init__(
        self, n_weeks: int, n_dynamic: int, n_static: int, config: LSTMConfig | None = None
    ) -> None:
        cfg = config or LSTMConfig()
        super().__init__(n_weeks, n_dynamic, n_static, cfg)
        self.rnn = DPLSTM(n_dynamic + 1, cfg.hidden_size, batch_first=True)
        self.head = OutputHeads.for_config(cfg.hidden_size, cfg, n_static)

    def _encode(self, dynamic: Tensor, week_mask: Tensor, static: Tensor) -> Tensor:
        sequence, _ = self.rnn(masked_dynamic(dynamic, week_mask))
        return last_observed(sequence, week_mask)
