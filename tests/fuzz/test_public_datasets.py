"""Hostile public-dataset downloads (OULAD, UCI Student Performance) for the researchers' import.

Through the loaders `edufl simulate import` calls (`simulations.datasets.oulad.loader.load`,
`uci.load`): a
`DataContractError` naming the file, or tables.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared_models.errors import DataContractError
from simulations.datasets.oulad import loader as oulad
from simulations.datasets.uci import loader as uci
from tests.fuzz.harness import call, fuzz
from tests.fuzz.mutations import byte_damage
from tests.simulations.datasets.test_uci import _write as write_uci
from tests.simulations.oulad_fixture import FILES as OULAD_FILES
from tests.simulations.oulad_fixture import write_oulad


@pytest.fixture(scope="module")
def oulad_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_oulad(tmp_path_factory.mktemp("fuzz-oulad") / "oulad")


@pytest.fixture(scope="module")
def uci_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_uci(tmp_path_factory.mktemp("fuzz-uci") / "uci")


STREAMED = "studentVle.csv"


@fuzz(20)
@given(name=st.sampled_from(sorted(OULAD_FILES)), data=st.data())
def test_a_damaged_oulad_download_is_refused_with_the_file_named(
    oulad_dir: Path, name: str, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(oulad_dir, Path(tmp) / "oulad"))
        path = folder / name
        path.write_bytes(data.draw(byte_damage(path.read_bytes()), label="bytes"))
        call(
            "OULAD download (CSV)",
            lambda: oulad.load(folder),
            names=[name, str(folder)],
        )


@fuzz(15)
@given(name=st.sampled_from(sorted(uci.SUBJECTS.values())), data=st.data())
def test_a_damaged_uci_download_is_refused_with_the_file_named(
    uci_dir: Path, name: str, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(uci_dir, Path(tmp) / "uci"))
        path = folder / name
        path.write_bytes(data.draw(byte_damage(path.read_bytes()), label="bytes"))
        call("UCI download (CSV)", lambda: uci.load(folder), names=[name, str(folder)])


def _repeat_first_row(data: bytes) -> bytes:
    lines = data.split(b"\r\n")
    return b"\r\n".join([*lines[:2], lines[1], *lines[2:]])


#: (file, damage) found by the fuzzing above, each once a traceback (where, in the comment).
REPORTED = {
    # simulations/datasets/sources.py DatasetFiles.chunks, pd.read_csv(nrows=0): EmptyDataError
    ("studentVle.csv", "empty file"): lambda b: b"",
    # same line: UnicodeDecodeError
    ("studentVle.csv", "UTF-16"): lambda b: b.decode().encode("utf-16"),
    # sources.py _raise_first_bad_integer's re-read: ParserError
    ("studentVle.csv", "unclosed quote"): lambda b: b + b'"AAA,',
    # sources.py chunks re-raises pandas' OverflowError: integers() accepts 20 digits
    ("studentVle.csv", "20-digit count"): lambda b: b.replace(b'"4"', b'"9' + b"9" * 19 + b'"', 1),
    # simulations/datasets/oulad/loader.py read(): reg_key.get_indexer on a non-unique index:
    # InvalidIndexError
    ("courses.csv", "repeated row"): _repeat_first_row,
}


@pytest.mark.parametrize(("name", "damage"), sorted(REPORTED))
def test_known_oulad_loader_bugs_are_refused_with_the_file_named(
    oulad_dir: Path, tmp_path: Path, name: str, damage: str
) -> None:
    folder = Path(shutil.copytree(oulad_dir, tmp_path / "oulad"))
    path = folder / name
    path.write_bytes(REPORTED[(name, damage)](path.read_bytes()))
    with pytest.raises(DataContractError, match=name):
        oulad.load(folder)
