"""What a node needs to know for one round, read back from the server's message config.

The server flattens its validated `FederationConfig` into the ``ConfigRecord`` of every train and
evaluate message; the node validates it again here, so a server and a client of different edufl
versions fail with a message that names the offending key instead of training the wrong model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared_models.errors import EduflError
from shared_models.models.registry import MODEL_NAMES, model_config


class RoundSettingsError(EduflError, ValueError):
    """The message config a node received is not one it can act on."""


class RoundSettings(BaseModel):
    """Local-training settings of one round, under the kebab-case keys of the message config."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    model: str = "lstm"  # one of MODEL_NAMES; server and nodes build the same architecture
    model_overrides: dict[str, Any] = Field(default_factory=dict, alias="model-config")
    task: Literal["risk", "grade", "multitask"] = "risk"
    local_epochs: Annotated[int, Field(ge=1, alias="local-epochs")] = 1
    batch_size: Annotated[int, Field(ge=1, alias="batch-size")] = 32
    learning_rate: Annotated[float, Field(gt=0, alias="learning-rate")] = 1e-3
    proximal_mu: Annotated[float, Field(ge=0, alias="proximal-mu")] = 0.0  # sent by FedProx only
    seed: int = 0  # the node's split and its per-round shuffling/dropout seeds derive from it
    spec_fingerprint: str = Field(default="", alias="spec-fingerprint")  # "" = do not check
    spec_path: str = Field(default="", alias="spec-path")  # "" = the node's own or the default
    #: The federation run's own id, stable across server restarts and resumes (the ledger's
    #: ``run_id``); "" = Flower's run id of this message.
    run_id: str = Field(default="", alias="run-id", max_length=64)
    server_round: Annotated[int, Field(ge=0, alias="server-round")] = 0  # set by every strategy
    planned_rounds: Annotated[int, Field(ge=1, alias="planned-rounds")] = 1  # the run's total
    dp_epsilon: Annotated[float, Field(ge=0, alias="dp-epsilon")] = 0.0  # 0: train without DP
    dp_delta: Annotated[float, Field(gt=0, lt=1, alias="dp-delta")] = 1e-5
    dp_max_grad_norm: Annotated[float, Field(gt=0, alias="dp-max-grad-norm")] = 1.0
    dp_accountant: Literal["rdp", "prv"] = Field(default="rdp", alias="dp-accountant")

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        if value not in MODEL_NAMES:
            raise ValueError(f"unknown model {value!r}; valid names are: {', '.join(MODEL_NAMES)}")
        return value

    @field_validator("model_overrides", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"model-config is not valid JSON ({exc})") from None
        return value

    def model_settings(self) -> Any:
        """The validated model config (raises pydantic's error for a bad override)."""
        return model_config(self.model, self.model_overrides)

    def to_config(self) -> dict[str, bool | int | float | str]:
        """The flat key/value form a Flower ``ConfigRecord`` carries."""
        raw = self.model_dump(by_alias=True)
        raw["model-config"] = json.dumps(raw["model-config"], sort_keys=True)
        return raw

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundSettings:
        """Validate a received message config (a ``ConfigRecord`` or a plain mapping).

        Raises:
            RoundSettingsError: a key is unknown or a value invalid; the message lists them.
        """
        try:
            settings = cls.model_validate(dict(config))
            settings.model_settings()
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(config)'}: {err['msg']}"
                for err in exc.errors()
            )
            raise RoundSettingsError(
                f"the server's round config is not valid for this node ({problems}); "
                "are server and node running the same edufl version?"
            ) from None
        return settings
