"""edufl: server — the ServerApp, strategies and their guard, checkpoints and resume.

Names below load on first use, so ``import server.institutions`` (what `edufl server enrol`
needs) does not pull in Flower and torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FederationConfig": "server.config",
    "FederationConfigError": "server.config",
    "FederationResult": "server.federation",
    "run_federation": "server.federation",
    "GuardConfig": "server.guard",
    "GuardedStrategy": "server.guard",
    "Rejection": "server.guard",
    "STRATEGY_NAMES": "server.strategies",
    "UnknownStrategyError": "server.strategies",
    "build_strategy": "server.strategies",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'server' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
