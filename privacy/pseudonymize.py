"""Pseudonymising an institution export before it enters edufl.

Local student numbers become keyed pseudonyms, ``HMAC-SHA256(secret, id)``: the same student
gets the same pseudonym in every table and every export made with the same secret, and without
the secret nobody can recompute or reverse them (a plain hash of a student number can be
brute-forced in seconds). The secret stays at the institution, in a 0600 file, and is never
logged or sent. Only the data contract's columns are written out, so direct identifiers (names,
e-mail addresses, ...) and anything else the contract does not need are dropped. A k-anonymity
report lists combinations of static attributes shared by fewer than k students.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import tomli_w

from privacy.keys import write_files_atomic, write_private
from shared_models.data.contract import STUDENT_ID, TERM, WEEK, FeatureSpec
from shared_models.data.export import read_export
from shared_models.data.identifiers import identifier_kind_by_name, identifier_kind_by_values
from shared_models.data.mapping import TABLES, find_mapping
from shared_models.errors import EduflError

logger = logging.getLogger(__name__)

SECRET_BYTES = 32
PSEUDONYM_HEX = 24  # 96 bits: collisions are negligible for any student population
_DOMAIN = b"edufl student_id v1\x00"  # separates these HMACs from any other use of the key


class PseudonymizeError(EduflError, ValueError):
    """The secret or the folders cannot be used for pseudonymisation as given."""


@dataclass
class PseudonymizeReport:
    """What `pseudonymize_export` wrote and dropped, and the k-anonymity findings."""

    out_dir: Path
    k: int
    rows: dict[str, int] = field(default_factory=dict)
    students: int = 0
    dropped: list[tuple[str, str, str]] = field(default_factory=list)  # table, column, why
    quasi_identifiers: list[str] = field(default_factory=list)
    groups: int = 0
    small_groups: list[tuple[dict[str, str], int]] = field(default_factory=list)

    @property
    def students_in_small_groups(self) -> int:
        return sum(size for _, size in self.small_groups)


def load_or_create_secret(path: Path) -> bytes:
    """The institution's pseudonymisation secret; a new random one (mode 0600) if absent.

    Raises:
        PseudonymizeError: the file is readable by others, or does not hold a secret.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private(path, secrets.token_bytes(SECRET_BYTES).hex().encode("ascii") + b"\n")
        logger.warning("created a new pseudonymisation secret in %s; back it up", path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PseudonymizeError(
            f"{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`"
        )
    try:
        secret = bytes.fromhex(path.read_text("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise PseudonymizeError(f"{path}: not a secret written by edufl (hex)") from None
    if len(secret) < 16:
        raise PseudonymizeError(f"{path}: the secret is too short (at least 16 bytes)")
    return secret


def pseudonym(secret: bytes, local_id: str) -> str:
    """The keyed pseudonym of one local student number (surrounding spaces ignored)."""
    digest = hmac.new(secret, _DOMAIN + local_id.strip().encode("utf-8"), hashlib.sha256)
    return "p" + digest.hexdigest()[:PSEUDONYM_HEX]


def contract_columns(spec: FeatureSpec) -> dict[str, list[str]]:
    """The columns each table may keep."""
    return {
        "students": [STUDENT_ID, TERM, *(a.name for a in spec.static)],
        "activity": [STUDENT_ID, TERM, WEEK, *spec.dynamic_names],
        "outcomes": [STUDENT_ID, TERM, spec.target.grade_column, spec.target.result_column],
    }


def pseudonymize_export(
    in_dir: Path,
    out_dir: Path,
    secret: bytes,
    spec: FeatureSpec,
    *,
    k: int = 5,
    quasi_identifiers: list[str] | None = None,
    mapping_path: Path | None = None,
) -> PseudonymizeReport:
    """Write a pseudonymised copy of the export in ``in_dir`` to ``out_dir`` (CSV).

    Columns come out under their contract names; the mapping's value codes and scales, which
    validation still needs, are kept in ``out_dir/mapping.toml``.

    Args:
        quasi_identifiers: static columns the k-anonymity report groups by; the spec's
            categorical attributes by default (numeric ones need generalising first).

    Raises:
        PseudonymizeError: ``out_dir`` is ``in_dir`` or already holds an export.
        DataContractError: the export cannot be read.
    """
    if k < 2:
        raise PseudonymizeError(f"k must be at least 2, got {k}")
    if out_dir.resolve() == in_dir.resolve():
        raise PseudonymizeError("OUT_DIR must differ from IN_DIR; the original is never changed")
    existing = [p.name for p in out_dir.glob("*") if p.stem in TABLES]
    if existing:
        raise PseudonymizeError(f"{out_dir} already holds {existing}; choose an empty folder")
    mapping = find_mapping(in_dir, mapping_path)
    tables = read_export(in_dir, mapping)
    keep = contract_columns(spec)
    report = PseudonymizeReport(out_dir=out_dir, k=k)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache: dict[str, str] = {}

    def pseudonym_of(value: str) -> str:
        if not value.strip():
            return value  # a missing id stays missing; validation reports the row
        if value not in cache:
            cache[value] = pseudonym(secret, value)
        return cache[value]

    # Pseudonymous records are still personal data: owner-only, like the secret. Nothing is
    # written until every table is done, and then all of them at once (no half-written export).
    outputs: dict[Path, tuple[bytes, int]] = {}
    for name, table in tables.items():
        frame = table.frame
        for col in frame.columns:
            if col not in keep[name]:
                shown = table.original_columns.get(col, col)
                kind = identifier_kind_by_name(col) or identifier_kind_by_values(
                    frame[col].tolist(), numbers_allowed=False
                )
                why = f"direct identifier ({kind})" if kind else "not in the data contract"
                report.dropped.append((table.path.name, shown, why))
        frame = frame[[c for c in keep[name] if c in frame.columns]].copy()
        if STUDENT_ID in frame.columns:
            frame[STUDENT_ID] = [pseudonym_of(v) for v in frame[STUDENT_ID]]
        outputs[out_dir / f"{name}.csv"] = (frame.to_csv(index=False).encode("utf-8"), 0o600)
        report.rows[name] = len(frame)
    if len(set(cache.values())) != len({v.strip() for v in cache}):
        raise PseudonymizeError("two student numbers got the same pseudonym; use a new secret")
    report.students = len({v.strip() for v in cache})
    extra = mapping.model_dump(include={"values", "scale"}, exclude_defaults=True)
    if extra:
        outputs[out_dir / "mapping.toml"] = (tomli_w.dumps(extra).encode("utf-8"), 0o644)
    if "students" in tables:
        _k_anonymity(report, tables["students"].frame, spec, quasi_identifiers)
    write_files_atomic(outputs)
    return report


def _k_anonymity(
    report: PseudonymizeReport,
    students: pd.DataFrame,
    spec: FeatureSpec,
    quasi: list[str] | None,
) -> None:
    default = [a.name for a in spec.static if a.kind == "categorical"]
    columns = [c for c in (quasi or default) if c in students.columns]
    unknown = sorted(set(quasi or []) - set(students.columns))
    if unknown:
        raise PseudonymizeError(f"quasi-identifier column(s) {unknown} are not in students")
    report.quasi_identifiers = columns
    if not columns:
        return
    cells = students[columns].apply(lambda s: s.str.strip().str.lower())
    sizes = (
        students.assign(_id=students[STUDENT_ID].str.strip())
        .groupby([cells[c] for c in columns], dropna=False)["_id"]
        .nunique()
    )
    report.groups = len(sizes)
    small = sizes[sizes < report.k].sort_values()
    for values, size in small.items():
        combo = values if isinstance(values, tuple) else (values,)
        report.small_groups.append(
            ({c: str(v) or "(missing)" for c, v in zip(columns, combo, strict=True)}, int(size))
        )


def render_report(report: PseudonymizeReport, max_groups: int = 20) -> str:
    """The report as lines for the terminal (no student number, no pseudonym)."""
    lines = [f"wrote {report.out_dir}: {report.students} students pseudonymised"]
    lines += [f"  {name:<10} {n:>8} rows" for name, n in report.rows.items()]
    for file, column, why in report.dropped:
        lines.append(f"  dropped {file}, column '{column}': {why}")
    if not report.quasi_identifiers:
        lines.append("  k-anonymity: no categorical static attributes to group by")
        return "\n".join(lines)
    lines.append(
        f"  k-anonymity (k={report.k}) on {', '.join(report.quasi_identifiers)}: "
        f"{report.groups} groups, {len(report.small_groups)} smaller than {report.k} "
        f"({report.students_in_small_groups} students)"
    )
    for combo, size in report.small_groups[:max_groups]:
        attrs = ", ".join(f"{c}={v}" for c, v in combo.items())
        lines.append(f"    {size:>3} student(s): {attrs}")
    if len(report.small_groups) > max_groups:
        lines.append(f"    ... and {len(report.small_groups) - max_groups} more")
    if report.small_groups:
        lines.append(
            "  consider coarser categories (e.g. merge rare programs or age bands) before export"
        )
    return "\n".join(lines)
