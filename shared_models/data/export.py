"""Reading an institution export from disk: three tables, CSV or Parquet, plus a mapping file.

An export directory holds ``students``, ``activity`` and (for training) ``outcomes`` tables, each
as ``.csv`` or ``.parquet``. Cells are read as text so that validation can name the exact file,
row and column of every bad value; nothing here interprets numbers yet.

The mapping may name one file for several tables (an SIS export with attributes and outcomes in
one row per student), fill key columns the export lacks (``[defaults]``), and declare the
activity table wide (``[wide]``: one column per period and feature), which is reshaped here into
one row per student and period; every cell still knows its line and column in the file.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shared_models.data.contract import WEEK
from shared_models.data.mapping import PERIOD, ROW, TABLES, ColumnMapping
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
        file_columns: every column of the file, as written there.
        missing_mapped: contract column → the export column the mapping names for it, where
            the file has no such column (a typo in mapping.toml).
        added: contract columns filled from the mapping's ``[defaults]``.
        consumed: file columns a reshape turned into rows (not "unused" columns).
        source_rows: for a reshaped table, the file row of each frame row.
        period_of_row: for a reshaped table, the period (0-based) of each frame row.
        period_columns: for a reshaped table, feature → its file column in each period.
    """

    name: str
    path: Path
    frame: pd.DataFrame
    original_columns: dict[str, str]
    file_columns: tuple[str, ...] = ()
    missing_mapped: dict[str, str] = field(default_factory=dict)
    added: frozenset[str] = frozenset()
    consumed: frozenset[str] = frozenset()
    source_rows: np.ndarray | None = None
    period_of_row: np.ndarray | None = None
    period_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def wide(self) -> bool:
        """Reshaped from one row per student (``[wide]`` in the mapping)."""
        return self.source_rows is not None

    def where(self, row: int, column: str | None = None) -> str:
        """Human location of a cell: ``activity.csv line 17, column 'quiz_score'``."""
        line = row if self.source_rows is None else int(self.source_rows[row])
        pos = f"line {line + 2}" if self.path.suffix == ".csv" else f"row {line + 1}"
        col = ""
        if column is not None:
            shown = self.original_columns.get(column, column)
            if column in self.period_columns and self.period_of_row is not None:
                shown = self.period_columns[column][int(self.period_of_row[row])]
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


def read_table(
    path: Path,
    table: str,
    mapping: ColumnMapping,
    *,
    frame: pd.DataFrame | None = None,
    renames: dict[str, str] | None = None,
) -> RawTable:
    """Read one table as text cells and apply the mapping (renames, defaults, reshape).

    ``frame`` is the file already read (a file shared by several tables is read once);
    ``renames`` replaces the table's own renames (those of every table sharing the file).
    """
    frame = read_cells(path) if frame is None else frame.copy()
    file_columns = tuple(frame.columns)
    renames = mapping.renames(table) if renames is None else renames
    own = mapping.renames(table)
    missing = {contract: export for export, contract in own.items() if export not in frame}
    original = {renames.get(c, c): c for c in frame.columns}
    frame = frame.rename(columns=renames)
    if frame.columns.duplicated().any():
        dupes = sorted(set(frame.columns[frame.columns.duplicated()]))
        raise DataContractError(f"{path}: column(s) {dupes} appear more than once (after mapping)")
    added = []
    for column, value in mapping.defaults.items():
        if column not in frame.columns:
            rows = range(1, len(frame) + 1)
            frame[column] = [value.replace(ROW, str(r)) for r in rows] if ROW in value else value
            original[column] = column
            added.append(column)
    raw = RawTable(
        name=table,
        path=path,
        frame=frame,
        original_columns=original,
        file_columns=file_columns,
        missing_mapped=missing,
        added=frozenset(added),
    )
    if table == "activity" and mapping.wide is not None:
        return _reshape_wide(raw, mapping)
    return raw


