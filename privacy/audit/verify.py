"""The auditor's first check: is the ledger intact?

`verify_ledger` checks each line's form, signature (against the consortium's registered keys)
and place in its institution's chain, that every registered institution appears, and that each
chain ends where its institution's own signed head says; it names the first bad entry and why.
A ledger is *intact* only when all of that was checked: without a key registry anyone could
have signed the chains, and without heads entries cut from the end of a chain cannot be seen.
`find_evidence` finds the registry and the heads where they are at hand (a simulation's run
folder keeps every institution's keys and own ledger). Whether the claimed epsilons hold up is
`privacy.audit.budget`'s question.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from privacy.ledger.entries import (
    LEDGER_FILE,
    LedgerEntry,
    LedgerError,
    check_entry,
    entry_hash,
    heads,
    parse_entries,
    parse_public_key,
    read_lines,
    same_key,
)
from shared_models.user_files import describe_read_error, load_toml, loads_json, read_text

logger = logging.getLogger(__name__)

#: The server's key registry (`server.institutions`; privacy cannot import server).
REGISTRY_FILE = "institutions.toml"


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
    tails_checked: list[str] = field(default_factory=list)  # chains compared with a head
    tails_unchecked: list[str] = field(default_factory=list)  # chains without one
    absent: list[str] = field(default_factory=list)  # registered, declared to have no entries

    @property
    def ok(self) -> bool:
        """No problem found (which proves little without keys and heads: see `intact`)."""
        return not self.problems

    @property
    def intact(self) -> bool:
        """No problem, signatures checked against a registry and every chain against a head."""
        return self.ok and self.keys_from_registry and not self.tails_unchecked

    @property
    def verdict(self) -> str:
        """INTACT, TAMPERED OR DAMAGED, UNAUTHENTICATED or TAIL UNCHECKED."""
        if not self.ok:
            return "TAMPERED OR DAMAGED"
        if not self.keys_from_registry:
            return "UNAUTHENTICATED"
        return "TAIL UNCHECKED" if self.tails_unchecked else "INTACT"


@dataclass(frozen=True)
class Evidence:
    """What a ledger is checked against: the key registry and the chains' expected ends."""

    keys: dict[str, ec.EllipticCurvePublicKey] | None
    keys_from: str  # where the registry came from, for the report
    heads: dict[str, dict[str, Any]]
    heads_from: list[str]
    #: Revoked or replaced keys with the window they were valid in (`load_past_keys`).
    past: dict[str, list[PastKey]] = field(default_factory=dict)


@dataclass(frozen=True)
class PastKey:
    """A key an institution signed with before it was revoked or replaced."""

    key: ec.EllipticCurvePublicKey
    valid_from: dt.datetime | None  # None: enrolled before windows were recorded
    valid_until: dt.datetime


