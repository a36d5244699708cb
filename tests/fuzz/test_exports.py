"""Hostile institution exports (students / activity / outcomes as CSV or Parquet).

Through `edufl client validate` (exit 0 usable, 1 not usable, never a traceback), the loader
the trainers call (`load_cohort`: a `DataContractError` or a cohort), and the commands that
write outputs (`edufl client score`, `edufl train`), whose existing outputs must survive a
refused export byte for byte.
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import given
from hypothesis import strategies as st

from client.early_warning.store import Store
from shared_models.data.contract import default_spec
from shared_models.data.loader import load_cohort
from tests.fuzz.harness import assert_unchanged, call, cli, digests, fuzz
from tests.fuzz.mutations import HOSTILE_TOKENS, byte_damage

SPEC = default_spec()
TABLES = ("students", "activity", "outcomes")
IDENTIFIER_COLUMNS = ("email", "full_name", "national_id", "date_of_birth", "phone", "e-mail")
IDENTIFIER_VALUES = ("jane.doe@example.edu", "+44 20 7946 0958", "1999-04-01", "123-45-6789")
#: One direct identifier per student, as a careless export would carry it in student_id.
IDENTIFIER_IDS = (
    lambda i: f"student{i}@example.edu",
    lambda i: f"+44 20 7946 {i:04d}",
    lambda i: f"1999-04-{i % 28 + 1:02d}",
    lambda i: f"123-45-{i:04d}",
)
#: Damage that must make an export unusable, whatever else the drawn table holds.
MUST_REFUSE = {"identifier_column", "identifier_ids"}


ENTRY = st.sampled_from(("validate", "load"))


def _check_export(kind: str, folder: Path, damaged: str, entry: str) -> str | None:
    """`edufl client validate`, or the loader trainers call; the refusal's text, if refused."""
    before = digests(folder)
    names = [damaged, str(folder)]
    if entry == "validate":
        result = cli(kind, ["client", "validate", str(folder)], names=names, codes=(0, 1))
        refusal = result.output if result.exit_code else None
    else:
        loaded = call(kind, lambda: load_cohort(folder, SPEC), names=names)
        refusal = str(loaded) if isinstance(loaded, Exception) else None
    assert digests(folder) == before, "validation must never modify the export"
    return refusal


@fuzz(50)
@given(table=st.sampled_from(TABLES), entry=ENTRY, data=st.data())
def test_damaged_csv_bytes_are_reported_never_a_traceback(
    export_dir: Path, table: str, entry: str, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(export_dir, Path(tmp) / "export"))
        path = folder / f"{table}.csv"
        path.write_bytes(data.draw(byte_damage(path.read_bytes()), label="bytes"))
        _check_export("export: CSV bytes", folder, path.name, entry)


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


