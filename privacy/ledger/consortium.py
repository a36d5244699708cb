"""The server's consortium ledger: every institution's signed chain, interleaved in one file.

The server never writes entries of its own: it appends what institutions signed, after checking
that each entry is signed by the institution's registered key and extends its chain. Entries
travel in a reply's privacy record as text (`encode_entry` / `decode_entry`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from privacy.ledger.entries import (
    LedgerEntry,
    LedgerError,
    append_entry,
    canonical_json,
    check_entry,
    parse_entries,
    parse_public_key,
)
from shared_models.protocol import LEDGER_EARLIER, LEDGER_ENTRY

logger = logging.getLogger(__name__)

#: The reply keys of a node's new ledger entry and of the run's earlier entries of its chain
#: (the wire protocol's names, kept here under their former names).
REPLY_KEY = LEDGER_ENTRY
EARLIER_KEY = LEDGER_EARLIER


class ConsortiumLedger:
    """The server's copy: every institution's chain, interleaved in one JSON-lines file.

    `receive` accepts an entry only if its signature is valid and it extends its institution's
    chain; a repeated entry is ignored, so a node may resend its recent entries after a lost reply.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._last: dict[str, LedgerEntry] = {}
        for entry in parse_entries(self.path):
            self._last[entry.institution] = entry

    def receive(self, entry: dict[str, Any], key: ec.EllipticCurvePublicKey | None = None) -> bool:
        """Append ``entry`` if it is the next valid link of its chain; False if already held.

        Args:
            entry: a signed entry as the node sent it (e.g. `decode_entry` of the reply's text).
            key: the institution's registered public key; None trusts the entry's own key.

        Raises:
            LedgerError: the entry is forged, altered, or leaves a gap in its chain.
        """
        raw = canonical_json(entry)
        name = str(entry.get("institution", "?"))
        last = self._last.get(name)
        if key is None and last is not None:  # without a registry, the chain's first key holds
            key = parse_public_key(last.public_key)
        parsed, problem = check_entry(raw, last, key)
        if parsed is not None and last is not None and parsed.seq <= last.seq:
            return False  # a resend of an entry the ledger already holds
        if problem is not None:
            raise LedgerError(f"refused ledger entry from {name}: {problem}")
        assert parsed is not None
        append_entry(self.path, entry)
        self._last[name] = parsed
        logger.info("ledger: %s round %d (seq %d) recorded", name, parsed.round, parsed.seq)
        return True

    def receive_text(
        self, text: str, key: ec.EllipticCurvePublicKey | None = None, earlier: str = ""
    ) -> bool:
        """`receive` for an entry as it arrives in a reply (`encode_entry`'s text).

        ``earlier`` (`encode_entries`' text) are the node's earlier entries of the run: those
        the ledger lacks are received first, in order, so a lost reply leaves no gap.
        """
        for entry in decode_entries(earlier):
            self.receive(entry, key)
        return self.receive(decode_entry(text), key)

    def entries(self) -> list[LedgerEntry]:
        return parse_entries(self.path)


def encode_entry(entry: dict[str, Any]) -> str:
    """The entry as text for a Flower ``ConfigRecord`` value."""
    return canonical_json(entry).decode("ascii")


def encode_entries(entries: list[dict[str, Any]]) -> str:
    """Several entries as one text (a JSON list of canonical entries)."""
    return "[" + ",".join(encode_entry(e) for e in entries) + "]"


def decode_entries(text: str) -> list[dict[str, Any]]:
    """Inverse of `encode_entries`; "" is no entry."""
    if not text.strip():
        return []
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # bad JSON, >4300-digit ints, deep nesting
        raise LedgerError(f"ledger entries are not valid JSON ({type(exc).__name__})") from None
    if not isinstance(obj, list) or not all(isinstance(e, dict) for e in obj):
        raise LedgerError("ledger entries must be a JSON list of objects")
    return obj


def decode_entry(text: str) -> dict[str, Any]:
    """Inverse of `encode_entry` (checks happen in `ConsortiumLedger.receive`)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # bad JSON, >4300-digit ints, deep nesting
        raise LedgerError(f"ledger entry is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise LedgerError("ledger entry must be a JSON object")
    return obj
