"""edufl: server — the ServerApp, strategies and their guard, checkpoints and resume."""

from server.config import FederationConfig, FederationConfigError
from server.federation import FederationResult, run_federation
from server.guard import GuardConfig, GuardedStrategy, Rejection
from server.strategies import STRATEGY_NAMES, UnknownStrategyError, build_strategy

__all__ = [
    "STRATEGY_NAMES",
    "FederationConfig",
    "FederationConfigError",
    "FederationResult",
    "GuardConfig",
    "GuardedStrategy",
    "Rejection",
    "UnknownStrategyError",
    "build_strategy",
    "run_federation",
]