@st.composite
def wrong_table(draw: st.DrawFn, rows: list[list[str]]) -> tuple[str, str]:
    """A parseable CSV table with the wrong columns, keys, types or values."""
    header, body = list(rows[0]), [list(r) for r in rows[1:]]
    width = len(header)
    col = draw(st.integers(0, width - 1))
    kind = draw(
        st.sampled_from(
            (
                "drop_column",
                "duplicate_column",
                "rename_header",
                "identifier_column",
                "identifier_ids",
                "hostile_cells",
                "wrong_type_column",
                "swap_columns",
                "header_only",
                "no_header",
                "extra_cells",
                "short_rows",
                "duplicate_rows",
                "unicode_header",
                "huge_numbers",
            )
        )
    )
    if kind == "drop_column":
        header.pop(col)
        body = [r[:col] + r[col + 1 :] for r in body]
    elif kind == "duplicate_column":
        header.append(header[col])
        body = [[*r, r[col]] for r in body]
    elif kind == "rename_header":
        header[col] = draw(st.sampled_from(("", " ", "student id", "STUDENT_ID", "week ", "x")))
    elif kind == "identifier_column":
        header.append(draw(st.sampled_from(IDENTIFIER_COLUMNS)))
        body = [[*r, draw(st.sampled_from(IDENTIFIER_VALUES))] for r in body]
    elif kind == "identifier_ids":
        make = draw(st.sampled_from(IDENTIFIER_IDS))
        body = [[make(i), *r[1:]] for i, r in enumerate(body)]
    elif kind == "hostile_cells":
        for r in draw(st.lists(st.integers(0, len(body) - 1), min_size=1, max_size=5)):
            body[r][col] = draw(st.sampled_from(HOSTILE_TOKENS))
    elif kind == "wrong_type_column":
        value = draw(st.sampled_from(("abc", "1,5", "3.2.1", "TRUE", "[1]", "1e5", "-7")))
        body = [[*r[:col], value, *r[col + 1 :]] for r in body]
    elif kind == "swap_columns":
        other = draw(st.integers(0, width - 1))
        for r in [header, *body]:
            r[col], r[other] = r[other], r[col]
    elif kind == "header_only":
        body = []
    elif kind == "no_header":
        header = body.pop(0) if body else header
    elif kind == "extra_cells":
        r = draw(st.integers(0, len(body) - 1))
        body[r] = [*body[r], "extra", "cells"]
    elif kind == "short_rows":
        r = draw(st.integers(0, len(body) - 1))
        body[r] = body[r][: draw(st.integers(0, width - 1))]
    elif kind == "duplicate_rows":
        body = body + body[: draw(st.integers(1, 4))]
    elif kind == "unicode_header":
        header[col] = draw(st.sampled_from(("étudiant", "学生", "\u202estudent_id", "😀", "a\tb")))
    elif kind == "huge_numbers":
        value = draw(st.sampled_from(("1e309", "-1e309", "9" * 400, "nan", "inf", "1e-400")))
        body = [[*r[:col], value, *r[col + 1 :]] for r in body]
    delimiter = draw(st.sampled_from((",", ",", ";", "\t")))
    out = io.StringIO()
    quoting = draw(st.sampled_from((csv.QUOTE_MINIMAL, csv.QUOTE_ALL)))
    csv.writer(out, delimiter=delimiter, quoting=quoting, lineterminator="\n").writerows(
        [header, *body]
    )
    return kind, out.getvalue()


@fuzz(50)
@given(table=st.sampled_from(TABLES), entry=ENTRY, data=st.data())
def test_wrong_columns_keys_and_values_are_named_with_file_and_fix(
    export_dir: Path, table: str, entry: str, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(export_dir, Path(tmp) / "export"))
        path = folder / f"{table}.csv"
        kind, text = data.draw(wrong_table(_rows(path)), label="table")
        path.write_text(text, "utf-8")
        outcome = _check_export("export: CSV structure", folder, path.name, entry)
        if kind in MUST_REFUSE:  # a direct identifier never gets in
            assert outcome is not None, "a direct identifier was accepted"
            assert "identifier" in outcome or "pseudonym" in outcome, outcome


PARQUET_COLUMNS: dict[str, Any] = {
    "list": lambda n: pa.array([[1, 2]] * n),
    "struct": lambda n: pa.array([{"x": 1}] * n),
    "map": lambda n: pa.array([[("k", 1)]] * n, pa.map_(pa.string(), pa.int64())),
    "binary": lambda n: pa.array([b"\xff\xfe"] * n),
    "utf8 binary": lambda n: pa.array([b"pass"] * n),
    "timestamp": lambda n: pa.array([0] * n, pa.timestamp("s")),
    "decimal": lambda n: pa.array([1] * n, pa.decimal128(5, 2)),
    "nan": lambda n: pa.array([float("nan")] * n),
    "inf": lambda n: pa.array([float("inf")] * n),
    "huge int": lambda n: pa.array([2**63 - 1] * n),
    "nulls": lambda n: pa.array([None] * n, pa.null()),
    "bool": lambda n: pa.array([True] * n),
    "dictionary": lambda n: pa.array(["fail"] * n).dictionary_encode(),
    "float16": lambda n: pa.array([1.5] * n, pa.float16()),
}


