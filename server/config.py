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
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)

from privacy.budget import (
    DEFAULT_ACCOUNTANT,
    DEFAULT_DELTA,
    DEFAULT_MAX_GRAD_NORM,
    Mechanism,
    PrivacyBudget,
)
from server.averaging import DP_AVERAGE_ROUNDS, dp_average_rounds, first_averaged_round
from server.guard import GuardConfig
from server.strategies import check_strategy
from shared_models.errors import EduflError
from shared_models.models.registry import validate_model_config
from shared_models.protocol import RoundSettings, Task


class FederationConfigError(EduflError, ValueError):
    """A federation config (file, run config or options) that is not valid."""


#: Local training under DP-SGD, where a run proposes DP and the user set none of these (a TOML
#: key, an option, ``FederationConfig(...)``): larger batches average the Gaussian noise over
#: more per-student gradients per step, one pass per round spends less of the budget per
#: round, and a larger step than the non-private 1e-3 makes up for the clipping (0.03 beat
#: 0.01 on all four data sets swept, at epsilon 8 and 1). Chosen by the multi-seed sweep
#: ``python -m bench.dp_sweep`` (docs/results.md, "DP-aware defaults (issue 19)"). The released
#: model averages the global models of the run's last half (`server.averaging`): every round's
#: model carries its own DP noise, and the mean of rounds 6-10 ranked OULAD AAA's students at
#: 0.939 against 0.916 for round 10 alone (5 seeds, epsilon 8; docs/results.md, "Averaging the
#: last rounds"); for the at-risk task only (`dp_defaults`). Without DP the field defaults below
#: stand.
DP_DEFAULTS: dict[str, Any] = {
    "local_epochs": 1,
    "batch_size": 256,
    "learning_rate": 0.03,
    "average_rounds": DP_AVERAGE_ROUNDS,
}

#: Under DP, a model's own step size where it differs from `DP_DEFAULTS`: the linear model's
#: few dozen weights take larger steps (0.05 beat 0.01 by 0.06 ROC-AUC on UCI Portuguese at
#: epsilon 8 in the same sweep).
DP_LEARNING_RATES: dict[str, float] = {"logistic": 0.05}


def dp_defaults(model: str, task: str = "risk") -> dict[str, Any]:
    """The settings a run under DP takes for ``model`` and ``task`` where none is given."""
    own = DP_DEFAULTS | (
        {"learning_rate": DP_LEARNING_RATES[model]} if model in DP_LEARNING_RATES else {}
    )
    return own | {"average_rounds": dp_average_rounds(task)}


_JSON_FIELDS = ("model_overrides", "strategy_params")
#: Optional fields, written as "" in a run config (Flower's values cannot be None).
_EMPTY_IS_NONE = ("spec_path", "init_from", "dp_epsilon", "learning_rate", "dp_evaluate_every")


