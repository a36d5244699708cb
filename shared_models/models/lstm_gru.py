"""Hybrid of the LSTM-GRU paper: LSTM(50, returning sequences) -> GRU(50) -> dense.

Adam 1e-3 and MSE on the grade, 100 epochs in the paper.
"""

from __future__ import annotations

from typing import Annotated

from opacus.layers import DPGRU, DPLSTM
from pydantic import Field
from torch import Tensor

from shared_models.models.base import (
    ModelConfig,
    OutputHeads,
    StudentModel,
    Target,
    last_observed,
    masked_dynamic,
)


class LSTMGRUConfig(ModelConfig):
    """Hyper-parameters of the LSTM-GRU hybrid; defaults from the paper's Keras listing."""

    lstm_hidden_size: Annotated[int, Field(ge=1)] = 50  # first layer, returns every week
    gru_hidden_size: Annotated[int, Field(ge=1)] = 50  # second layer
    targets: tuple[Target, ...] = ("grade",)  # the paper regresses the grade with MSE
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # the paper uses none


class LSTMGRUModel(StudentModel):
    """A DP-ready LSTM whose whole output sequence feeds a DP-ready GRU.

    The paper's Keras layers use ReLU activations; ``DPLSTM``/``DPGRU`` keep the standard tanh.
    """

    config: LSTMGRUConfig

    def __init__(
        self, n_weeks: int, n_dynamic: int, n_static: int, config: LSTMGRUConfig | None = None
    ) -> None:
        cfg = config or LSTMGRUConfig()
        super().__init__(n_weeks, n_dynamic, n_static, cfg)
        self.lstm = DPLSTM(n_dynamic + 1, cfg.lstm_hidden_size, batch_first=True)
        self.gru = DPGRU(cfg.lstm_hidden_size, cfg.gru_hidden_size, batch_first=True)
        self.head = OutputHeads.for_config(cfg.gru_hidden_size, cfg, n_static)

    def _encode(self, dynamic: Tensor, week_mask: Tensor, static: Tensor) -> Tensor:
        lstm_sequence, _ = self.lstm(masked_dynamic(dynamic, week_mask))
        sequence, _ = self.gru(lstm_sequence)
        return last_observed(sequence, week_mask)
