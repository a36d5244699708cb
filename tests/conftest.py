"""Fixtures shared across packages: a small synthetic consortium, generated once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from simulations.synthetic import write_consortium

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def consortium_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three institutions, 300 students, read-only by convention: copy before damaging."""
    out = tmp_path_factory.mktemp("consortium")
    write_consortium(out, institutions=3, students=300, seed=7)
    return out


@pytest.fixture
def export_copy(consortium_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of one institution's export."""
    dst = tmp_path / "export"
    shutil.copytree(consortium_dir / "institution_01", dst)
    return dst
