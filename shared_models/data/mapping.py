"""Column-mapping files: let an export with other column names, codes or units meet the contract.

A mapping file (``mapping.toml`` in the export directory, or passed explicitly) says, per table,
which export column holds each contract column, how export codes translate into the contract's
categories, and by what factor a value must be multiplied (e.g. attendance in percent → share)::

    [files]                       # optional: file names other than students/activity/outcomes.csv
    activity = "lms_weekly_2024.csv"

    [columns.students]            # contract column = export column
    student_id = "pseudo_id"
    program = "faculty"

    [values.gender]               # export code = contract category
    F = "female"
    M = "male"

    [scale]
    attendance_rate = 0.01        # the export has percentages
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared_models.errors import DataContractError
from shared_models.user_files import describe_read_error, load_toml

TABLES = ("students", "activity", "outcomes")
MAPPING_FILE = "mapping.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TableFiles(_Strict):
    students: str | None = None
    activity: str | None = None
    outcomes: str | None = None


class TableColumns(_Strict):
    students: dict[str, str] = {}
    activity: dict[str, str] = {}
    outcomes: dict[str, str] = {}


class ColumnMapping(_Strict):
    """A validated mapping file; the empty mapping changes nothing."""

    files: TableFiles = TableFiles()
    columns: TableColumns = TableColumns()
    values: dict[str, dict[str, str]] = {}
    scale: dict[str, Annotated[float, Field(gt=0)]] = {}

    def renames(self, table: str) -> dict[str, str]:
        """Export column name → contract column name for ``table``."""
        forward: dict[str, str] = getattr(self.columns, table)
        return {export: contract for contract, export in forward.items()}


def load_mapping(path: Path) -> ColumnMapping:
    """Read and validate a mapping file, with errors that name the file and the key."""
    try:
        raw = load_toml(path)
    except FileNotFoundError:
        raise DataContractError(f"{path}: mapping file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataContractError(
            f"{path}: cannot read mapping file ({describe_read_error(exc)})"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise DataContractError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    try:
        mapping = ColumnMapping.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: "
            + ("unknown key (a typo?)" if e["type"] == "extra_forbidden" else e["msg"])
            for e in exc.errors()
        )
        raise DataContractError(f"{path}: invalid mapping file: {problems}") from None
    for table in TABLES:
        targets = list(getattr(mapping.columns, table).values())
        dupes = sorted({t for t in targets if targets.count(t) > 1})
        if dupes:
            raise DataContractError(
                f"{path}: [columns.{table}] maps several contract columns to {dupes}; "
                "each export column can feed one contract column"
            )
    return mapping


def find_mapping(data_dir: Path, explicit: Path | None) -> ColumnMapping:
    """The mapping given explicitly, else ``DATA_DIR/mapping.toml`` if present, else none."""
    if explicit is not None:
        return load_mapping(explicit)
    default = data_dir / MAPPING_FILE
    return load_mapping(default) if default.is_file() else ColumnMapping()
