"""The public datasets edufl simulates on, behind one convention so experiments are generic.

As in FLamby, every dataset module exposes the same names:

- ``NAME``, ``CITATION``, ``SPEC_PATH`` (its data contract), ``WEEKS`` (sequence length);
- ``NATURAL_PARTITIONS`` (name → description) and ``DEFAULT_PARTITION``;
- ``spec(week=None)``: the contract, or its "as of week K" variant;
- ``load(path, *, week=None)``: the download (a folder or its zip) as `PooledTables`;
- ``to_exports(path, out_dir, *, partition, week, seed, alpha, clients)``: one institution
  export per part, ``spec.toml`` and a ``partitions.toml`` manifest; returns the folders.

Besides its natural partitions every dataset offers ``pooled`` (one export: the centralized
view) and the synthetic ``dirichlet`` and ``size-skew`` partitions of `simulations.partition`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from shared_models.data.contract import FeatureSpec
from shared_models.errors import DataContractError
from simulations.datasets.oulad import loader as oulad
from simulations.datasets.uci import loader as uci
from simulations.partition import SYNTHETIC_PARTITIONS, PooledTables


class DatasetModule(Protocol):
    """What a dataset module provides (a module satisfies this protocol structurally)."""

    NAME: str
    CITATION: str
    SPEC_PATH: Path
    WEEKS: int
    NATURAL_PARTITIONS: dict[str, str]
    DEFAULT_PARTITION: str

    def spec(self, week: int | None = None) -> FeatureSpec: ...

    def load(self, path: Path | str, *, week: int | None = None) -> PooledTables: ...

    def to_exports(
        self,
        path: Path | str,
        out_dir: Path,
        *,
        partition: str = ...,
        week: int | None = None,
        seed: int = 0,
        alpha: float = 0.5,
        clients: int | None = None,
    ) -> list[Path]: ...


DATASETS: dict[str, DatasetModule] = {"oulad": oulad, "uci": uci}


def get(name: str) -> DatasetModule:
    """The dataset module called ``name``."""
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise DataContractError(
            f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}"
        ) from None


def partitions(name: str) -> tuple[str, ...]:
    """Every partition ``name`` offers: its natural ones, ``pooled``, then the synthetic ones."""
    return (*get(name).NATURAL_PARTITIONS, "pooled", *SYNTHETIC_PARTITIONS)
