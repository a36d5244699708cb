"""The tamper-evident privacy ledger: one signed, hash-chained JSON line per privacy expenditure.

Each institution keeps its own chain: entry ``seq`` carries the SHA-256 of the canonical JSON of
its predecessor (``prev_hash``; the first entry chains to `GENESIS`) and an ECDSA signature by
the institution's EC key over every other field. Entries hold aggregate DP parameters only (no
student data), travel to the server with the round's update, and the server's consortium ledger
interleaves the chains of all institutions in one file.

Each entry names its ``kind`` (``train``: a round of local training, DP-SGD or, with
``private`` false, none; ``count`` / ``histogram``: a value released through a Gaussian mechanism
of L2 sensitivity 1, with its noise multiplier as the noise's standard deviation, sample rate 1,
one step and ``max_grad_norm`` 1, the sensitivity) and the ``neighbouring`` relation its epsilon
is claimed under (`privacy.budget.NEIGHBOURING`). Entries written before these fields existed
still verify: a missing ``kind`` is a training round, a missing ``neighbouring`` the record-level
relation they were accounted under (`privacy.budget.LEGACY_NEIGHBOURING`), which the budget
audit reports as such. ``n_noised`` says ``n_students`` is the node's released (noised) count.

A line is valid only in its canonical form (sorted keys, no spaces, ASCII), so any changed byte
either breaks the JSON, breaks the canonical form, or changes a signed value. Dropping the *last*
entries of a chain cannot be seen from the chain itself; `heads` records each chain's end so an
auditor can compare it with the institutions' own records.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from privacy.keys import public_key_line
from shared_models.errors import EduflError
from shared_models.user_files import loads_json

logger = logging.getLogger(__name__)

LEDGER_FILE = "ledger.jsonl"
#: What an entry may record: a training round, or a release of sensitivity 1 (`privacy.releases`).
Kind = Literal["train", "count", "histogram"]
GENESIS = "0" * 64
ENTRY_VERSION = 1
_SIGNATURE_ALGORITHM = ec.ECDSA(hashes.SHA256())


class LedgerError(EduflError, ValueError):
    """A ledger entry cannot be accepted (bad signature, broken chain, malformed line)."""


class LedgerEntry(BaseModel):
    """The schema of one ledger line; `check_entry` adds signature and chain checks."""

    # No NaN or infinity: canonical JSON cannot hold them, so no signed entry does either.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    v: Literal[1]
    institution: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    node: str  # the Flower node id that trained
    run_id: str
    round: Annotated[int, Field(ge=0)]
    seq: Annotated[int, Field(ge=0)]  # position in this institution's chain
    time: str  # ISO 8601, UTC
    private: bool  # False: DP was switched off for this round (recorded, never hidden)
    accountant: Literal["rdp", "prv", "none"]
    noise_multiplier: Annotated[float, Field(ge=0)]
    sample_rate: Annotated[float, Field(gt=0, le=1)]
    steps: Annotated[int, Field(ge=0)]
    max_grad_norm: float | None  # None when DP was off
    delta: Annotated[float, Field(gt=0, lt=1)] | None  # None when DP was off
    n_students: Annotated[int, Field(ge=1)]
    epsilon_after: Annotated[float, Field(ge=0)] | None  # cumulative; None once DP was off
    epsilon_budget: Annotated[float, Field(gt=0)] | None  # None when DP was off
    # Newer fields: absent from older entries, so left out of their canonical form (model_dump).
    kind: Kind = "train"
    neighbouring: Annotated[str, Field(max_length=64)] | None = None  # None: record-level (old)
    n_noised: bool = False  # n_students is the node's DP-released count, not the exact one
    prev_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    public_key: str  # OpenSSH line of the signing key
    signature: str  # base64 DER ECDSA-SHA256 over the canonical JSON of all other fields

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """The entry's fields as signed: a field the signed line did not hold stays out.

        An entry written before a field existed was signed without it; dumping its default
        would change the bytes, the hash and the signature's payload.
        """
        kwargs.setdefault("exclude_unset", True)
        return super().model_dump(**kwargs)


def canonical_json(obj: Any) -> bytes:
    """The one byte form of ``obj`` that hashes and signatures are computed over.

    Raises:
        LedgerError: ``obj`` holds NaN or an infinity (JSON has neither), e.g. an entry a
            node sent as ``{"epsilon_after": NaN}``. A ``ValueError``, as before.
    """
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
    except ValueError as exc:
        raise LedgerError(f"not representable as a ledger line ({exc})") from None
    return text.encode("ascii")


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 (hex) of an entry's canonical JSON, signature included: the next ``prev_hash``."""
    return hashlib.sha256(canonical_json(entry)).hexdigest()


