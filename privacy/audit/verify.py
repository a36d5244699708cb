"""The auditor's first check: is the ledger intact?

`verify_ledger` checks each line's form, signature (against the consortium's registered keys)
and place in its institution's chain, and names the first bad entry and why. Whether the claimed
epsilons hold up is `privacy.audit.budget`'s question.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from privacy.ledger.entries import (
    LedgerEntry,
    LedgerError,
    check_entry,
    entry_hash,
    heads,
    parse_entries,
    parse_public_key,
    read_lines,
)
from shared_models.user_files import describe_read_error, load_toml, loads_json, read_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LedgerProblem:
    line: int
    institution: str | None
    seq: int | None
    reason: str

    def __str__(self) -> str:
        who = f" ({self.institution} seq {self.seq})" if self.institution is not None else ""
        return f"line {self.line}{who}: {self.reason}"


@dataclass
class VerifyReport:
    path: Path
    entries: int = 0
    chains: dict[str, int] = field(default_factory=dict)  # institution -> valid entries
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[LedgerProblem] = field(default_factory=list)
    keys_from_registry: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def load_keys(path: Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """Registered public keys by institution: the server's ``institutions.toml`` or ``*.pub``s.

    Raises:
        LedgerError: the registry is missing or unreadable.
    """
    if path.is_dir():
        pubs = sorted(path.glob("*.pub"))
        if not pubs:
            raise LedgerError(f"{path}: no NAME.pub files in this folder")
        return {p.stem: _key(_read_key_file(p), p) for p in pubs}
    try:
        raw = load_toml(path)
    except FileNotFoundError:
        raise LedgerError(f"{path}: no such key registry") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = describe_read_error(exc)
        raise LedgerError(f"{path}: cannot read key registry ({reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise LedgerError(f"{path}: not a key registry ({exc})") from None
    institutions = raw.get("institutions")
    if not isinstance(institutions, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("public_key"), str) for e in institutions.values()
    ):
        raise LedgerError(f"{path}: expected [institutions.NAME] tables with a public_key")
    return {name: _key(entry["public_key"], path, name) for name, entry in institutions.items()}


def _read_key_file(path: Path) -> str:
    try:
        return read_text(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{path}: cannot read public key ({describe_read_error(exc)})") from None


def load_heads(paths: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Expected chain ends from heads JSON files or from the institutions' own ledgers."""
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        if path.suffix == ".jsonl":
            out |= heads(parse_entries(path))
            continue
        try:
            data = loads_json(read_text(path))
            out |= {str(k): _head(v) for k, v in data.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            reason = describe_read_error(exc) if isinstance(exc, OSError) else exc
            raise LedgerError(
                f"{path}: not a heads file ({reason}); expected "
                '{"INSTITUTION": {"seq": N, "hash": "..."}} or an institution\'s ledger.jsonl'
            ) from None
    return out


def _head(value: Any) -> dict[str, Any]:
    """One published chain end; refuses what `int()` would silently round or could not take."""
    seq, digest = value["seq"], value["hash"]
    if isinstance(seq, str) and seq.isascii() and seq.isdigit() and len(seq) < 19:
        seq = int(seq)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError(f"seq must be a whole number >= 0, not {seq!r}")
    if not isinstance(digest, str):
        raise ValueError(f"hash must be a text, not {digest!r}")
    return {"seq": seq, "hash": digest}


def verify_ledger(
    path: Path,
    keys: Mapping[str, ec.EllipticCurvePublicKey] | None = None,
    expected_heads: Mapping[str, Mapping[str, Any]] | None = None,
) -> VerifyReport:
    """Check every line of a ledger; `VerifyReport.problems` lists the bad ones, first first.

    Without ``keys`` each chain is checked against the key of its first entry (a consistent
    chain, but not proof of who signed it). Without ``expected_heads`` entries removed from the
    *end* of a chain cannot be noticed.
    """
    if not path.is_file():
        raise LedgerError(f"{path}: no such ledger file")
    report = VerifyReport(path, keys_from_registry=keys is not None)
    lines, torn = read_lines(path)
    last: dict[str, LedgerEntry] = {}
    bad_last: dict[str, bool] = {}
    hashes: dict[tuple[str, int], str] = {}
    for number, raw in enumerate(lines, start=1):
        report.entries += 1
        if torn and number == len(lines):
            report.problems.append(LedgerProblem(number, None, None, "incomplete last line"))
            break
        name = _institution_of(raw)
        if keys is not None and name is not None and name not in keys:
            reason = f"institution {name!r} is not in the key registry"
            report.problems.append(LedgerProblem(number, name, None, reason))
            continue
        prev = last.get(name) if name is not None else None
        key = keys[name] if keys is not None and name is not None else None
        if key is None and prev is not None:
            # Without a registry, pin the chain's key; a bad one was reported with its entry.
            with contextlib.suppress(LedgerError):
                key = parse_public_key(prev.public_key)
        entry, problem = check_entry(
            raw, prev, key, check_prev_hash=name is None or not bad_last.get(name, False)
        )
        if entry is None:
            report.problems.append(LedgerProblem(number, name, None, str(problem)))
            continue
        if problem is not None:
            report.problems.append(LedgerProblem(number, entry.institution, entry.seq, problem))
        else:
            report.chains[entry.institution] = report.chains.get(entry.institution, 0) + 1
            hashes[(entry.institution, entry.seq)] = entry_hash(entry.model_dump())
        last[entry.institution] = entry
        bad_last[entry.institution] = problem is not None
    report.heads = heads(list(last.values()))
    for name, head in (expected_heads or {}).items():
        problem = _head_problem(name, head, last.get(name), hashes)
        if problem is not None:
            report.problems.append(LedgerProblem(len(lines) + 1, name, None, problem))
    return report


def _head_problem(
    name: str, head: Mapping[str, Any], end: LedgerEntry | None, hashes: Mapping[Any, str]
) -> str | None:
    seq = int(head["seq"])
    if end is None or end.seq < seq:
        ends = "no entries" if end is None else f"ends at seq {end.seq}"
        return f"{name}'s chain {ends}, but its head is seq {seq}: entries were removed at the end"
    if hashes.get((name, seq)) != head["hash"]:
        return f"{name}'s entry seq {seq} differs from the head it published"
    return None


def _institution_of(raw: bytes) -> str | None:
    try:
        obj = loads_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    name = obj.get("institution") if isinstance(obj, dict) else None
    return name if isinstance(name, str) else None


def _key(line: str, where: Path, name: str | None = None) -> ec.EllipticCurvePublicKey:
    try:
        return parse_public_key(line)
    except LedgerError as exc:
        who = f" [institutions.{name}]" if name is not None else ""
        raise LedgerError(f"{where}{who}: {exc}") from None
