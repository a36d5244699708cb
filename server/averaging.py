"""Tail averaging: the model a run releases is the mean of its last rounds' global models.

Under DP-SGD every round's global model carries that round's Gaussian noise, and the last
round's noise alone can move a small institution's ranking (on OULAD AAA at epsilon 8 the last
round lost 0.02-0.04 ROC-AUC against the round before in three of five seeds). The mean of the
global models of the run's last rounds (Polyak-Ruppert averaging of the server's iterates)
averages that noise down: on the same five runs, the mean of rounds 6-10 ranked at-risk students
at 0.939 ± 0.025 against 0.916 ± 0.040 for round 10 alone (docs/results.md, "Averaging the last
rounds"). It is post-processing of models the nodes already received, so it costs no privacy
budget and changes no guarantee.

Training is unchanged: the nodes keep training from the un-averaged global model (the
*iterate*). The average is what the run commits as each round's checkpoint from the first
averaged round on, what the nodes evaluate, what is scored and delivered. Each checkpoint's
strategy state keeps the iterate and the count (``iterate/NAME``, ``average/count``,
``average/first``), so a resumed run trains on from the iterate and averages on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # Flower is imported where arrays are built: light commands read the share
    from flwr.app import ArrayRecord

logger = logging.getLogger(__name__)

#: The share of a DP run's rounds averaged where its config sets none (`server.config`).
DP_AVERAGE_ROUNDS = 0.5
#: Tasks whose DP runs release the mean of their last rounds by default. A grade head's level
#: moves over the rounds, and the mean of several rounds' heads misses it: on OULAD AAA at
#: epsilon 8 (5 seeds, week 20) the CNN-LSTM's grade R² fell from 0.51 (the last round's model)
#: to 0.35 (the mean of rounds 6-10), with its ROC-AUC unchanged (0.832, 0.830).
AVERAGED_TASKS = ("risk",)


def dp_average_rounds(task: str) -> float:
    """The share of the last rounds a DP run of ``task`` averages where its config sets none."""
    return DP_AVERAGE_ROUNDS if task in AVERAGED_TASKS else 0.0


def saved_iterate(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The un-averaged global model a checkpoint's state keeps, by weight name ({} if none)."""
    return {k[len(_ITERATE) :]: v for k, v in state.items() if k.startswith(_ITERATE)}


_ITERATE = "iterate/"
_COUNT = "average/count"
_FIRST = "average/first"


def first_averaged_round(rounds: int, share: float) -> int:
    """The first round whose global model enters the released mean.

    ``share`` of the run's ``rounds`` (rounded up, at least one) are averaged, counted from the
    last: 0.5 of 10 rounds averages rounds 6-10, 0.5 of 5 rounds 3-5, and 0 releases the last
    round's model alone.
    """
    if not 0 <= share <= 1:
        raise ValueError(f"the averaged share of rounds must be within 0-1, not {share}")
    return rounds - max(1, math.ceil(share * rounds)) + 1


class TailAverage:
    """The running mean of the global models from round ``first`` on."""

    def __init__(self, first: int) -> None:
        self.first = first
        self.count = 0
        self._mean: dict[str, np.ndarray] = {}

    def update(self, server_round: int, iterate: ArrayRecord) -> ArrayRecord:
        """Take round ``server_round``'s global model; return the model the round releases.

        Before the first averaged round that is the iterate itself; from it on, the mean of the
        iterates of rounds ``first..server_round`` (a round run twice after a resume counts
        once: the resume restores the mean of the rounds before it).
        """
        from flwr.app import Array, ArrayRecord

        if server_round < self.first:
            return iterate
        values = {name: array.numpy() for name, array in iterate.items()}
        self.count += 1
        if self.count == 1:
            self._mean = {name: value.copy() for name, value in values.items()}
        else:
            for name, value in values.items():
                mean = self._mean[name]
                if np.issubdtype(mean.dtype, np.floating):
                    mean += (value - mean) / self.count
                else:  # integer buffers (a counter): not averaged, the latest value
                    self._mean[name] = value.copy()
        return ArrayRecord({name: Array(value.copy()) for name, value in self._mean.items()})

    def state(self, iterate: ArrayRecord) -> dict[str, np.ndarray]:
        """What a checkpoint keeps beside the released mean to go on (empty before ``first``)."""
        if self.count == 0:
            return {}
        return {
            **{f"{_ITERATE}{name}": array.numpy() for name, array in iterate.items()},
            _COUNT: np.asarray([self.count], dtype=np.int64),
            _FIRST: np.asarray([self.first], dtype=np.int64),
        }

    def restore(
        self, last_round: int, released: ArrayRecord, state: Mapping[str, np.ndarray]
    ) -> ArrayRecord:
        """Go on after ``last_round``, whose checkpoint holds ``released`` and ``state``.

        Returns:
            The iterate the next round trains from: the saved one where the checkpoint kept
            one (it was averaged), else the checkpoint's model, which was the iterate.
        """
        from flwr.app import Array, ArrayRecord

        saved = saved_iterate(state)
        if not saved:
            return released
        iterate = ArrayRecord({name: Array(np.asarray(v)) for name, v in saved.items()})
        first = _integer(state, _FIRST)
        if first == self.first:
            self.count = _integer(state, _COUNT) or 0
            self._mean = {name: array.numpy().copy() for name, array in released.items()}
        elif last_round >= self.first:
            # The run was planned with another number of rounds or share: its mean covers
            # other rounds. Start the mean again with the next round rather than mix them.
            logger.warning(
                "round %d's checkpoint averages the rounds from %s on; this run averages from "
                "round %d on: the released mean starts again at round %d",
                last_round,
                first,
                self.first,
                last_round + 1,
            )
            self.first = last_round + 1
        return iterate

    @staticmethod
    def is_state(key: str) -> bool:
        """Whether a state key is this class's (not the strategy's)."""
        return key.startswith(_ITERATE) or key in (_COUNT, _FIRST)


def _integer(state: Mapping[str, np.ndarray], key: str) -> int | None:
    value = state.get(key)
    return None if value is None else int(np.asarray(value).reshape(-1)[0])
