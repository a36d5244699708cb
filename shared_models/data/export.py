"""Reading an institution export from disk: three tables, CSV or Parquet, plus a mapping file.

An export directory holds ``students``, ``activity`` and (for training) ``outcomes`` tables, each
as ``.csv`` or ``.parquet``. Cells are read as text so that validation can name the exact file,
row and column of every bad value; nothing here interprets numbers yet.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shared_models.data.mapping import TABLES, ColumnMapping
from shared_models.errors import DataContractError

#: Cell texts read as "missing". OULAD uses the empty string; other exports use NA-like words.
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
SUFFIXES = (".csv", ".parquet")


@dataclass(frozen=True)
class RawTable:
    """One table as text cells, columns already renamed to contract names.

    Attributes:
        name: ``students``, ``activity`` or ``outcomes``.
        path: the file it came from.
        frame: all cells as ``str`` ("" for missing), index 0..n-1 in file order.
        original_columns: contract column name → column name in the file (for messages).
    """

    name: str
    path: Path
    frame: pd.DataFrame
    original_columns: dict[str, str]

    def where(self, row: int, column: str | None = None) -> str:
        """Human location of a cell: ``activity.csv line 17, column 'quiz_score'``."""
        pos = f"line {row + 2}" if self.path.suffix == ".csv" else f"row {row + 1}"
        col = ""
        if column is not None:
            shown = self.original_columns.get(column, column)
            col = f", column '{shown}'" if shown == column else f", column '{shown}' ({column})"
        return f"{self.path.name} {pos}{col}"


def locate_table(data_dir: Path, table: str, mapping: ColumnMapping) -> Path | None:
    """The file holding ``table``, or None when absent; refuses an ambiguous pair."""
    named: str | None = getattr(mapping.files, table)
    if named is not None:
        path = data_dir / named
        if not path.is_file():
            raise DataContractError(f"{path}: file named for '{table}' in the mapping is missing")
        return path
    found = [data_dir / f"{table}{s}" for s in SUFFIXES if (data_dir / f"{table}{s}").is_file()]
    if len(found) > 1:
        raise DataContractError(
            f"{data_dir}: both {found[0].name} and {found[1].name} exist; keep one of them"
        )
    return found[0] if found else None


def read_table(path: Path, table: str, mapping: ColumnMapping) -> RawTable:
    """Read one table as text cells and apply the mapping's column renames."""
    if path.suffix == ".parquet":
        frame = _read_parquet(path)
    elif path.suffix == ".csv":
        frame = _read_csv(path)
    else:
        raise DataContractError(f"{path}: unsupported file type; use .csv or .parquet")
    frame.columns = [str(c).strip() for c in frame.columns]
    renames = mapping.renames(table)
    original = {renames.get(c, c): c for c in frame.columns}
    frame = frame.rename(columns=renames)
    if frame.columns.duplicated().any():
        dupes = sorted(set(frame.columns[frame.columns.duplicated()]))
        raise DataContractError(f"{path}: column(s) {dupes} appear more than once (after mapping)")
    return RawTable(name=table, path=path, frame=frame, original_columns=original)


def read_export(data_dir: Path, mapping: ColumnMapping) -> dict[str, RawTable]:
    """All tables present in ``data_dir`` (``outcomes`` may be absent for scoring-only exports)."""
    if not data_dir.is_dir():
        raise DataContractError(f"{data_dir}: not a directory; pass an institution export folder")
    tables: dict[str, RawTable] = {}
    for table in TABLES:
        path = locate_table(data_dir, table, mapping)
        if path is not None:
            tables[table] = read_table(path, table, mapping)
    return tables


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            sample = fh.read(64 * 1024)
    except UnicodeDecodeError:
        raise DataContractError(
            f"{path}: not UTF-8 text; re-save the export as UTF-8 CSV"
        ) from None
    if not sample.strip():
        raise DataContractError(f"{path}: the file is empty; expected a header row")
    try:
        delimiter = csv.Sniffer().sniff(sample.splitlines()[0], delimiters=",;\t").delimiter
    except csv.Error:
        delimiter = ","
    try:
        # The header is read as a row: with header=0, pandas silently turns the leading columns
        # into the index when the first data row has more cells than the header (shifting every
        # value one column), and renames a repeated column "x.1"; both must be reported instead.
        # With header=None a row longer than the header is a ParserError naming its line.
        cells = pd.read_csv(
            path,
            sep=delimiter,
            header=None,
            index_col=False,
            dtype=str,
            keep_default_na=False,
            encoding="utf-8-sig",
            skipinitialspace=True,
        )
    except pd.errors.ParserError as exc:
        raise DataContractError(f"{path}: malformed CSV ({_short(exc)}); check quoting") from None
    except (UnicodeDecodeError, ValueError, OverflowError, MemoryError) as exc:
        raise DataContractError(f"{path}: cannot parse CSV ({_short(exc)})") from None
    if cells.empty:
        raise DataContractError(f"{path}: the file is empty; expected a header row")
    # An empty header cell (a trailing comma, a blank spreadsheet column) is named as pandas
    # would name it, so it is reported as an extra column rather than as a repeated one.
    header = [
        str(c) if not pd.isna(c) and str(c).strip() else f"Unnamed: {i}"
        for i, c in enumerate(cells.iloc[0])
    ]
    frame = cells.iloc[1:].reset_index(drop=True)
    frame.columns = header
    return frame.fillna("")


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        table = pq.ParquetFile(path).read()
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise DataContractError(f"{path}: not a readable Parquet file ({_short(exc)})") from None
    names = [str(n) for n in table.column_names]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataContractError(f"{path}: column(s) {dupes} appear more than once")
    out = pd.DataFrame(index=range(table.num_rows))
    for name, column in zip(names, table.columns, strict=True):
        kind = column.type
        if pa.types.is_nested(kind):
            raise DataContractError(
                f"{path}: column '{name}' holds nested values ({kind}); export one plain "
                "number or text per cell"
            )
        try:
            values = column.to_pylist()
        except (pa.ArrowException, ValueError, OverflowError) as exc:
            raise DataContractError(
                f"{path}: column '{name}' cannot be read ({_short(exc)})"
            ) from None
        out[name] = [_to_text(v, path, name) for v in values]
    return out


def _to_text(value: object, path: Path, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataContractError(
                f"{path}: column '{column}' holds binary data, not UTF-8 text"
            ) from None
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return str(value)


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__


def is_missing(cell: str) -> bool:
    return cell.strip().lower() in MISSING_TOKENS
