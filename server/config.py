"""The federation's configuration: one validated object, flattened to Flower's run config.

It flows one way: a TOML file or CLI options -> `FederationConfig` -> ``to_run_config()`` (flat
kebab-case keys, what ``flwr run --run-config`` and ``pyproject.toml`` carry) -> the ServerApp's
``from_run_config()``, which validates again. The nodes get what they need in every message's
config (`train_config`), and validate it again on their side
(`shared_models.protocol.RoundSettings`).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.guard import GuardConfig
from server.strategies import check_strategy
from shared_models.errors import EduflError
from shared_models.models.registry import model_config


class FederationConfigError(EduflError, ValueError):
    """A federation config (file, run config or options) that is not valid."""


_JSON_FIELDS = ("model_overrides", "strategy_params")


class FederationConfig(BaseModel):
    """Everything the server decides for a federated run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "lstm"  # shared_models.models.registry.MODEL_NAMES
    model_overrides: dict[str, Any] = Field(default_factory=dict)  # e.g. {"hidden_size": 32}
    task: Literal["risk", "grade", "multitask"] = "risk"
    strategy: str = "fedavg"  # server.strategies.STRATEGY_NAMES
    strategy_params: dict[str, float] = Field(default_factory=dict)  # e.g. {"eta": 0.01}
    rounds: Annotated[int, Field(ge=1)] = 5  # total rounds of the run, resumed ones included
    fraction_train: Annotated[float, Field(gt=0, le=1)] = 1.0
    fraction_evaluate: Annotated[float, Field(ge=0, le=1)] = 1.0
    min_nodes: Annotated[int, Field(ge=1)] = 2  # a round waits until this many nodes are up
    local_epochs: Annotated[int, Field(ge=1)] = 3  # per round; chosen so 5 rounds match centralized
    batch_size: Annotated[int, Field(ge=1)] = 32
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3  # the nodes' Adam, as in the papers
    proximal_mu: Annotated[float, Field(ge=0)] = 0.0  # FedProx only
    seed: int = 0  # initial weights, node splits and shuffling
    out_dir: Path = Path("runs/federation")  # checkpoints, metrics.jsonl, summary
    resume: bool = False  # continue from the last checkpoint in out_dir
    spec_path: Path | None = None  # the consortium's feature spec; the default spec if None
    round_timeout: Annotated[float, Field(gt=0)] = 3600.0  # seconds to wait for replies
    guard: GuardConfig = Field(default_factory=GuardConfig)
    # DP-SGD at every node (privacy.DPSession); None trains without DP. Per institution, whole run.
    dp_epsilon: Annotated[float, Field(gt=0)] | None = None
    dp_delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    dp_max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    dp_accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        model_config(self.model, self.model_overrides)  # unknown model or override fails here
        check_strategy(self.strategy, self.strategy_params)
        if self.proximal_mu > 0 and self.strategy != "fedprox":
            raise ValueError(
                f"proximal_mu applies to strategy 'fedprox' only, not {self.strategy!r}"
            )
        return self

    # --- Flower's run config ------------------------------------------------------------------

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flat kebab-case keys; dicts as JSON strings, the guard as ``guard.*`` keys."""
        raw = self.model_dump(mode="json", exclude={"guard"})
        flat: dict[str, bool | int | float | str] = {}
        for key, value in raw.items():
            if key in _JSON_FIELDS:
                value = json.dumps(value, sort_keys=True)
            elif value is None:
                value = ""
            flat[key.replace("_", "-")] = value
        for key, value in self.guard.model_dump().items():
            flat[f"guard.{key.replace('_', '-')}"] = value
        return flat

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Validate a Flower run config written by `to_run_config` (or by hand in TOML).

        Raises:
            FederationConfigError: unknown keys or invalid values, each named.
        """
        raw: dict[str, Any] = {}
        guard: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name.startswith("guard."):
                guard[name.removeprefix("guard.")] = value
                continue
            if name in _JSON_FIELDS and isinstance(value, str):
                try:
                    value = json.loads(value) if value.strip() else {}
                except json.JSONDecodeError as exc:
                    raise FederationConfigError(
                        f"run config {key}: not valid JSON ({exc})"
                    ) from None
            if name in ("spec_path", "dp_epsilon") and value == "":
                value = None
            raw[name] = value
        if guard:
            raw["guard"] = guard
        return cls.validated(raw, "run config")

    @classmethod
    def validated(cls, raw: Mapping[str, Any], source: str) -> FederationConfig:
        """Validate ``raw``; errors become one `FederationConfigError` naming ``source``."""
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as exc:
            raise FederationConfigError(_describe(exc, source)) from None
        except EduflError as exc:  # an unknown strategy raised inside a validator
            raise FederationConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> FederationConfig:
        """Load a TOML file (snake_case keys, ``[guard]`` table); ``overrides`` win."""
        try:
            raw = tomllib.loads(path.read_text("utf-8-sig"))  # a BOM is fine
        except FileNotFoundError:
            raise FederationConfigError(f"{path}: config file not found") from None
        except UnicodeDecodeError:
            raise FederationConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
        except RecursionError:
            raise FederationConfigError(f"{path}: nested too deeply to be a config") from None
        except (OSError, ValueError) as exc:  # TOML errors, >4300-digit integers
            raise FederationConfigError(f"{path}: cannot read config ({exc})") from None
        return cls.validated({**raw, **overrides}, str(path))

    # --- what the nodes get -------------------------------------------------------------------

    def train_config(self, spec_fingerprint: str) -> dict[str, bool | int | float | str]:
        """The message config every node receives (see `shared_models.protocol.RoundSettings`)."""
        return {
            "model": self.model,
            "model-config": json.dumps(self.model_overrides, sort_keys=True),
            "task": self.task,
            "local-epochs": self.local_epochs,
            "batch-size": self.batch_size,
            "learning-rate": self.learning_rate,
            "seed": self.seed,
            "spec-fingerprint": spec_fingerprint,
            "spec-path": str(self.spec_path) if self.spec_path else "",
            "planned-rounds": self.rounds,
            "dp-epsilon": self.dp_epsilon or 0.0,  # 0: no DP
            "dp-delta": self.dp_delta,
            "dp-max-grad-norm": self.dp_max_grad_norm,
            "dp-accountant": self.dp_accountant,
        }


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: the federation config is invalid ({exc.error_count()} problem(s))"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            valid = ", ".join(FederationConfig.model_fields)
            msg = f"unknown key (a typo?); valid keys: {valid}"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)
