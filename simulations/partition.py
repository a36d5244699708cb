"""Splitting a pooled dataset into institution exports: natural groups or synthetic non-IID.

A dataset module turns its download into `PooledTables` (the three export tables of every
record, plus the natural group of each record); a partitioner chooses which records each
simulated institution holds; `write_exports` writes one export folder per institution, the data
contract next to them and a manifest. The same seed gives the same partition and the same bytes.
"""

from __future__ import annotations

import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w

from shared_models.atomic import write_atomic, write_text_atomic
from shared_models.data.contract import STUDENT_ID, TERM, FeatureSpec
from shared_models.data.export import read_export
from shared_models.data.mapping import find_mapping
from shared_models.errors import DataContractError

MANIFEST = "partitions.toml"
SPEC_FILE = "spec.toml"
#: Synthetic partitions every dataset offers, next to its natural ones.
SYNTHETIC_PARTITIONS = {
    "dirichlet": "label skew: each label's records split over clients by Dirichlet(alpha)",
    "size-skew": "size skew: client sizes drawn from Dirichlet(alpha), labels mixed at random",
}


@dataclass(frozen=True)
class PooledTables:
    """A whole dataset as the three export tables, before it is split into institutions.

    Attributes:
        students: one row per record (student_id, term, static attributes).
        activity: one row per record and observed week.
        outcomes: one row per record (student_id, term, grade and/or result column).
        groups: natural partition name → the group of each ``students`` row, e.g.
            ``{"natural-module": ["AAA", ...]}``.
    """

    students: pd.DataFrame
    activity: pd.DataFrame
    outcomes: pd.DataFrame
    groups: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.students)

    def at_risk(self, spec: FeatureSpec) -> np.ndarray:
        """The contract's at-risk label of each record (NaN without an outcome row)."""
        t = spec.target
        out = _align(self.outcomes, self.students)
        empty = pd.Series(np.nan, index=out.index)
        grade = pd.to_numeric(out.get(t.grade_column, empty), errors="coerce")
        result = out.get(t.result_column, empty)
        labels = np.full(len(self), np.nan)
        for i, (g, r) in enumerate(zip(grade, result, strict=True)):
            g = None if pd.isna(g) else float(g)
            r = None if pd.isna(r) or not str(r).strip() else str(r).strip().lower()
            if g is not None or r is not None:
                labels[i] = float(t.at_risk(g, r))
        return labels

    def split(self, parts: dict[str, np.ndarray]) -> dict[str, PooledTables]:
        """The records ``parts[name]`` (positions in ``students``) of each part."""
        keys = pd.MultiIndex.from_frame(self.students[[STUDENT_ID, TERM]].astype(str))
        owner = {
            name: keys.get_indexer(pd.MultiIndex.from_frame(frame[[STUDENT_ID, TERM]].astype(str)))
            for name, frame in (("activity", self.activity), ("outcomes", self.outcomes))
        }
        out = {}
        for name, rows in parts.items():
            rows = np.sort(np.asarray(rows, dtype=np.int64))
            out[name] = PooledTables(
                students=self.students.iloc[rows].reset_index(drop=True),
                activity=self.activity[np.isin(owner["activity"], rows)].reset_index(drop=True),
                outcomes=self.outcomes[np.isin(owner["outcomes"], rows)].reset_index(drop=True),
                groups={k: v[rows] for k, v in self.groups.items()},
            )
        return out


def natural_partition(tables: PooledTables, name: str) -> dict[str, np.ndarray]:
    """One part per natural group (sorted by group name)."""
    if name not in tables.groups:
        raise DataContractError(
            f"unknown natural partition {name!r}; this dataset has: {', '.join(tables.groups)}"
        )
    labels = np.asarray(tables.groups[name]).astype(str)
    return {g: np.flatnonzero(labels == g) for g in sorted(set(labels))}


def dirichlet_partition(
    labels: np.ndarray, clients: int, alpha: float, seed: int, *, min_size: int = 10
) -> dict[str, np.ndarray]:
    """Label skew: the records of each label are split over clients in Dirichlet(alpha) shares.

    Small ``alpha`` (0.1) gives clients dominated by one label, large (100) near-IID clients.
    Draws are repeated (deterministically) until every client holds ``min_size`` records.
    Records without a label (NaN) form a class of their own.
    """
    _check(len(labels), clients, alpha, min_size)
    rng = np.random.default_rng([seed, 1])
    classes = np.where(np.isnan(labels.astype(float)), -1.0, labels.astype(float))
    for _ in range(1000):
        members: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in np.unique(classes):
            idx = rng.permutation(np.flatnonzero(classes == c))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                members[k].append(part)
        parts = [np.sort(np.concatenate(m)) for m in members]
        if min(len(p) for p in parts) >= min_size:
            return {_client(k): p for k, p in enumerate(parts)}
    raise DataContractError(
        f"alpha={alpha} left some of the {clients} clients with fewer than {min_size} records "
        "in 1000 draws; raise --alpha or lower --clients"
    )


def size_skew_partition(
    n: int, clients: int, alpha: float, seed: int, *, min_size: int = 10
) -> dict[str, np.ndarray]:
    """Quantity skew: client sizes in Dirichlet(alpha) shares, records assigned at random."""
    _check(n, clients, alpha, min_size)
    rng = np.random.default_rng([seed, 2])
    for _ in range(1000):
        shares = rng.dirichlet(np.full(clients, alpha))
        sizes = np.floor(shares * n).astype(int)
        sizes[np.argmax(sizes)] += n - sizes.sum()
        if sizes.min() >= min_size:
            order = rng.permutation(n)
            parts = np.split(order, np.cumsum(sizes)[:-1])
            return {_client(k): np.sort(p) for k, p in enumerate(parts)}
    raise DataContractError(
        f"alpha={alpha} left some of the {clients} clients with fewer than {min_size} records "
        "in 1000 draws; raise --alpha or lower --clients"
    )


