"""An institution's own copy of its ledger chain, in its state folder, signed with its key.

The signing key is the institution's EC node key (OpenSSH, as `privacy.keys` writes it); a
folder without one gets ``keys/INSTITUTION`` generated on first use, whose ``.pub`` the auditor
registers. Every round, with DP or explicitly without, appends one entry.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from privacy.accountant_store import AccountantStore
from privacy.budget import NEIGHBOURING
from privacy.keys import init_institution_keys, load_node_private_key, public_key_line
from privacy.ledger.entries import (
    GENESIS,
    LEDGER_FILE,
    LedgerEntry,
    append_entry,
    entry_hash,
    parse_entries,
    sign_entry,
    utc_now,
)
from shared_models.errors import PrivacyBudgetExceeded

logger = logging.getLogger(__name__)

KEYS_DIR = "keys"


class InstitutionLedger:
    """``STATE_DIR/ledger.jsonl``: one institution's chain, appended by its own node only."""

    def __init__(
        self,
        state_dir: Path | str,
        institution: str,
        signing_key: ec.EllipticCurvePrivateKey | Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE
        self.institution = institution
        self._key = _signing_key(self.state_dir, institution, signing_key)

    @property
    def public_key(self) -> str:
        """The signing key as one OpenSSH line, for the consortium's registry."""
        return public_key_line(self._key.public_key())

    def last(self) -> LedgerEntry | None:
        entries = parse_entries(self.path)
        return entries[-1] if entries else None

    def refuse_if_voided(self) -> LedgerEntry | None:
        """The last entry; refuses DP claims once a round without DP left epsilon unbounded.

        Raises:
            PrivacyBudgetExceeded: a round trained without DP earlier in this chain.
        """
        prev = self.last()
        if prev is not None and prev.epsilon_after is None:
            raise PrivacyBudgetExceeded(
                f"{prev.institution} trained without DP in round {prev.round}; its epsilon is "
                "unbounded, so no DP round can be claimed in this state folder any more"
            )
        return prev

    def sign_next(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The signed entry that extends the chain with ``fields`` (not yet written)."""
        prev = self.last()
        return sign_entry(
            {
                **fields,
                "institution": self.institution,
                "seq": 0 if prev is None else prev.seq + 1,
                "time": utc_now(),
                "prev_hash": GENESIS if prev is None else entry_hash(prev.model_dump()),
            },
            self._key,
        )

    def append(self, entry: dict[str, Any]) -> None:
        append_entry(self.path, entry)

    def repair(self, committed: dict[str, Any] | None) -> None:
        """Re-append the last committed entry if a crash came between state and ledger writes."""
        if committed is None:
            return
        last = self.last()
        if last is None or last.seq < int(committed["seq"]):
            logger.warning(
                "%s: restoring the last committed entry after an interruption", self.path
            )
            self.append(committed)


def record_non_private_round(
    state_dir: Path | str,
    *,
    institution: str,
    run_id: str,
    server_round: int,
    node: str,
    n_students: int,
    steps: int,
    signing_key: ec.EllipticCurvePrivateKey | Path | None = None,
) -> dict[str, Any]:
    """Append a signed entry saying this round trained *without* DP; returns it.

    Switching DP off must be explicit and is never hidden: the entry voids the institution's
    epsilon (unbounded) for the rest of this state folder's chain.
    """
    ledger = InstitutionLedger(state_dir, institution, signing_key)
    with AccountantStore(state_dir).locked():
        entry = ledger.sign_next(
            {
                "node": str(node),
                "run_id": str(run_id),
                "round": int(server_round),
                "private": False,
                "accountant": "none",
                "noise_multiplier": 0.0,
                "sample_rate": 1.0,
                "steps": int(steps),
                "max_grad_norm": None,
                "delta": None,
                "n_students": int(n_students),
                "epsilon_after": None,
                "epsilon_budget": None,
                "kind": "train",
                "neighbouring": NEIGHBOURING,
                "n_noised": False,  # nothing is private in this round, n included
            }
        )
        ledger.append(entry)
    logger.warning("%s round %d trained WITHOUT differential privacy", institution, server_round)
    return entry


def _signing_key(
    state_dir: Path, institution: str, given: ec.EllipticCurvePrivateKey | Path | None
) -> ec.EllipticCurvePrivateKey:
    if isinstance(given, ec.EllipticCurvePrivateKey):
        return given
    if given is not None:
        return load_node_private_key(Path(given))
    path = state_dir / KEYS_DIR / institution
    if not path.exists():
        init_institution_keys(state_dir / KEYS_DIR, institution)
        logger.warning("generated ledger signing key %s; give the auditor %s.pub", path, path.name)
    return load_node_private_key(path)