def _reshape_wide(wide: RawTable, mapping: ColumnMapping) -> RawTable:
    """One row per student → one row per (student, period), keys repeated, ``week`` numbered."""
    assert mapping.wide is not None
    labels = mapping.wide.periods
    n, p = len(wide.frame), len(labels)
    source_rows = np.repeat(np.arange(n), p)
    period_of_row = np.tile(np.arange(p), n)
    long = pd.DataFrame(index=range(n * p))
    original: dict[str, str] = {}
    for key in ("student_id", "term"):
        if key in wide.frame.columns:
            long[key] = wide.frame[key].to_numpy(dtype=object)[source_rows]
            original[key] = wide.original_columns.get(key, key)
    long[WEEK] = (period_of_row + 1).astype(str)
    original[WEEK] = f"[wide] period {'/'.join(labels)}"
    missing = dict(wide.missing_mapped)
    consumed: set[str] = set()
    period_columns: dict[str, tuple[str, ...]] = {}
    in_frame = {file: col for col, file in wide.original_columns.items()}
    for feature, pattern in mapping.patterns().items():
        columns = tuple(pattern.replace(PERIOD, label) for label in labels)
        absent = [c for c in columns if c not in wide.file_columns]
        if absent:
            missing[feature] = absent[0]
            continue
        cells = np.stack([wide.frame[in_frame.get(c, c)].to_numpy() for c in columns], axis=1)
        long[feature] = cells.reshape(-1)
        period_columns[feature] = columns
        original[feature] = pattern
        consumed.update(columns)
    return RawTable(
        name=wide.name,
        path=wide.path,
        frame=long,
        original_columns=original,
        file_columns=wide.file_columns,
        missing_mapped=missing,
        added=wide.added,
        consumed=frozenset(consumed),
        source_rows=source_rows,
        period_of_row=period_of_row,
        period_columns=period_columns,
    )


def read_cells(path: Path) -> pd.DataFrame:
    """A CSV or Parquet file as text cells, header names stripped."""
    if path.suffix == ".parquet":
        frame = _read_parquet(path)
    elif path.suffix == ".csv":
        frame = _read_csv(path)
    else:
        raise DataContractError(f"{path}: unsupported file type; use .csv or .parquet")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def read_export(data_dir: Path, mapping: ColumnMapping) -> dict[str, RawTable]:
    """All tables present in ``data_dir`` (``outcomes`` may be absent for scoring-only exports)."""
    if not data_dir.is_dir():
        raise DataContractError(f"{data_dir}: not a directory; pass an institution export folder")
    paths = {t: locate_table(data_dir, t, mapping) for t in TABLES}
    cells: dict[Path, pd.DataFrame] = {}
    tables: dict[str, RawTable] = {}
    for table, path in paths.items():
        if path is None:
            continue
        sharing = [t for t, q in paths.items() if q == path]
        if len(sharing) == 1:
            tables[table] = read_table(path, table, mapping)
            continue
        if path not in cells:
            cells[path] = read_cells(path)
        tables[table] = read_table(
            path, table, mapping, frame=cells[path], renames=_shared_renames(path, sharing, mapping)
        )
    return tables


def _shared_renames(path: Path, tables: list[str], mapping: ColumnMapping) -> dict[str, str]:
    """One file, several tables: every table's mapped column is renamed in every view of it."""
    merged: dict[str, str] = {}
    for table in tables:
        for export, contract in mapping.renames(table).items():
            if merged.setdefault(export, contract) != contract:
                raise DataContractError(
                    f"{path}: column '{export}' is mapped to both '{merged[export]}' and "
                    f"'{contract}' (tables {', '.join(tables)} share this file); map it once"
                )
    return merged


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
    delimiter = _delimiter(sample)
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


def _delimiter(sample: str) -> str:
    """The separator that splits the first lines into the most, equally many, cells.

    Judging the header alone fails on real exports: UCI's ``;``-separated dropout file has a
    tab inside one header name, and a sniffer reading the header takes the tab.
    """
    lines = sample.splitlines()
    lines = lines[:-1] if len(lines) > 1 and not sample.endswith(("\n", "\r")) else lines
    best, most = "", 1
    for candidate in (",", ";", "\t"):
        try:
            widths = {len(row) for row in csv.reader(lines[:50], delimiter=candidate)}
        except csv.Error:
            continue
        if len(widths) == 1 and (width := widths.pop()) > most:
            best, most = candidate, width
    if best:
        return best
    try:
        return csv.Sniffer().sniff(lines[0], delimiters=",;\t").delimiter
    except csv.Error:
        return ","


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
