"""Hostile column-mapping files (mapping.toml).

Through `load_mapping` (a `DataContractError` naming the file, or a mapping) and through
`edufl client validate DIR --mapping FILE` on an export that needs the mapping.
"""

from __future__ import annotations

import shutil
import tempfile
import tomllib
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared_models.data.mapping import load_mapping
from tests.fuzz.harness import call, cli, fuzz
from tests.fuzz.mutations import hostile_toml

VALID = b"""\
[files]
activity = "weekly.csv"

[columns.students]
student_id = "pseudo_id"
program = "faculty"

[values.gender]
F = "female"
M = "male"

[scale]
attendance_rate = 0.01
"""
VALID_DOC = tomllib.loads(VALID.decode())


@pytest.fixture(scope="module")
def mapped_export(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export as an institution with other names, codes and units would hand it over."""
    folder = Path(shutil.copytree(export_dir, tmp_path_factory.mktemp("mapped") / "export"))
    students = pd.read_csv(folder / "students.csv", dtype=str, keep_default_na=False)
    students = students.rename(columns={"student_id": "pseudo_id", "program": "faculty"})
    students["gender"] = students["gender"].map({"female": "F", "male": "M"}).fillna("")
    students.to_csv(folder / "students.csv", index=False)
    activity = pd.read_csv(folder / "activity.csv", dtype=str, keep_default_na=False)
    activity["attendance_rate"] = [
        "" if v == "" else f"{100 * float(v):g}" for v in activity["attendance_rate"]
    ]
    activity.to_csv(folder / "weekly.csv", index=False)
    (folder / "activity.csv").unlink()
    (folder / "mapping.toml").write_bytes(VALID)
    return folder


def test_the_valid_mapping_makes_the_export_usable(mapped_export: Path) -> None:
    cli("mapping.toml", ["client", "validate", str(mapped_export)], names=[], codes=(0,))


@fuzz(250)
@given(data=st.data())
def test_hostile_mapping_files_fail_with_the_file_named(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mapping.toml"
        path.write_bytes(data.draw(hostile_toml(VALID, VALID_DOC), label="mapping"))
        call("mapping.toml", lambda: load_mapping(path), names=[str(path)])


@fuzz(25)
@given(explicit=st.booleans(), data=st.data())
def test_validate_with_a_hostile_mapping_reports_it_and_exits_1(
    mapped_export: Path, explicit: bool, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(mapped_export, Path(tmp) / "export"))
        path = folder / "mapping.toml" if not explicit else Path(tmp) / "other mapping.toml"
        path.write_bytes(data.draw(hostile_toml(VALID, VALID_DOC), label="mapping"))
        args = ["client", "validate", str(folder)]
        args += ["--mapping", str(path)] if explicit else []
        cli("mapping.toml", args, names=[str(path), path.name, str(folder)], codes=(0, 1))
