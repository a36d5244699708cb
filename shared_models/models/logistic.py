"""Logistic regression on engineered weekly features: the DP baseline that can win.

Tramèr & Boneh (ICLR 2021, "Differentially private learning needs better features") show that
with little data a DP linear model on good hand-crafted features beats a DP deep net: DP-SGD
adds the same noise to every coordinate of the clipped gradient, so a model with a few dozen
parameters keeps far more signal per step than an LSTM with tens of thousands.

The feature map is fixed (no parameters, nothing learned from data, so it releases nothing) and
computed inside ``forward`` from the weekly sequence. Per dynamic indicator, over the student's
observed weeks:

- ``mean``: the mean over observed weeks;
- ``last``: the value at the last observed week;
- ``recent``: the mean over the last ``recent_weeks`` observed weeks (fewer if fewer observed);
- ``trend``: the least-squares slope over those weeks against the week number, times
  ``(recent_weeks - 1) / 2``: a straight rise from -1 to 1 across a full window reads 1, so it
  sits on the inputs' scale; 0 with fewer than two observed weeks in the window;
- ``min``: the lowest value over observed weeks;

then one column ``observed``: the share of weeks observed from the first week to the student's
last observed week. Inputs arrive normalised (the contract's constants map each indicator onto
[-1, 1]; train-split z-scores for centralized baselines), so every feature lies on that same
scale (``trend`` within about +-1.2 on [-1, 1] inputs) and no learned scaling is needed.
Static attributes join as they are (``use_static``), then one ``nn.Linear`` per head: the risk
logit, and the grade through a sigmoid like every other model's grade head.

Weeks after the last observed one never enter (as for the LSTM's last-observed summary), so a
student scored part-way through a term, or a sequence padded with unobserved weeks, gives the
same features; unobserved weeks inside the span count as missed in ``observed`` and are
otherwise skipped. With no observed week at all, every feature is 0. The only parameters are
the heads' ``nn.Linear`` layers, so Opacus computes per-student gradients with its stock hooks
and the state dict does not depend on the number of weeks.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from shared_models.models.base import ModelConfig, OutputHeads, StudentModel

#: Engineered features per dynamic indicator, in the order of the feature vector's blocks.
PER_INDICATOR: tuple[str, ...] = ("mean", "last", "recent", "trend", "min")


class LogisticConfig(ModelConfig):
    """Hyper-parameters of the engineered-feature logistic model."""

    recent_weeks: Annotated[int, Field(ge=2)] = 4  # k of the recent mean and trend (a slope: >= 2)
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # on the features; none by default
    # A linear model has no hidden layer; use another architecture for a deeper one.
    dense_units: Annotated[int, Field(ge=0, le=0)] = 0
    # A few dozen weights take larger Adam steps than a recurrent net's (the papers' 1e-3);
    # DP rows use larger still (0.05 with batch 256, docs/results.md).
    learning_rate: Annotated[float, Field(gt=0.0)] = 0.01


def engineered_features(dynamic: Tensor, week_mask: Tensor, recent_weeks: int) -> Tensor:
    """The fixed feature map: ``len(PER_INDICATOR)`` blocks of F columns, then ``observed``.

    Args:
        dynamic: (B, W, F) normalised weekly features; unobserved weeks may hold anything
            (NaN included): they are never read.
        week_mask: (B, W), 1.0 for observed weeks.
        recent_weeks: k of the recent mean and trend (>= 2).

    Returns:
        Tensor of shape (B, 5 F + 1): mean, last, recent, trend, min (F columns each), observed.
    """
    batch, weeks, _ = dynamic.shape
    observed = week_mask > 0
    obs = observed.unsqueeze(-1)
    values = torch.where(obs, dynamic, torch.zeros_like(dynamic))
    dtype = values.dtype
    count = observed.sum(dim=1).to(dtype)  # (B,)
    seen = count > 0
    positions = torch.arange(weeks, device=dynamic.device, dtype=dtype).expand(batch, weeks)

    mean = values.sum(dim=1) / count.clamp(min=1).unsqueeze(-1)

    last_index = torch.where(observed, positions, torch.zeros_like(positions)).amax(dim=1)
    index = last_index.long().view(batch, 1, 1).expand(batch, 1, values.shape[-1])
    last = values.gather(1, index).squeeze(1)  # 0 when nothing was observed

    # Observed weeks counted from the end: week t is among the last k observed iff it is
    # observed and at most k observed weeks lie at or after it.
    from_end = observed.flip(1).cumsum(dim=1).flip(1)
    recent = (observed & (from_end <= recent_weeks)).to(dtype)  # (B, W)
    n_recent = recent.sum(dim=1).clamp(min=1)
    recent_mean = (values * recent.unsqueeze(-1)).sum(dim=1) / n_recent.unsqueeze(-1)
    centre = (positions * recent).sum(dim=1) / n_recent
    offset = (positions - centre.unsqueeze(-1)) * recent  # 0 outside the window
    spread = (offset**2).sum(dim=1)
    slope = (offset.unsqueeze(-1) * values).sum(dim=1) / spread.clamp(min=1e-12).unsqueeze(-1)
    slope = torch.where((spread > 0).unsqueeze(-1), slope, torch.zeros_like(slope))
    trend = slope * ((recent_weeks - 1) / 2.0)

    lowest = torch.where(obs, dynamic, torch.full_like(dynamic, float("inf"))).amin(dim=1)
    lowest = torch.where(seen.unsqueeze(-1), lowest, torch.zeros_like(lowest))

    span = torch.where(seen, last_index + 1, torch.ones_like(last_index))
    share = (count / span).unsqueeze(-1)
    return torch.cat([mean, last, recent_mean, trend, lowest, share], dim=-1)


class LogisticModel(StudentModel):
    """One ``nn.Linear`` per head over `engineered_features` (and the static attributes)."""

    config: LogisticConfig

    def __init__(
        self, n_weeks: int, n_dynamic: int, n_static: int, config: LogisticConfig | None = None
    ) -> None:
        cfg = config or LogisticConfig()
        super().__init__(n_weeks, n_dynamic, n_static, cfg)
        self.n_features = len(PER_INDICATOR) * n_dynamic + 1
        self.head = OutputHeads.for_config(self.n_features, cfg, n_static)

    def _encode(self, dynamic: Tensor, week_mask: Tensor, static: Tensor) -> Tensor:
        return engineered_features(dynamic, week_mask, self.config.recent_weeks)
