"""GRU baseline of the LSTM-GRU paper: GRU(50) -> dense, Adam 1e-3, MSE on the grade."""

from __future__ import annotations

from typing import Annotated

from opacus.layers import DPGRU
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


class GRUConfig(ModelConfig):
    """Hyper-parameters of the GRU model; defaults from the LSTM-GRU paper (Table 3)."""

    hidden_size: Annotated[int, Field(ge=1)] = 50  # GRU units
    targets: tuple[Target, ...] = ("grade",)  # the paper regresses the grade with MSE
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # the paper uses none


class GRUModel(StudentModel):
    """One DP-ready GRU layer, summarised at the last observed week, then dense heads.

    The paper's Keras GRU uses a ReLU activation; ``DPGRU`` keeps the standard tanh.
    """

    config: GRUConfig

    def __init__(
        self, n_weeks: int, n_dynamic: int, n_static: int, config: GRUConfig | None = None
    ) -> None:
        cfg = config or GRUConfig()
        super().__init__(n_weeks, n_dynamic, n_static, cfg)
        self.rnn = DPGRU(n_dynamic + 1, cfg.hidden_size, batch_first=True)
        self.head = OutputHeads.for_config(cfg.hidden_size, cfg, n_static)

    def _encode(self, dynamic: Tensor, week_mask: Tensor, static: Tensor) -> Tensor:
        sequence, _ = self.rnn(masked_dynamic(dynamic, week_mask))
        return last_observed(sequence, week_mask)