class FederationConfig(BaseModel):
    """Everything the server decides for a federated run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "lstm"  # shared_models.models.registry.MODEL_NAMES
    model_overrides: dict[str, Any] = Field(default_factory=dict)  # e.g. {"hidden_size": 32}
    task: Task = "risk"
    strategy: str = "fedavg"  # server.strategies.STRATEGY_NAMES
    strategy_params: dict[str, float] = Field(default_factory=dict)  # e.g. {"eta": 0.01}
    rounds: Annotated[int, Field(ge=1)] = 5  # total rounds of the run, resumed ones included
    fraction_train: Annotated[float, Field(gt=0, le=1)] = 1.0
    fraction_evaluate: Annotated[float, Field(ge=0, le=1)] = 1.0
    min_nodes: Annotated[int, Field(ge=1)] = 2  # a round waits until this many nodes are up
    # Local training. Under DP, those not given take `dp_defaults(model)` instead.
    local_epochs: Annotated[int, Field(ge=1)] = 3  # per round; chosen so 5 rounds match centralized
    batch_size: Annotated[int, Field(ge=1)] = 32
    # The nodes' Adam; None: the model config's ``learning_rate`` (1e-3, as in the papers).
    learning_rate: Annotated[float, Field(gt=0)] | None = None
    proximal_mu: Annotated[float, Field(ge=0)] = 0.0  # FedProx only
    # The model the run releases (checkpoints, evaluation, delivery): the mean of the global
    # models of this share of its last rounds (`server.averaging`; 0.5: the last half); 0: the
    # last round's model. Under DP, unset, `dp_defaults`: 0.5 for the at-risk task, 0 where a
    # grade head is trained. The nodes train on regardless.
    average_rounds: Annotated[float, Field(ge=0, le=1)] = 0.0
    seed: int = 0  # initial weights, node splits and shuffling
    out_dir: Path = Path("runs/federation")  # checkpoints, metrics.jsonl, summary
    resume: bool = False  # continue from the last checkpoint in out_dir
    spec_path: Path | None = None  # the consortium's feature spec; the default spec if None
    # A public prior: start from this model's weights (shared_models.models.prior), not from
    # seeded random ones; it must have seen no private record. None: seeded weights.
    init_from: Path | None = None
    round_timeout: Annotated[float, Field(gt=0)] = 3600.0  # seconds to wait for replies
    guard: GuardConfig = Field(default_factory=GuardConfig)
    # DP-SGD at every node (privacy.DPSession); None trains without DP. Per institution, whole run.
    # The flat fields are the TOML/run-config form; `privacy_budget` is the budget they make.
    dp_epsilon: Annotated[float, Field(gt=0)] | None = None
    dp_delta: Annotated[float, Field(gt=0, lt=1)] = DEFAULT_DELTA
    dp_max_grad_norm: Annotated[float, Field(gt=0)] = DEFAULT_MAX_GRAD_NORM
    dp_accountant: Mechanism = DEFAULT_ACCOUNTANT
    # Under DP, a federated evaluation every this many rounds, and always after the last one;
    # None: after the last round only (each is a histogram release the nodes pay for); 0: none.
    # Without DP the server evaluates after every round, whatever this says.
    dp_evaluate_every: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _dp_defaults(
        cls, data: Any, handler: ModelWrapValidatorHandler[FederationConfig]
    ) -> FederationConfig:
        """Under DP, `dp_defaults` for the fields it names that the input does not set.

        Filled fields stay out of ``model_fields_set``: they remain defaults, so
        `with_dp_epsilon` can resolve them again. A run config (`to_run_config`) carries them
        as values, so the ServerApp reads back the very same settings.
        """
        filled: list[str] = []
        if isinstance(data, Mapping) and data.get("dp_epsilon") not in (None, ""):
            filled = [key for key in DP_DEFAULTS if data.get(key) in (None, "")]
            data = {**data, **{key: DP_DEFAULTS[key] for key in filled}}
        config = handler(data)
        # The model's and task's own DP values (`DP_LEARNING_RATES`, `dp_average_rounds`) once
        # both are validated; same types as the generic ones, so nothing needs validating again.
        own = dp_defaults(config.model, config.task)
        config.__dict__.update({key: own[key] for key in filled})
        config.__pydantic_fields_set__.difference_update(filled)
        return config

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        # An unknown model or override fails here.
        validate_model_config(self.model, self.model_overrides)
        check_strategy(self.strategy, self.strategy_params)
        if self.proximal_mu > 0 and self.strategy != "fedprox":
            raise ValueError(
                f"proximal_mu applies to strategy 'fedprox' only, not {self.strategy!r}"
            )
        return self

    def with_dp_epsilon(self, epsilon: float | None) -> FederationConfig:
        """This config proposing ``epsilon`` (None: no DP), its defaults resolved again.

        Unlike ``model_copy``, the local-training fields the user did not set follow the new
        proposal (`dp_defaults` under DP, the field defaults without); set ones stay.
        """
        raw = self.model_dump(exclude_unset=True, exclude={"dp_epsilon"})
        return self.validated({**raw, "dp_epsilon": epsilon}, "the federation config")

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
            if name in _EMPTY_IS_NONE and value == "":
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

    @property
    def privacy_budget(self) -> PrivacyBudget | None:
        """The budget the server proposes to every institution; None proposes no DP."""
        if self.dp_epsilon is None:
            return None
        return PrivacyBudget(
            epsilon=self.dp_epsilon,
            delta=self.dp_delta,
            max_grad_norm=self.dp_max_grad_norm,
            accountant=self.dp_accountant,
        )

    def evaluates(self, server_round: int) -> bool:
        """Whether the server asks the nodes for a federated evaluation after ``server_round``.

        Without DP after every round (exact metrics, as always). Under DP each evaluation is a
        noised release every node pays for from its budget, and its noise grows with the number
        of evaluations the run plans (`privacy.budget.histogram_noise_std`): by default only the
        last round's, the figure a consortium needs, else every ``dp_evaluate_every`` rounds and
        the last.
        """
        if self.fraction_evaluate == 0 or not 1 <= server_round <= self.rounds:
            return False
        if self.privacy_budget is None:
            return True
        every = self.dp_evaluate_every
        if every == 0:
            return False
        return server_round == self.rounds or (every is not None and server_round % every == 0)

    @property
    def first_averaged_round(self) -> int:
        """The first round whose global model enters the released mean (`average_rounds`)."""
        return first_averaged_round(self.rounds, self.average_rounds)

    @property
    def planned_evaluations(self) -> int:
        """The federated evaluations the run asks of a node (the rounds `evaluates` picks)."""
        return sum(self.evaluates(r) for r in range(1, self.rounds + 1))

    @property
    def local_learning_rate(self) -> float:
        """The nodes' learning rate: ``learning_rate``, else the model config's."""
        if self.learning_rate is not None:
            return self.learning_rate
        return float(validate_model_config(self.model, self.model_overrides).learning_rate)

    def round_settings(self, spec_fingerprint: str, run_id: str = "") -> RoundSettings:
        """What every node is told about a round (before the strategy adds its own keys).

        The DP parameters are sent without a proposed epsilon too: a node that requires DP
        applies them to its own budget (`privacy.budget.node_budget`).
        """
        budget = self.privacy_budget
        return RoundSettings(
            model=self.model,
            model_overrides=self.model_overrides,
            task=self.task,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.local_learning_rate,
            seed=self.seed,
            spec_fingerprint=spec_fingerprint,
            run_id=run_id,
            planned_rounds=self.rounds,
            # A node under DP pays for exactly these up front (its training noise is calibrated
            # for them); each evaluation's noise std follows from their number.
            planned_evaluations=self.planned_evaluations,
            dp_epsilon=budget.epsilon if budget is not None else None,
            dp_delta=self.dp_delta,
            dp_max_grad_norm=self.dp_max_grad_norm,
            dp_accountant=self.dp_accountant,
        )

    def train_config(
        self, spec_fingerprint: str, run_id: str = ""
    ) -> dict[str, bool | int | float | str]:
        """The message config every node receives (see `shared_models.protocol.RoundSettings`)."""
        return self.round_settings(spec_fingerprint, run_id).to_config(base=True)

    # --- from the command line ----------------------------------------------------------------

    @classmethod
    def from_options(
        cls,
        config_path: Path | None,
        options: Mapping[str, Any],
        *,
        source: str = "command-line options",
    ) -> FederationConfig:
        """The config a command's options describe: a TOML file (if given) with options on top.

        Every command that builds a federation (`edufl simulate run`, `edufl server start`,
        `edufl demo`, the reproductions) goes through here.

        Args:
            config_path: A federation config TOML; None starts from the defaults.
            options: Field values; those left at None (an option not given) are dropped, so the
                file's value or the field's default stands.
            source: What the options are called in an error, when there is no file.

        Raises:
            FederationConfigError: the file cannot be read, or a value is invalid, each named.
        """
        given = {key: value for key, value in options.items() if value is not None}
        if config_path is not None:
            return cls.from_toml(config_path, **given)
        return cls.validated(given, source)


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
