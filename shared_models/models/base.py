"""What every edufl architecture shares: its config base, input masking, summary and heads.

Every model takes ``(dynamic, week_mask, static)`` and returns a dict of per-student outputs:

- ``"risk"``: at-risk logit (apply a sigmoid for a probability), shape (B,);
- ``"grade"``: final grade on the [0, 1] scale of `ModelInputs.grade`, shape (B,);
- ``"engagement"``: the multi-task model's self-supervised engagement estimate, shape (B,).

Models zero the dynamic features of unobserved weeks themselves and see the mask as one more
input channel, so whatever a caller leaves in unobserved weeks (NaN included) cannot change an
output. Only DP-ready layers are used (``opacus.layers.DPLSTM``/``DPGRU``, ``nn.Linear``,
``nn.Conv1d``), so every model trains under Opacus DP-SGD unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

logger = logging.getLogger(__name__)

Target = Literal["risk", "grade"]
#: Canonical head order: fixes module registration order, hence state-dict key order.
HEAD_ORDER: tuple[str, ...] = ("risk", "grade", "engagement")


class ModelConfig(BaseModel):
    """Hyper-parameters common to every architecture (subclassed once per model)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: tuple[Target, ...] = ("risk",)  # supervised heads the model produces
    use_static: bool = True  # concatenate static attributes before the dense layers
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.2  # on the recurrent summary
    dense_units: Annotated[int, Field(ge=0)] = 0  # hidden ReLU layer before the heads; 0 = none
    learning_rate: Annotated[float, Field(gt=0.0)] = 1e-3  # Adam, as in every seed paper
    lr_decay: Annotated[float, Field(ge=0.0)] = 0.0  # k in lr = lr0 * exp(-k * epoch); 0 = fixed

    @field_validator("targets")
    @classmethod
    def _canonical_targets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("targets must name at least one of 'risk', 'grade'")
        if len(set(value)) != len(value):
            raise ValueError(f"targets contains duplicates: {list(value)}")
        # Same heads in any order must give the same state-dict keys on every party.
        return tuple(h for h in HEAD_ORDER if h in value)


def masked_dynamic(dynamic: Tensor, week_mask: Tensor) -> Tensor:
    """Dynamic features with unobserved weeks zeroed and the mask appended as a channel.

    Uses ``torch.where`` rather than a product so NaN in unobserved weeks cannot leak.

    Returns:
        Tensor of shape (B, W, F + 1).
    """
    mask = week_mask.unsqueeze(-1)
    zeroed = torch.where(mask > 0, dynamic, torch.zeros_like(dynamic))
    return torch.cat([zeroed, mask], dim=-1)


def last_observed(sequence: Tensor, week_mask: Tensor) -> Tensor:
    """The recurrent output at each student's last observed week.

    A student scored part-way through a term (later weeks masked) is summarised at the week
    they were last seen, not after a tail of empty weeks. With no observed week at all, the
    final step is used.

    Args:
        sequence: (B, W, H) outputs of a ``batch_first`` recurrent layer.
        week_mask: (B, W), 1.0 for observed weeks.

    Returns:
        Tensor of shape (B, H).
    """
    batch, weeks, hidden = sequence.shape
    positions = torch.arange(weeks, device=sequence.device).expand(batch, weeks)
    observed = week_mask > 0
    last = torch.where(observed, positions, torch.zeros_like(positions)).amax(dim=1)
    last = torch.where(observed.any(dim=1), last, torch.full_like(last, weeks - 1))
    index = last.view(batch, 1, 1).expand(batch, 1, hidden)
    return sequence.gather(1, index).squeeze(1)


class OutputHeads(nn.Module):
    """Dropout, optional static concatenation, optional dense layer, then one unit per head.

    ``grade`` and ``engagement`` are regression heads; ``grade`` goes through a sigmoid so
    predictions stay on the [0, 1] grade scale. ``risk`` stays a logit (BCE-with-logits is the
    numerically stable loss).
    """

    @classmethod
    def for_config(cls, in_features: int, config: ModelConfig, n_static: int) -> OutputHeads:
        """The heads a model config asks for; static features join only when ``use_static``."""
        return cls(
            in_features,
            config.targets,
            n_static=n_static if config.use_static else 0,
            dense_units=config.dense_units,
            dropout=config.dropout,
        )

    def __init__(
        self,
        in_features: int,
        heads: Sequence[str],
        *,
        n_static: int = 0,
        dense_units: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        unknown = set(heads) - set(HEAD_ORDER)
        if unknown:
            raise ValueError(f"unknown heads {sorted(unknown)}; valid heads are {HEAD_ORDER}")
        self.n_static = n_static
        self.dropout = nn.Dropout(dropout)
        width = in_features + n_static
        if dense_units > 0:
            self.dense: nn.Module = nn.Sequential(
                nn.Linear(width, dense_units), nn.ReLU(), nn.Dropout(dropout)
            )
            width = dense_units
        else:
            self.dense = nn.Identity()
        self.heads = nn.ModuleDict({h: nn.Linear(width, 1) for h in HEAD_ORDER if h in heads})

    def forward(self, summary: Tensor, static: Tensor | None = None) -> dict[str, Tensor]:
        features = self.dropout(summary)
        if self.n_static:
            if static is None:
                raise ValueError("these heads were built with static features; pass them")
            features = torch.cat([features, static], dim=-1)
        features = self.dense(features)
        out: dict[str, Tensor] = {}
        for name, layer in self.heads.items():
            value = layer(features).squeeze(-1)
            out[name] = torch.sigmoid(value) if name == "grade" else value
        return out


class StudentModel(nn.Module):
    """Base class: validates shapes once per call, then ``_encode`` and the heads.

    Subclasses set ``self.head`` (an `OutputHeads`) and implement ``_encode``, returning the
    per-student summary fed to the heads.
    """

    head: OutputHeads

    def __init__(self, n_weeks: int, n_dynamic: int, n_static: int, config: ModelConfig) -> None:
        super().__init__()
        if n_weeks < 1 or n_dynamic < 1 or n_static < 0:
            raise ValueError(
                f"need n_weeks >= 1, n_dynamic >= 1, n_static >= 0; "
                f"got {n_weeks}, {n_dynamic}, {n_static}"
            )
        self.n_weeks = n_weeks
        self.n_dynamic = n_dynamic
        self.n_static = n_static
        self.config = config

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the outputs ``forward`` returns, in canonical order."""
        return tuple(self.head.heads.keys())

    def forward(self, dynamic: Tensor, week_mask: Tensor, static: Tensor) -> dict[str, Tensor]:
        self._check_shapes(dynamic, week_mask, static)
        summary = self._encode(dynamic, week_mask, static)
        outputs: dict[str, Tensor] = self.head(summary, static if self.head.n_static else None)
        return outputs

    def _encode(self, dynamic: Tensor, week_mask: Tensor, static: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_shapes(self, dynamic: Tensor, week_mask: Tensor, static: Tensor) -> None:
        expected = {
            "dynamic": (self.n_weeks, self.n_dynamic),
            "week_mask": (self.n_weeks,),
            "static": (self.n_static,),
        }
        for name, tensor in (("dynamic", dynamic), ("week_mask", week_mask), ("static", static)):
            if tuple(tensor.shape[1:]) != expected[name]:
                raise ValueError(
                    f"{type(self).__name__} was built for {name} of shape "
                    f"(B, {', '.join(map(str, expected[name]))}), got {tuple(tensor.shape)}; "
                    "build the model from the same data contract as the inputs"
                )
