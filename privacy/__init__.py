"""edufl: privacy.

DP-SGD budgets that hold across a federation run (`DPSession`), the signed privacy ledger and
the auditor's checks. Names below load on first use, so ``import privacy.keys`` (the server's
key handling) does not pull in Opacus, torch and dp-accounting.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PrivacyBudget": "privacy.budget",
    "DPPlan": "privacy.budget",
    "PrivacyConfigError": "privacy.budget",
    "calibrate_noise": "privacy.accountant_store",
    "AccountantStore": "privacy.accountant_store",
    "AccountantState": "privacy.accountant_store",
    "compute_epsilon": "privacy.accountant_store",
    "DPSession": "privacy.dp",
    "InstitutionLedger": "privacy.ledger.institution",
    "record_non_private_round": "privacy.ledger.institution",
    "ConsortiumLedger": "privacy.ledger.consortium",
    "encode_entry": "privacy.ledger.consortium",
    "decode_entry": "privacy.ledger.consortium",
    "REPLY_KEY": "privacy.ledger.consortium",
    "LedgerEntry": "privacy.ledger.entries",
    "LedgerError": "privacy.ledger.entries",
    "verify_ledger": "privacy.audit.verify",
    "recompute_budget": "privacy.audit.budget",
    "membership_inference": "privacy.audit.attack",
    "pseudonymize_export": "privacy.pseudonymize",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'privacy' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