def sign_entry(fields: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """``fields`` with ``v``, ``public_key`` and the ECDSA ``signature`` added."""
    payload = {**fields, "v": ENTRY_VERSION, "public_key": public_key_line(key.public_key())}
    payload.pop("signature", None)
    signature = key.sign(canonical_json(payload), _SIGNATURE_ALGORITHM)
    entry = {**payload, "signature": base64.b64encode(signature).decode("ascii")}
    LedgerEntry.model_validate(entry)  # a programming error if the fields do not fit
    return entry


def parse_public_key(line: str) -> ec.EllipticCurvePublicKey:
    """An OpenSSH EC public key line (``ecdsa-sha2-nistp384 AAAA... [comment]``)."""
    try:
        key = serialization.load_ssh_public_key(line.strip().encode("ascii"))
    except (ValueError, UnicodeError, UnsupportedAlgorithm, NotImplementedError) as exc:
        # cryptography raises NotImplementedError for a compressed EC point
        raise LedgerError(f"not an OpenSSH public key ({exc or type(exc).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise LedgerError("ledger keys must be EC keys (the institution's node key)")
    return key


def same_key(a: ec.EllipticCurvePublicKey, b: ec.EllipticCurvePublicKey) -> bool:
    return public_key_line(a) == public_key_line(b)


def check_entry(
    raw: bytes,
    prev: LedgerEntry | None,
    key: ec.EllipticCurvePublicKey | None,
    *,
    check_prev_hash: bool = True,
) -> tuple[LedgerEntry | None, str | None]:
    """Parse one ledger line and check it; returns ``(entry, problem)``, problem None if valid.

    Args:
        raw: the line's bytes without its newline.
        prev: the previous valid entry of the same institution's chain, None for the first.
        key: the key the institution is known by; None checks against the entry's own key.
        check_prev_hash: False when ``prev`` is itself bad, so its true hash is unknown.
    """
    try:
        obj = loads_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"not valid JSON ({str(exc)[:200]})"
    try:
        entry = LedgerEntry.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(entry)"
        return None, f"malformed entry: {where}: {first['msg']}"
    try:
        # The typed entry must give back these very bytes: then its hash is the line's hash.
        canonical = canonical_json(entry.model_dump())
    except ValueError:
        canonical = b""
    if canonical != raw:
        return entry, "not in canonical form: the line was edited after it was signed"
    try:
        embedded = parse_public_key(entry.public_key)
    except LedgerError as exc:
        return entry, f"public_key: {exc}"
    if key is not None and not same_key(key, embedded):
        return entry, f"signed with a key that is not {entry.institution}'s registered key"
    payload = {k: v for k, v in obj.items() if k != "signature"}
    try:
        signature = base64.b64decode(entry.signature, validate=True)
        embedded.verify(signature, canonical_json(payload), _SIGNATURE_ALGORITHM)
    except (InvalidSignature, binascii.Error, ValueError):
        return entry, "signature does not match the entry: its fields were changed"
    expected_seq = 0 if prev is None else prev.seq + 1
    expected_prev = GENESIS if prev is None else entry_hash(prev.model_dump())
    if entry.seq != expected_seq:
        return entry, (
            f"out of order: {entry.institution}'s entry seq {entry.seq} where seq "
            f"{expected_seq} was due (an entry was removed, repeated or moved)"
        )
    if check_prev_hash and entry.prev_hash != expected_prev:
        return entry, f"does not chain to {entry.institution}'s previous entry (prev_hash)"
    return entry, _accounting_problem(entry, prev)


def _accounting_problem(entry: LedgerEntry, prev: LedgerEntry | None) -> str | None:
    """Epsilon can only grow, and is unbounded (None) from the first round without DP on."""
    voided = not entry.private or (prev is not None and prev.epsilon_after is None)
    if voided:
        if entry.epsilon_after is not None:
            return "claims a finite epsilon although DP was off in this or an earlier round"
        return None
    if entry.epsilon_after is None or entry.delta is None or entry.epsilon_budget is None:
        return "a private round must record delta, epsilon_after and epsilon_budget"
    if entry.accountant == "none" or entry.max_grad_norm is None:
        return "a private round must record its accountant and clipping norm"
    if (
        prev is not None
        and prev.epsilon_after is not None
        and (entry.epsilon_after < prev.epsilon_after)
    ):
        return "epsilon_after decreased: spent privacy can only grow"
    return None


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def read_lines(path: Path) -> tuple[list[bytes], bool]:
    """The ledger's lines (without newlines) and whether the last one is torn (no newline)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    if not data:
        return [], False
    lines = data.split(b"\n")
    torn = lines[-1] != b""
    return (lines if torn else lines[:-1]), torn


def append_entry(path: Path, entry: dict[str, Any]) -> None:
    """Append one entry as a line with a single ``O_APPEND`` write, then fsync.

    A crash can at worst leave a torn last line without its newline (never acknowledged to
    anyone); it is cut off before the next append.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _cut_torn_tail(path)
    line = canonical_json(entry) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # a ledger is private
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(path: Path) -> None:
    lines, torn = read_lines(path)
    if torn:
        keep = sum(len(line) + 1 for line in lines[:-1])
        logger.warning("%s: cutting a torn last line left by an interrupted append", path)
        with path.open("r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())


def parse_entries(path: Path) -> list[LedgerEntry]:
    """Every entry of a ledger file (schema-checked only; `audit.verify_ledger` checks more).

    Raises:
        LedgerError: a line is not a well-formed entry; the message names it.
    """
    lines, torn = read_lines(path)
    if torn:  # an interrupted append, never acknowledged; cut before the next one
        logger.warning("%s: ignoring a torn last line", path)
        lines = lines[:-1]
    entries = []
    for number, raw in enumerate(lines, start=1):
        try:
            entries.append(LedgerEntry.model_validate(loads_json(raw.decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError, ValidationError):
            raise LedgerError(
                f"{path} line {number}: not a ledger entry; run `edufl audit verify {path}`"
            ) from None
    return entries


def heads(entries: list[LedgerEntry]) -> dict[str, dict[str, Any]]:
    """The end of each institution's chain: ``{institution: {"seq", "hash"}}``."""
    out: dict[str, dict[str, Any]] = {}
    for entry in entries:
        out[entry.institution] = {"seq": entry.seq, "hash": entry_hash(entry.model_dump())}
    return out
