"""Multi-task LSTM of the EdNet LSTM paper: static attributes fused into every step.

The paper extends the input and candidate gates with the static features z,
``i_t = sigma(W_i [h_{t-1}, x_t, z])`` (its Eq. 2-3). Concatenating z to every week's input of a
standard LSTM gives exactly that, plus z in the forget and output gates (a superset that keeps
the layer a plain, DP-ready ``DPLSTM``). Independent heads (its Eq. 4) predict the grade, the
engagement and the at-risk logit from the last observed hidden state; the learning rate decays
exponentially, ``lr = lr0 * exp(-k * epoch)`` (its Eq. 6).

Engagement target: public datasets carry no engagement label, so the engagement head is a
self-supervised auxiliary task. Its target is the mean of the normalised (z-scored) activity
features over the student's observed weeks and over the activity channels: 0 is the training
cohort's average activity, positive is above it. It is undefined (NaN, left out of the loss) for
a student with no observed week.
"""

from __future__ import annotations

from typing import Annotated

import torch
from opacus.layers import DPLSTM
from pydantic import Field, field_validator
from torch import Tensor

from shared_models.models.base import (
    ModelConfig,
    OutputHeads,
    StudentModel,
    Target,
    last_observed,
    masked_dynamic,
)


class MultiTaskConfig(ModelConfig):
    """Hyper-parameters of the multi-task LSTM; defaults from the EdNet LSTM paper.

    ``use_static`` here means fusing static attributes into the recurrent input at every week.
    """

    hidden_size: Annotated[int, Field(ge=1)] = 128  # LSTM cells
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5  # after the LSTM
    targets: tuple[Target, ...] = ("risk", "grade")  # supervised heads
    engagement: bool = True  # add the self-supervised engagement head
    engagement_index: tuple[int, ...] | None = None  # activity channels averaged; None = all
    lr_decay: Annotated[float, Field(ge=0.0)] = 0.05  # k per epoch: lr halves every ~14 epochs
    # Multiplies the static attributes fused into every step. Contract-normalised attributes are
    # about 1 a column (OULAD: 8 attributes in 37 one-hot and numeric columns, norm about 2.8),
    # weekly clicks about 0.1; DP-SGD's noise on the static weights, times that norm, became a
    # random per-student score. 0.1 brings the block to the weekly inputs' size (issue 19,
    # docs/results.md "Static attributes under DP"); 1.0 is the paper's plain concatenation.
    static_scale: Annotated[float, Field(gt=0)] = 0.1

    @field_validator("engagement_index")
    @classmethod
    def _unique_index(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("engagement_index must list distinct dynamic channels (or be omitted)")
        return value


def engagement_target(dynamic: Tensor, week_mask: Tensor, index: Tensor | None = None) -> Tensor:
    """Mean normalised activity over observed weeks and the ``index`` channels (None = all).

    Returns:
        Tensor of shape (B,); NaN where a student has no observed week.
    """
    channels = dynamic if index is None else dynamic.index_select(-1, index.to(dynamic.device))
    observed = (week_mask > 0).unsqueeze(-1)
    values = torch.where(observed, channels, torch.zeros_like(channels))
    count = observed.sum(dim=(1, 2)) * channels.shape[-1]
    total = values.sum(dim=(1, 2))
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


class MultiTaskLSTM(StudentModel):
    """LSTM over [weekly features, week mask, static] with grade, engagement and risk heads."""

    config: MultiTaskConfig

    def __init__(
        self, n_weeks: int, n_dynamic: int, n_static: int, config: MultiTaskConfig | None = None
    ) -> None:
        cfg = config or MultiTaskConfig()
        super().__init__(n_weeks, n_dynamic, n_static, cfg)
        index = cfg.engagement_index
        if index is not None:
            bad = [i for i in index if not 0 <= i < n_dynamic]
            if bad:
                raise ValueError(
                    f"engagement_index {bad} out of range for {n_dynamic} dynamic features"
                )
        self._engagement_index = None if index is None else torch.tensor(index, dtype=torch.long)
        fused_static = n_static if cfg.use_static else 0
        self.rnn = DPLSTM(n_dynamic + 1 + fused_static, cfg.hidden_size, batch_first=True)
        self.static_scale = cfg.static_scale
        heads = [*cfg.targets, "engagement"] if cfg.engagement else list(cfg.targets)
        # Static attributes already shaped every hidden state; the heads read h_t only (Eq. 4).
        self.head = OutputHeads(cfg.hidden_size, heads, dropout=cfg.dropout)

    def _encode(self, dynamic: Tensor, week_mask: Tensor, static: Tensor) -> Tensor:
        weekly = masked_dynamic(dynamic, week_mask)
        if self.config.use_static:
            scaled = static * self.static_scale  # see CNNLSTMModel.forward: DP noise x norm
            repeated = scaled.unsqueeze(1).expand(-1, weekly.shape[1], -1)
            weekly = torch.cat([weekly, repeated], dim=-1)
        sequence, _ = self.rnn(weekly)
        return last_observed(sequence, week_mask)

    def auxiliary_targets(
        self, dynamic: Tensor, week_mask: Tensor, static: Tensor
    ) -> dict[str, Tensor]:
        """Targets of the self-supervised heads, computed from the inputs themselves."""
        if not self.config.engagement:
            return {}
        return {"engagement": engagement_target(dynamic, week_mask, self._engagement_index)}