def partition_tables(
    tables: PooledTables,
    spec: FeatureSpec,
    partition: str,
    *,
    seed: int = 0,
    alpha: float = 0.5,
    clients: int | None = None,
    min_size: int = 10,
) -> dict[str, PooledTables]:
    """Split ``tables`` by a natural partition, ``pooled`` (one part), or a synthetic one."""
    if partition in tables.groups:
        parts = natural_partition(tables, partition)
    elif partition == "pooled":
        parts = {"pooled": np.arange(len(tables))}
    elif partition in SYNTHETIC_PARTITIONS:
        if clients is None:
            raise DataContractError(f"--partition {partition} needs --clients N (at least 2)")
        if partition == "dirichlet":
            labels = tables.at_risk(spec)
            parts = dirichlet_partition(labels, clients, alpha, seed, min_size=min_size)
        else:
            parts = size_skew_partition(len(tables), clients, alpha, seed, min_size=min_size)
    else:
        known = [*tables.groups, "pooled", *SYNTHETIC_PARTITIONS]
        raise DataContractError(
            f"unknown partition {partition!r}; choose one of: {', '.join(known)}"
        )
    return tables.split(parts)


def export_partitions(
    tables: PooledTables,
    spec: FeatureSpec,
    out_dir: Path,
    partition: str,
    *,
    seed: int = 0,
    alpha: float = 0.5,
    clients: int | None = None,
    about: dict[str, object],
) -> list[Path]:
    """`partition_tables` then `write_exports`; the manifest records the partition's settings."""
    parts = partition_tables(tables, spec, partition, seed=seed, alpha=alpha, clients=clients)
    settings: dict[str, object] = {"partition": partition, "seed": seed, "weeks": spec.weeks}
    if partition in SYNTHETIC_PARTITIONS:
        settings |= {"alpha": alpha, "clients": clients}
    return write_exports(parts, out_dir, spec, about={**about, **settings})


def write_exports(
    parts: dict[str, PooledTables], out_dir: Path, spec: FeatureSpec, *, about: dict[str, object]
) -> list[Path]:
    """One export folder per part, ``spec.toml`` and a ``partitions.toml`` manifest.

    Refuses a non-empty ``out_dir`` unless it holds an earlier import (a manifest), whose part
    folders are then replaced. Files are written to a temporary name and renamed into place.
    """
    _prepare(out_dir)
    written, sizes = [], {}
    for name, part in parts.items():
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for table in ("students", "activity", "outcomes"):
            _write_csv(getattr(part, table), folder / f"{table}.csv")
        risk = part.at_risk(spec)
        rate = float(np.nanmean(risk)) if np.isfinite(risk).any() else float("nan")
        sizes[name] = {"records": len(part), "at_risk_rate": round(rate, 4)}
        written.append(folder)
    write_text_atomic(out_dir / SPEC_FILE, spec.to_toml())
    manifest = {**about, "spec_fingerprint": spec.fingerprint, "parts": sizes}
    write_text_atomic(out_dir / MANIFEST, tomli_w.dumps(manifest))
    return written


def pool_exports(folders: list[Path]) -> PooledTables:
    """Pool existing institution exports (text cells, unchanged) to re-partition them.

    The natural group ``source`` is each record's folder name.
    """
    tables: dict[str, list[pd.DataFrame]] = {"students": [], "activity": [], "outcomes": []}
    source: list[np.ndarray] = []
    for folder in folders:
        raw = read_export(Path(folder), find_mapping(Path(folder), None))
        for name in tables:
            if name not in raw:
                raise DataContractError(f"{folder}: no {name} table; pass complete exports")
            tables[name].append(raw[name].frame)
        source.append(np.full(len(raw["students"].frame), Path(folder).name, dtype=object))
    pooled = {k: pd.concat(v, ignore_index=True) for k, v in tables.items()}
    dupes = pooled["students"].duplicated([STUDENT_ID, TERM])
    if dupes.any():
        row = pooled["students"][dupes].iloc[0]
        raise DataContractError(
            f"student {row[STUDENT_ID]!r} (term {row[TERM]!r}) appears in more than one export; "
            "pooled records need distinct (student_id, term) keys"
        )
    return PooledTables(**pooled, groups={"source": np.concatenate(source)})


def _align(frame: pd.DataFrame, students: pd.DataFrame) -> pd.DataFrame:
    keys = pd.MultiIndex.from_frame(students[[STUDENT_ID, TERM]].astype(str))
    own = pd.MultiIndex.from_frame(frame[[STUDENT_ID, TERM]].astype(str))
    return frame.set_axis(own).reindex(keys).reset_index(drop=True)


def _check(n: int, clients: int, alpha: float, min_size: int) -> None:
    if clients < 2:
        raise DataContractError(f"--clients must be at least 2, got {clients}")
    if not alpha > 0:
        raise DataContractError(f"--alpha must be positive, got {alpha}")
    if n < clients * max(min_size, 1):
        raise DataContractError(
            f"{n} records cannot give {clients} clients {min_size} records each; lower --clients"
        )


def _client(k: int) -> str:
    return f"client_{k + 1:02d}"


def _prepare(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataContractError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        previous = tomllib.loads(manifest.read_text("utf-8")).get("parts", {})
        for name in previous:
            folder = out_dir / name
            if folder.is_dir() and folder.parent == out_dir:
                shutil.rmtree(folder)
    elif any(out_dir.iterdir()):
        raise DataContractError(
            f"{out_dir}: not empty and not an earlier import; choose a new or empty folder"
        )


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))
