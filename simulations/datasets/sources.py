"""The files of a public dataset download: a directory of CSVs, or the zip they come in.

Public datasets ship as a zip or as its unpacked folder; a loader names the files it needs and
gets the same bytes either way. Cells are read as text ("" for missing) so that every bad value
can be reported with its file, line and column; large tables are streamed in chunks.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pandas as pd

from shared_models.errors import DataContractError


class DatasetFiles:
    """Named files of one download, found in a directory (at any depth) or inside a zip."""

    def __init__(
        self,
        path: Path | str,
        required: tuple[str, ...],
        dataset: str,
        optional: tuple[str, ...] = (),
    ) -> None:
        self.path = Path(path)
        self.dataset = dataset
        wanted = set(required) | set(optional)
        if self.path.is_file() and zipfile.is_zipfile(self.path):
            with zipfile.ZipFile(self.path) as zf:
                names = [m for m in zf.namelist() if not m.endswith("/") and "__MACOSX" not in m]
            self._zip = True
        elif self.path.is_dir():
            names = [str(p) for p in sorted(self.path.rglob("*")) if p.is_file()]
            self._zip = False
        else:
            raise DataContractError(
                f"{self.path}: not a directory or a zip file; pass the {dataset} download "
                f"(a folder holding {', '.join(required)}, or the zip they come in)"
            )
        self._found: dict[str, str] = {}
        for found in names:
            base = found.replace("\\", "/").rsplit("/", 1)[-1]
            if base not in wanted:
                continue
            if base in self._found:
                raise DataContractError(
                    f"{self.path}: holds two files named {base} ({self._found[base]} and "
                    f"{found}); keep one"
                )
            self._found[base] = found
        missing = [name for name in required if name not in self._found]
        if missing:
            zips = sorted(p.name for p in self.path.glob("*.zip")) if not self._zip else []
            hint = f"; to read the archive, pass {self.path / zips[0]}" if zips else ""
            raise DataContractError(
                f"{self.path}: not a complete {dataset} download; missing "
                f"{', '.join(missing)}{hint}"
            )

    def where(self, name: str) -> str:
        """The file as a user would find it, for messages."""
        found = self._found[name]
        return f"{self.path}:{found}" if self._zip else found

    @contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        if self._zip:
            with zipfile.ZipFile(self.path) as zf, zf.open(self._found[name]) as fh:
                yield fh
        else:
            with open(self._found[name], "rb") as fh:
                yield fh

    def read_text(self, name: str, columns: tuple[str, ...], sep: str = ",") -> pd.DataFrame:
        """The whole table as text cells; refuses a file that lacks one of ``columns``."""
        with self.open(name) as fh:
            try:
                frame = pd.read_csv(fh, sep=sep, dtype=str, keep_default_na=False)
            except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
                raise DataContractError(f"{self.where(name)}: malformed CSV ({exc})") from None
        frame.columns = [str(c).strip() for c in frame.columns]
        self._check_columns(name, list(frame.columns), columns)
        return frame[list(columns)].astype(str).apply(lambda s: s.str.strip())

    def chunks(self, name: str, columns: tuple[str, ...], chunksize: int) -> Iterator[pd.DataFrame]:
        """Stream an all-integer table in chunks of ``chunksize`` rows (int64 columns).

        The fast path lets pandas parse integers; only when that fails is the file scanned
        again as text to say which line and column hold the bad value.
        """
        try:
            with self.open(name) as fh:
                header = pd.read_csv(fh, nrows=0).columns
        except _UNREADABLE as exc:
            raise self._malformed(name, exc) from None
        self._check_columns(name, [str(c).strip() for c in header], columns)
        try:
            with self.open(name) as fh:
                reader = pd.read_csv(fh, usecols=list(columns), dtype="int64", chunksize=chunksize)
                for chunk in reader:
                    yield chunk[list(columns)]
        except (*_UNREADABLE, OverflowError) as exc:
            self._raise_first_bad_integer(name, columns, chunksize)
            # the text scan found no bad cell: not a cell problem, show pandas' own message
            raise self._malformed(name, exc) from None

    def _raise_first_bad_integer(self, name: str, columns: tuple[str, ...], chunksize: int) -> None:
        offset = 0
        try:
            with self.open(name) as fh:
                for chunk in pd.read_csv(
                    fh, usecols=list(columns), dtype=str, keep_default_na=False, chunksize=chunksize
                ):
                    for col in columns:
                        values = integers(chunk[col], col, self.where(name), first_line=offset + 2)
                        _within_int64(values, chunk[col], col, self.where(name), offset + 2)
                    offset += len(chunk)
        except DataContractError:
            raise
        except _UNREADABLE as exc:
            raise self._malformed(name, exc) from None

    def _malformed(self, name: str, exc: BaseException) -> DataContractError:
        return DataContractError(
            f"{self.where(name)}: malformed CSV ({type(exc).__name__}: {exc}); expected the "
            f"original {self.dataset} file (UTF-8, comma-separated, with its header)"
        )

    def _check_columns(self, name: str, present: list[str], required: tuple[str, ...]) -> None:
        missing = [c for c in required if c not in present]
        if missing:
            raise DataContractError(
                f"{self.where(name)}: column(s) {missing} missing; found {present}. "
                f"Is this the original {self.dataset} file?"
            )


#: What pandas raises on a file that is not a readable CSV at all (empty, wrong encoding,
#: unbalanced quotes, a binary file).
_UNREADABLE = (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError)

_INT64_LIMIT = float(2**63 - 1024)  # the largest float64 below 2**63


def _within_int64(
    values: np.ndarray, cells: pd.Series, column: str, where: str, first_line: int
) -> None:
    """Refuse whole numbers too large for the int64 columns the streamed tables use."""
    huge = np.abs(values) > _INT64_LIMIT
    if huge.any():
        row = int(np.flatnonzero(huge)[0])
        raise DataContractError(
            f"{where} line {first_line + row}, column '{column}': "
            f"'{str(cells.iloc[row]).strip()}' is too large for a count or an identifier"
        )


def integers(
    text: pd.Series, column: str, where: str, *, first_line: int = 2, allow_missing: bool = False
) -> np.ndarray:
    """Whole numbers from text cells as float64 (NaN for missing when allowed).

    ``first_line`` is the file line of the first cell (2 after a header), for the error message.
    """
    cells = text.astype(str).str.strip()
    missing = (cells == "").to_numpy()
    values = pd.to_numeric(cells.where(~missing), errors="coerce").to_numpy(dtype=np.float64)
    bad = (~missing & (np.isnan(values) | (values != np.round(values)))) | (
        missing & (not allow_missing)
    )
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        shown = cells.iloc[row]
        raise DataContractError(
            f"{where} line {first_line + row}, column '{column}': "
            f"'{shown}' is not a whole number{'' if allow_missing else ' (required)'}"
        )
    return values


def numbers(text: pd.Series, column: str, where: str, *, first_line: int = 2) -> np.ndarray:
    """Numbers from text cells as float64, NaN for a missing ("") cell."""
    cells = text.astype(str).str.strip()
    missing = (cells == "").to_numpy()
    values = pd.to_numeric(cells.where(~missing), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~missing & ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataContractError(
            f"{where} line {first_line + row}, column '{column}': "
            f"'{cells.iloc[row]}' is not a number"
        )
    return values


def category(text: pd.Series, categories: tuple[str, ...], column: str, where: str) -> pd.Series:
    """Cells as the contract's categories (matched case-insensitively); "" or "?" is missing."""
    known = {c.lower(): c for c in categories}
    cells = text.str.strip()
    missing = cells.isin(["", "?"])
    out = cells.str.lower().map(known)
    bad = ~missing & out.isna()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataContractError(
            f"{where} line {row + 2}, column '{column}': '{cells.iat[row]}' is not one of: "
            f"{', '.join(categories)}"
        )
    return out.where(~missing, None).astype(object)
