"""Keyed pseudonyms, dropped identifiers and the k-anonymity report."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd
import pytest

from privacy.pseudonymize import (
    PseudonymizeError,
    load_or_create_secret,
    pseudonym,
    pseudonymize_export,
)
from shared_models.data.contract import default_spec
from shared_models.data.validate import validate_export


@pytest.fixture
def raw_export(export_copy: Path) -> Path:
    """An export as it leaves a student-information system: names, e-mails, own column names."""
    students = pd.read_csv(export_copy / "students.csv", dtype=str, keep_default_na=False)
    students.insert(1, "full_name", [f"Student Number{i}" for i in range(len(students))])
    students["email"] = [f"s{i}@uni.example" for i in range(len(students))]
    students = students.rename(columns={"student_id": "matrikel"})
    students.to_csv(export_copy / "students.csv", index=False)
    for table in ("activity", "outcomes"):
        frame = pd.read_csv(export_copy / f"{table}.csv", dtype=str, keep_default_na=False)
        frame.rename(columns={"student_id": "matrikel"}).to_csv(
            export_copy / f"{table}.csv", index=False
        )
    (export_copy / "mapping.toml").write_text(
        "[columns.students]\nstudent_id = 'matrikel'\n"
        "[columns.activity]\nstudent_id = 'matrikel'\n"
        "[columns.outcomes]\nstudent_id = 'matrikel'\n"
    )
    return export_copy


def _ids(out: Path, table: str = "students") -> list[str]:
    return pd.read_csv(out / f"{table}.csv", dtype=str)["student_id"].tolist()


def test_pseudonyms_are_stable_for_a_secret_and_differ_across_secrets(
    raw_export: Path, tmp_path: Path
) -> None:
    spec = default_spec()
    first, second = load_or_create_secret(tmp_path / "a"), load_or_create_secret(tmp_path / "b")

    pseudonymize_export(raw_export, tmp_path / "out1", first, spec)
    pseudonymize_export(raw_export, tmp_path / "out2", first, spec)
    pseudonymize_export(raw_export, tmp_path / "out3", second, spec)

    assert _ids(tmp_path / "out1") == _ids(tmp_path / "out2")
    assert not set(_ids(tmp_path / "out1")) & set(_ids(tmp_path / "out3"))
    local = pd.read_csv(raw_export / "students.csv", dtype=str)["matrikel"].tolist()
    assert _ids(tmp_path / "out1") == [pseudonym(first, s) for s in local]
    assert not set(local) & set(_ids(tmp_path / "out1"))


def test_same_student_gets_the_same_pseudonym_in_every_table(
    raw_export: Path, tmp_path: Path
) -> None:
    secret = load_or_create_secret(tmp_path / "secret")

    pseudonymize_export(raw_export, tmp_path / "out", secret, default_spec())

    students = set(_ids(tmp_path / "out"))
    assert set(_ids(tmp_path / "out", "activity")) <= students
    assert set(_ids(tmp_path / "out", "outcomes")) <= students


def test_identifier_columns_are_dropped_and_the_result_is_a_valid_export(
    raw_export: Path, tmp_path: Path
) -> None:
    spec = default_spec()
    secret = load_or_create_secret(tmp_path / "secret")
    assert not validate_export(raw_export, spec)[0].usable  # names and e-mails are refused

    report = pseudonymize_export(raw_export, tmp_path / "out", secret, spec)

    dropped = {column: why for _, column, why in report.dropped}
    assert dropped["full_name"].startswith("direct identifier (a person's name")
    assert dropped["email"].startswith("direct identifier (an e-mail address")
    columns = pd.read_csv(tmp_path / "out" / "students.csv", nrows=1).columns
    assert {"full_name", "email", "matrikel"}.isdisjoint(columns)
    assert validate_export(tmp_path / "out", spec)[0].usable


def test_groups_smaller_than_k_are_reported(raw_export: Path, tmp_path: Path) -> None:
    secret = load_or_create_secret(tmp_path / "secret")
    students = pd.read_csv(raw_export / "students.csv", dtype=str, keep_default_na=False)
    students.loc[0, ["gender", "age_band", "program"]] = ["diverse", "40+", "arts"]
    students.to_csv(raw_export / "students.csv", index=False)

    report = pseudonymize_export(
        raw_export,
        tmp_path / "out",
        secret,
        default_spec(),
        k=3,
        quasi_identifiers=["gender", "age_band", "program"],
    )

    small = {tuple(combo.values()): size for combo, size in report.small_groups}
    assert small[("diverse", "40+", "arts")] >= 1
    assert all(size < 3 for size in small.values())
    assert report.students_in_small_groups == sum(small.values())


def test_secret_file_is_created_owner_only_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "secret"

    first = load_or_create_secret(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(path) == first and len(first) == 32


def test_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    load_or_create_secret(path)
    os.chmod(path, 0o644)

    with pytest.raises(PseudonymizeError, match="chmod 600"):
        load_or_create_secret(path)


def test_output_over_the_input_or_an_existing_export_is_refused(
    raw_export: Path, tmp_path: Path
) -> None:
    secret = load_or_create_secret(tmp_path / "secret")

    with pytest.raises(PseudonymizeError, match="must differ"):
        pseudonymize_export(raw_export, raw_export, secret, default_spec())
    pseudonymize_export(raw_export, tmp_path / "out", secret, default_spec())
    with pytest.raises(PseudonymizeError, match="already holds"):
        pseudonymize_export(raw_export, tmp_path / "out", secret, default_spec())


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_full_disk_leaves_no_table_of_the_pseudonymized_export(
    raw_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """The tables are written all together: a failure at any of them leaves none behind."""
    import errno

    import shared_models.atomic

    secret = load_or_create_secret(tmp_path / "secret")
    calls = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(shared_models.atomic.os, "fsync", fsync)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        pseudonymize_export(raw_export, out, secret, default_spec())
    assert not out.exists() or not list(out.iterdir()), "a table was left from the failed run"
    monkeypatch.setattr(shared_models.atomic.os, "fsync", real_fsync)
    pseudonymize_export(raw_export, out, secret, default_spec())  # nothing half-written blocks it
    assert {"students.csv", "activity.csv", "outcomes.csv"} <= {p.name for p in out.iterdir()}
