"""Poisson sampling of *students* for DP-SGD: each sampled student gives one record per step.

Opacus samples dataset rows. A row here is one (student, term) record, so a student with three
terms would be sampled up to three times per step and give up to three clipped gradients: the
privacy unit would silently be the record, and a student would get about three times the
epsilon. `StudentPoissonSampler` samples students instead: at every step each student is in the
batch with probability ``sample_rate``, and a sampled student contributes exactly one of their
records, chosen uniformly at random. A student's influence on one step is therefore one clipped
gradient (at most ``max_grad_norm`` in L2), whatever the number of terms, and the accountant's
``(sample_rate, steps)`` are per student, as the add/remove-one-student relation requires.

Every decision (who is sampled, which record) is drawn from the node's CSPRNG
(`privacy.noise.SecureRandom`), never from a seed the server knows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from opacus.data_loader import wrap_collate_with_empty
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate

from privacy.noise import SecureRandom

__all__ = ["StudentPoissonSampler", "student_groups", "student_loader"]


def student_groups(
    student_ids: Sequence[Any] | np.ndarray | None, n_records: int
) -> list[np.ndarray]:
    """The record indices of each student (one group per distinct id, in first-seen order).

    ``student_ids`` None (or empty) treats every record as its own student.

    Raises:
        ValueError: there are ids but not one per record.
    """
    if student_ids is None or len(student_ids) == 0:
        return [np.array([i]) for i in range(n_records)]
    ids = np.asarray(student_ids)
    if len(ids) != n_records:
        raise ValueError(f"{len(ids)} student ids for {n_records} records: one per record needed")
    _, first, inverse, counts = np.unique(
        ids, return_index=True, return_inverse=True, return_counts=True
    )
    by_student = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    return [by_student[g] for g in np.argsort(first)]  # in the order students first appear


class StudentPoissonSampler(Sampler[list[int]]):
    """Batches of record indices: each student in with probability ``sample_rate``, one record.

    Yields ``steps`` batches per pass (possibly empty, as Poisson sampling requires); its length
    is ``steps``, so Opacus reads the rate back as ``1 / len(loader)`` when ``steps`` is
    ``round(1 / sample_rate)``.
    """

    def __init__(
        self,
        groups: Sequence[np.ndarray],
        *,
        sample_rate: float,
        steps: int,
        source: SecureRandom,
    ) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        self.groups = [np.asarray(g, dtype=np.int64) for g in groups]
        self.sizes = np.array([len(g) for g in self.groups], dtype=np.int64)
        if (self.sizes < 1).any():
            raise ValueError("every student needs at least one record")
        self.sample_rate = sample_rate
        self.steps = steps
        self.source = source

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.groups)
        for _ in range(self.steps):
            chosen = np.flatnonzero(self.source.bernoulli_mask(n, self.sample_rate))
            # One record per sampled student, uniformly among theirs (floor(u * k) < k).
            picks = np.floor(self.source.uniform(len(chosen)) * self.sizes[chosen]).astype(int)
            yield [int(self.groups[s][p]) for s, p in zip(chosen, picks, strict=True)]


def student_loader(
    loader: DataLoader[Any],
    student_ids: Sequence[Any] | np.ndarray | None,
    *,
    sample_rate: float,
    steps_per_epoch: int,
    source: SecureRandom,
) -> DataLoader[Any]:
    """``loader``'s dataset behind a `StudentPoissonSampler`, empty batches included.

    Only the dataset is kept: batch size, shuffling and sampler of ``loader`` are replaced.
    """
    dataset = loader.dataset
    first = dataset[0]
    return DataLoader(
        dataset,
        batch_sampler=StudentPoissonSampler(
            student_groups(student_ids, len(dataset)),  # type: ignore[arg-type]
            sample_rate=sample_rate,
            steps=steps_per_epoch,
            source=source,
        ),
        collate_fn=wrap_collate_with_empty(
            collate_fn=default_collate,
            sample_empty_shapes=[(0, *torch.as_tensor(t).shape) for t in first],
            dtypes=[torch.as_tensor(t).dtype for t in first],
        ),
    )