def load_past_keys(path: Path) -> dict[str, list[PastKey]]:
    """The revoked keys of the server's ``institutions.toml``, by institution (none elsewhere)."""
    if not path.is_file() or path.suffix != ".toml":
        return {}
    try:
        raw = load_toml(path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}  # load_keys, which reads the same file, reports it
    old = raw.get("revoked")  # the format before revocations were kept as a list
    revocations = raw.get("revocations", [])
    if isinstance(old, dict):
        revocations = [*revocations, *({**v, "name": k} for k, v in old.items())]
    out: dict[str, list[PastKey]] = {}
    for entry in revocations if isinstance(revocations, list) else []:
        try:
            start = entry.get("enrolled_at")
            past = PastKey(
                _key(entry["public_key"], path, entry["name"]),
                _utc(start) if start is not None else None,
                _utc(entry["revoked_at"]),
            )
        except (LedgerError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LedgerError(f"{path}: a revocation is not readable ({exc})") from None
        out.setdefault(str(entry["name"]), []).append(past)
    return out


def _utc(value: Any) -> dt.datetime:
    when = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(str(value))
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _past_key(raw: bytes, past: Sequence[PastKey]) -> ec.EllipticCurvePublicKey | None:
    """The revoked key that signed ``raw`` while it was valid, if one did."""
    if not past:
        return None
    try:
        obj = loads_json(raw.decode("utf-8"))
        signed = parse_public_key(str(obj["public_key"]))
        when = _utc(obj["time"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, LedgerError):
        return None
    for candidate in past:
        # Five minutes' grace before enrolment: a node's clock may run a little ahead.
        starts = candidate.valid_from - dt.timedelta(minutes=5) if candidate.valid_from else None
        in_window = (starts is None or starts <= when) and when <= candidate.valid_until
        if in_window and same_key(candidate.key, signed):
            return candidate.key
    return None


def find_evidence(ledger: Path, keys: Path | None = None, heads: Sequence[Path] = ()) -> Evidence:
    """The registry and heads given, or else the ones found next to ``ledger``.

    Looked for when not given: in a simulation's run folder (``RUN/ledger.jsonl``) each
    institution's ``RUN/privacy/NAME/keys/NAME.pub`` and own ``RUN/privacy/NAME/ledger.jsonl``;
    for an institution's own ledger (``STATE/ledger.jsonl``) its ``STATE/keys/NAME.pub`` and,
    inside a run folder, the consortium's copy the server received (``RUN/ledger.jsonl``); the
    server's ``institutions.toml`` next to the ledger or one folder up.

    Raises:
        LedgerError: a registry or heads file is unreadable.
    """
    here = ledger.resolve().parent
    if keys is not None:
        registry, keys_from = load_keys(keys), str(keys)
    else:
        registry, keys_from = _found_keys(here)
    if heads:
        paths = list(heads)
    else:
        paths = [p for p in _found_heads(here) if p.resolve() != ledger.resolve()]
    expected = load_heads(paths) if paths else {}
    past = load_past_keys(Path(keys_from)) if registry is not None else {}
    if registry is not None and not heads:
        # A found ledger may hold other institutions (the consortium's copy): only ours count.
        expected = {k: v for k, v in expected.items() if k in registry or k in past}
    return Evidence(registry, keys_from, expected, [str(p) for p in paths], past)


def _found_keys(here: Path) -> tuple[dict[str, ec.EllipticCurvePublicKey] | None, str]:
    run_pubs = sorted(here.glob("privacy/*/keys/*.pub"))
    run_pubs = [p for p in run_pubs if p.stem == p.parent.parent.name]
    if run_pubs:
        return {p.stem: _key(_read_key_file(p), p) for p in run_pubs}, str(
            here / "privacy" / "*" / "keys"
        )
    if sorted((here / "keys").glob("*.pub")):
        return load_keys(here / "keys"), str(here / "keys")
    for folder in (here, here.parent):
        if (folder / REGISTRY_FILE).is_file():
            return load_keys(folder / REGISTRY_FILE), str(folder / REGISTRY_FILE)
    return None, ""


def _found_heads(here: Path) -> list[Path]:
    own = sorted(here.glob(f"privacy/*/{LEDGER_FILE}"))
    if own:
        return own
    if here.parent.name == "privacy" and (here.parent.parent / LEDGER_FILE).is_file():
        return [here.parent.parent / LEDGER_FILE]  # what the server received from this node
    return []


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
    *,
    absent: Sequence[str] = (),
    past_keys: Mapping[str, Sequence[PastKey]] | None = None,
) -> VerifyReport:
    """Check every line of a ledger; `VerifyReport.problems` lists the bad ones, first first.

    Without ``keys`` each chain is checked against the key of its first entry (a consistent
    chain, but not proof of who signed it). With them, every registered institution must have
    entries, except those named in ``absent`` (enrolled, but took no part). A chain without an
    expected head is listed in `VerifyReport.tails_unchecked`: entries removed from its end
    cannot be noticed. An entry signed by a revoked or replaced key (``past_keys``) verifies
    when its time lies in the window that key was valid in.
    """
    past_keys = past_keys or {}
    if not path.is_file():
        raise LedgerError(f"{path}: no such ledger file")
    report = VerifyReport(path, keys_from_registry=keys is not None)
    lines, torn = read_lines(path)
    last: dict[str, LedgerEntry] = {}
    bad_last: dict[str, bool] = {}
    seen: set[str] = set()
    hashes: dict[tuple[str, int], str] = {}
    for number, raw in enumerate(lines, start=1):
        report.entries += 1
        if torn and number == len(lines):
            reason = "incomplete last line: the file was cut or an append was interrupted"
            report.problems.append(LedgerProblem(number, None, None, reason))
            break
        name = _institution_of(raw)
        if name is not None:
            seen.add(name)
        past = _past_key(raw, past_keys.get(name, ())) if name is not None else None
        if keys is not None and name is not None and name not in keys and past is None:
            reason = f"institution {name!r} is not in the key registry"
            report.problems.append(LedgerProblem(number, name, None, reason))
            continue
        prev = last.get(name) if name is not None else None
        key = keys[name] if keys is not None and name is not None and past is None else past
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
    end = len(lines) + 1
    for name in sorted(keys or {}):
        if name in seen:
            continue
        if name in absent:
            report.absent.append(name)
            continue
        reason = (
            f"registered institution {name!r} has no entries: a whole institution was removed "
            f"(if it took no part in this run, say so with --absent {name})"
        )
        report.problems.append(LedgerProblem(end, name, None, reason))
    expected = dict(expected_heads or {})
    if keys is not None:
        expected = {
            k: v for k, v in expected.items() if (k in keys or k in past_keys) and k not in absent
        }
    for name in sorted(set(last) | set(expected)):
        if name not in expected:
            report.tails_unchecked.append(name)
            continue
        report.tails_checked.append(name)
        if keys is not None and name not in seen and name not in absent:
            continue  # reported above as a removed institution
        problem = _head_problem(name, expected[name], last.get(name), hashes)
        if problem is not None:
            report.problems.append(LedgerProblem(end, name, None, problem))
    return report


def _head_problem(
    name: str, head: Mapping[str, Any], end: LedgerEntry | None, hashes: Mapping[Any, str]
) -> str | None:
    seq = int(head["seq"])
    if end is None or end.seq < seq:
        ends = "no entries" if end is None else f"ends at seq {end.seq}"
        return (
            f"{name}'s chain {ends}, but its head is seq {seq}: entries were removed at the end "
            "(or never reached this copy)"
        )
    if hashes.get((name, seq)) != head["hash"]:
        return (
            f"{name}'s entry seq {seq} differs from its head (the other copy of its chain): "
            "one of the two chains was rewritten"
        )
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


#: ``edufl audit verify``'s exit status when nothing wrong was found but not all was checked.
EXIT_INCOMPLETE = 3


def audit_ledger(
    ledger: Path,
    keys: Path | None = None,
    heads: Sequence[Path] = (),
    *,
    absent: Sequence[str] = (),
    unauthenticated: bool = False,
) -> tuple[VerifyReport, Evidence]:
    """`verify_ledger` against the given or found evidence (`find_evidence`), as the CLI does.

    Raises:
        LedgerError: no key registry was given or found and ``unauthenticated`` is False: a
            ledger checked against its own keys proves nothing about who signed it.
    """
    if not ledger.is_file():
        raise LedgerError(f"{ledger}: no such ledger file")
    evidence = find_evidence(ledger, keys, heads)
    if evidence.keys is None and not unauthenticated:
        raise LedgerError(
            f"{ledger}: no key registry given or found next to it, so no signature can be "
            "checked against who enrolled; pass --keys (the server's institutions.toml or a "
            "folder of NAME.pub), or --unauthenticated to check the chains' consistency only"
        )
    unknown = sorted(set(absent) - set(evidence.keys or {}))
    if unknown and evidence.keys is not None:
        raise LedgerError(f"--absent {', '.join(unknown)}: not in the key registry")
    report = verify_ledger(
        ledger, evidence.keys, evidence.heads, absent=absent, past_keys=evidence.past
    )
    return report, evidence


def exit_code(report: VerifyReport) -> int:
    """0 intact, 1 tampered or damaged, `EXIT_INCOMPLETE` when not everything was checked."""
    if not report.ok:
        return 1
    return 0 if report.intact else EXIT_INCOMPLETE


def render_report(report: VerifyReport, evidence: Evidence | None = None) -> str:
    """The report as text; its last summary line starts with ``=> `` and the verdict."""
    keys = (
        "registered keys"
        + (f" ({evidence.keys_from})" if evidence is not None and evidence.keys_from else "")
        if report.keys_from_registry
        else "each chain's own first key (pass --keys to check who signed)"
    )
    lines = [f"{report.path}: {report.entries} entries; signatures checked against {keys}"]
    if evidence is not None and evidence.heads_from:
        lines.append(f"  chain ends checked against: {', '.join(evidence.heads_from)}")
    for name, count in sorted(report.chains.items()):
        head = report.heads.get(name, {})
        tail = "" if name in report.tails_checked else "  (tail unchecked)"
        lines.append(
            f"  {name:<24} {count:>5} valid entries, head seq {head.get('seq')} "
            f"{str(head.get('hash', ''))[:16]}{tail}"
        )
    for name in report.absent:
        lines.append(f"  {name:<24}     0 entries (declared absent)")
    if not report.ok:
        lines.append(f"=> TAMPERED OR DAMAGED: first bad entry: {report.problems[0]}")
        lines += [f"  {p}" for p in report.problems[1:20]]
        if len(report.problems) > 20:
            lines.append(f"  ... and {len(report.problems) - 20} more")
        return "\n".join(lines)
    if not report.keys_from_registry:
        lines.append(
            "=> UNAUTHENTICATED: the chains are consistent, but no key registry was checked, "
            "so anyone could have signed them; pass --keys"
        )
    elif report.tails_unchecked:
        lines.append(
            "=> TAIL UNCHECKED: signatures and chains verified, but no head for "
            f"{', '.join(report.tails_unchecked)}: entries cut from the end of a chain cannot "
            "be seen; pass each institution's own ledger.jsonl with --heads"
        )
    else:
        lines.append("=> INTACT")
    return "\n".join(lines)


def report_json(report: VerifyReport) -> dict[str, object]:
    return {
        "path": str(report.path),
        "ok": report.ok,
        "intact": report.intact,
        "verdict": report.verdict,
        "entries": report.entries,
        "chains": report.chains,
        "heads": report.heads,
        "keys_from_registry": report.keys_from_registry,
        "tails_checked": report.tails_checked,
        "tails_unchecked": report.tails_unchecked,
        "absent": report.absent,
        "problems": [asdict(p) for p in report.problems],
    }
