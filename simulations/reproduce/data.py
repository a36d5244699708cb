"""The data a reproduction runs on: institution exports of the synthetic consortium, OULAD or UCI.

The synthetic consortium is generated (the embedded default: every experiment runs without a
download). OULAD and UCI are read from a download the user points to (``--data``), or from
``../shared/datasets`` next to a development checkout when that folder exists; edufl never
downloads anything. Each dataset is imported with its natural partition, so a federated run has
one virtual institution per OULAD module presentation or per UCI school.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared_models.data.contract import FeatureSpec, default_spec, load_spec
from simulations.datasets.oulad import loader as oulad
from simulations.datasets.uci import loader as uci
from simulations.partition import MANIFEST, SPEC_FILE, partition_tables, pool_exports, write_exports
from simulations.reproduce.config import ReproductionError
from simulations.synthetic import write_consortium

logger = logging.getLogger(__name__)

#: Where a development checkout keeps the public datasets (``../shared/datasets``).
SHARED_DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


@dataclass(frozen=True)
class DatasetChoice:
    """One ``--dataset`` value: which download, which subjects, which natural partition."""

    name: str
    family: str  # synthetic, oulad or uci
    description: str
    partition: str  # the natural partition: one virtual institution per part
    subjects: tuple[str, ...] = ()  # UCI only
    shared_folder: str = ""  # its folder under ../shared/datasets
    download: str = ""  # where a user gets it


_UCI_URL = "https://archive.ics.uci.edu/dataset/320/student+performance (CC BY 4.0)"
DATASETS: dict[str, DatasetChoice] = {
    "synthetic": DatasetChoice(
        "synthetic", "synthetic", "edufl's synthetic consortium (generated, seed 0; 4 "
        "institutions, 1,200 students, 15 weeks unless --quick)", "institution",
    ),
    "oulad": DatasetChoice(
        "oulad", "oulad", "OULAD, one institution per module presentation",
        oulad.DEFAULT_PARTITION, shared_folder="oulad_sample_AAA",
        download="https://analyse.kmi.open.ac.uk/open_dataset (CC BY 4.0)",
    ),
    "uci": DatasetChoice(
        "uci", "uci", "UCI Student Performance, Math and Portuguese, one institution per school",
        "school", ("mat", "por"), "uci_student_performance", _UCI_URL,
    ),
    "uci-por": DatasetChoice(
        "uci-por", "uci", "UCI Student Performance, Portuguese, one institution per school",
        "school", ("por",), "uci_student_performance", _UCI_URL,
    ),
    "uci-mat": DatasetChoice(
        "uci-mat", "uci", "UCI Student Performance, Math, one institution per school",
        "school", ("mat",), "uci_student_performance", _UCI_URL,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class PreparedData:
    """Institution exports ready for training, and the contract they follow."""

    dataset: str
    exports: tuple[Path, ...]
    spec: FeatureSpec
    spec_path: Path | None  # None: the default contract (synthetic)
    week: int | None  # the cut-off week, None for the whole term
    parts: dict[str, dict[str, float]]  # institution -> records, at_risk_rate

    def summary(self) -> str:
        """One line: each institution with its size and at-risk rate."""
        return ", ".join(
            f"{name} ({int(p['records'])} records, {100 * p['at_risk_rate']:.1f} % at risk)"
            for name, p in self.parts.items()
        )


def choice(dataset: str) -> DatasetChoice:
    """The dataset called ``dataset``."""
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ReproductionError(
            f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}"
        ) from None


def resolve_source(dataset: str, data: Path | None) -> Path | None:
    """The download to read for ``dataset`` (None for the generated synthetic consortium).

    Raises:
        ReproductionError: --data given for synthetic, a path that does not exist, or no path
            and no ``../shared/datasets`` copy (the message says where to get the data).
    """
    chosen = choice(dataset)
    if chosen.family == "synthetic":
        if data is not None:
            raise ReproductionError(
                "the synthetic consortium is generated, not read: drop --data, or choose "
                "--dataset oulad or uci to read a download"
            )
        return None
    if data is not None:
        if not data.exists():
            raise ReproductionError(
                f"--data {data}: no such file or folder; pass the {chosen.family.upper()} download "
                f"(its folder of CSV files, or the zip), from {chosen.download}"
            )
        return data
    shared = SHARED_DATASETS / chosen.shared_folder
    if shared.is_dir():
        return shared
    raise ReproductionError(
        f"--dataset {dataset} needs the {chosen.family.upper()} download: pass --data PATH (its "
        f"folder of CSV files, or the zip). Get it from {chosen.download}; edufl never "
        "downloads data itself"
    )


def prepare(
    dataset: str,
    source: Path | None,
    out_dir: Path,
    *,
    week: int | None = None,
    quick: bool = False,
) -> PreparedData:
    """Write the exports of ``dataset`` (as known at the end of ``week``) under ``out_dir``.

    ``quick`` shrinks only the synthetic consortium (2 institutions, 120 students); a public
    dataset is always read whole.
    """
    chosen = choice(dataset)
    folder = out_dir / (f"{dataset}-week{week:02d}" if week else f"{dataset}-full")
    if chosen.family == "synthetic":
        return _synthetic(folder, out_dir / f"{dataset}-full", week, quick)
    assert source is not None, "resolve_source first"
    logger.info("importing %s from %s into %s", dataset, source, folder)
    if chosen.family == "oulad":
        oulad.to_exports(source, folder, partition=chosen.partition, week=week)
    else:
        uci.to_exports(
            source, folder, partition=chosen.partition, week=week, subjects=chosen.subjects
        )
    return _prepared(dataset, folder, week, load_spec(folder / SPEC_FILE), folder / SPEC_FILE)


def _synthetic(folder: Path, full: Path, week: int | None, quick: bool) -> PreparedData:
    spec = default_spec()
    if not (full / "consortium.toml").is_file():
        institutions, students = (2, 120) if quick else (4, 1200)
        write_consortium(full, institutions=institutions, students=students, seed=0, spec=spec)
    exports = sorted(p for p in full.iterdir() if p.is_dir())
    if week is None or week == spec.weeks:
        parts = {p.name: _rates(p, spec) for p in exports}
        return PreparedData("synthetic", tuple(exports), spec, None, week, parts)
    if not 1 <= week <= spec.weeks:
        raise ReproductionError(f"cut-off week {week} is outside the synthetic term 1-{spec.weeks}")
    # Each synthetic week holds only that week's values, so dropping later rows gives exactly
    # what an institution knew at the end of ``week``.
    cut = spec.model_copy(update={"weeks": week})
    tables = pool_exports(exports)
    keep = pd.to_numeric(tables.activity["week"], errors="coerce") <= week
    tables = type(tables)(
        tables.students, tables.activity[keep.to_numpy()], tables.outcomes, tables.groups
    )
    write_exports(
        partition_tables(tables, cut, "source"),
        folder,
        cut,
        about={"dataset": "synthetic", "source": str(full), "weeks": week},
    )
    return _prepared("synthetic", folder, week, cut, folder / SPEC_FILE)


def _prepared(
    dataset: str, folder: Path, week: int | None, spec: FeatureSpec, spec_path: Path
) -> PreparedData:
    manifest = tomllib.loads((folder / MANIFEST).read_text("utf-8"))
    parts = {
        name: {"records": float(p["records"]), "at_risk_rate": float(p["at_risk_rate"])}
        for name, p in manifest["parts"].items()
    }
    exports = tuple(folder / name for name in parts)
    return PreparedData(dataset, exports, spec, spec_path, week, parts)


def _rates(export: Path, spec: FeatureSpec) -> dict[str, float]:
    """Records and at-risk rate of a synthetic export (its manifest does not list them)."""
    tables = pool_exports([export])
    risk = tables.at_risk(spec)
    rate = float(np.nanmean(risk)) if np.isfinite(risk).any() else float("nan")
    return {"records": float(len(tables)), "at_risk_rate": rate}