@fuzz(24)
@given(
    entry=ENTRY,
    table=st.sampled_from(TABLES),
    kind=st.sampled_from(sorted(PARQUET_COLUMNS)),
    replace=st.booleans(),
    duplicate=st.booleans(),
    data=st.data(),
)
def test_parquet_exports_with_odd_types_or_damage_are_reported(
    export_dir: Path,
    entry: str,
    table: str,
    kind: str,
    replace: bool,
    duplicate: bool,
    data: st.DataObject,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(export_dir, Path(tmp) / "export"))
        frame = pd.read_csv(folder / f"{table}.csv", dtype=str, keep_default_na=False)
        arrow = pa.Table.from_pandas(frame, preserve_index=False)
        column = PARQUET_COLUMNS[kind](arrow.num_rows)
        if replace:  # a contract column of the wrong type
            name = data.draw(st.sampled_from(arrow.column_names), label="column")
            arrow = arrow.set_column(arrow.column_names.index(name), name, column)
        else:
            arrow = arrow.append_column("extra", column)
        if duplicate:
            arrow = arrow.append_column(arrow.column_names[0], arrow.column(0))
        (folder / f"{table}.csv").unlink()
        path = folder / f"{table}.parquet"
        pq.write_table(arrow, path)
        if data.draw(st.booleans(), label="damage bytes"):
            path.write_bytes(data.draw(byte_damage(path.read_bytes()), label="bytes"))
        _check_export("export: Parquet", folder, path.name, entry)


@fuzz(5)
@given(table=st.sampled_from(TABLES), data=st.data())
def test_score_with_a_refused_export_leaves_store_and_report_untouched(
    export_dir: Path, model_dir: Path, table: str, data: st.DataObject
) -> None:
    """`edufl client score|report` on a damaged export: exit 2, nothing stored or rewritten."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(export_dir, Path(tmp) / "export"))
        path = folder / f"{table}.csv"
        path.write_bytes(data.draw(_unusable(path.read_bytes()), label="bytes"))
        db = Path(tmp) / "store.sqlite"
        Store(db).close()
        out = Path(tmp) / "report"
        out.mkdir()
        (out / "report.html").write_text("<p>last week's report</p>", "utf-8")
        (out / "students.csv").write_text("student_id,tier\ns1,high\n", "utf-8")
        before = digests(db, out)
        kind = "export: score/report"
        score = ["client", "score", "--data", str(folder), "--model", str(model_dir)]
        cli(kind, [*score, "--db", str(db)], names=[path.name, str(folder)], codes=(2,))
        report = ["client", "report", "--data", str(folder), "--model", str(model_dir)]
        args = [*report, "--out", str(out), "--db", str(db)]
        cli(kind, args, names=[path.name], codes=(2,), count=False)
        assert_unchanged(kind, before, db, out)


def _unusable(valid: bytes) -> st.SearchStrategy[bytes]:
    """Damage that always makes a table unusable (so a command must refuse it)."""
    text = valid.decode()
    header, _, body = text.partition("\n")
    first, _, rest = body.partition("\n")
    return st.sampled_from(
        (
            b"",
            text.encode("utf-16"),
            b"\x89PNG\r\n\x1a\n" + valid,
            f"{header.replace('student_id', 'email')}\n{body}".encode(),
            f"{header}\n{first},extra,cells\n{rest}".encode(),
        )
    )


@fuzz(3)
@given(table=st.sampled_from(TABLES), data=st.data())
def test_train_with_a_refused_export_keeps_the_previous_model(
    export_dir: Path, table: str, data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(export_dir, Path(tmp) / "export"))
        path = folder / f"{table}.csv"
        path.write_bytes(data.draw(_unusable(path.read_bytes()), label="bytes"))
        out = Path(tmp) / "runs"
        out.mkdir()
        for name, text in (("model.json", "{}"), ("model.pt", "weights"), ("results.md", "#")):
            (out / name).write_text(text, "utf-8")
        before = digests(out)
        args = ["train", str(folder), "--out", str(out), "--epochs", "1"]
        cli("export: train", args, names=[path.name, str(folder)], codes=(2,))
        assert_unchanged("export: train", before, out)
