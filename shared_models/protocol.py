"""The wire protocol between the server and the nodes: every key either side sends, spelled once.

Three vocabularies, each validated where it is received:

- the round settings (`RoundSettings`): the server flattens its `FederationConfig` into the
  ``ConfigRecord`` of every train and evaluate message, and the node validates it again here, so
  a server and a node of different edufl versions fail with a message naming the offending key
  instead of training the wrong model;
- the node config (`NodeConfig`): what ``flower-supernode --node-config`` (or the simulation)
  gives a node, parsed once per message; the launcher writes it with `NodeConfig.to_flower_arg`;
- the reply schema (`Reply`): the only things a reply may carry. `encode_reply` is the node's
  single way to build a reply's content and `read_reply` the server's way to read one. A reply
  of a DP node (``Reply.private``) has its own, much shorter allow-list (`PRIVATE_METRIC_KEYS`):
  the noised update, the released student count as `NUM_EXAMPLES`, noised risk histograms for an
  evaluation, the public noise levels and the signed ledger entries that account for each
  release. No training loss, time, step count, validation or exact evaluation metric: each of
  them depends on the students and is not inside the guarantee (docs/privacy.md).

Light by design: importing it imports neither torch nor flwr nor opacus (the launcher and the
CLI use it), so the model overrides are validated in `RoundSettings.model_settings`, which
imports the model registry when called.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from shared_models.devices import DEVICE_CHOICES, DeviceError, parse_device
from shared_models.errors import (
    DataContractError,
    EduflError,
    PrivacyConfigError,
    PublicError,
)
from shared_models.model_names import MODEL_NAMES

Task = Literal["risk", "grade", "multitask"]
Accountant = Literal["rdp", "prv"]
DPMode = Literal["required", "off"]

# --- keys shared by several vocabularies ---------------------------------------------------------

SPEC_PATH = "spec-path"  # node config only: the server cannot name files on a node
DP_EPSILON = "dp-epsilon"  # round config (the server's proposal) and node config (the budget)
DP_DELTA = "dp-delta"
#: How the round config says "no DP": an epsilon of 0 (a ``ConfigRecord`` cannot hold None).
NO_DP_EPSILON = 0.0


class ProtocolError(EduflError, ValueError):
    """A message config, node config or reply that does not follow the wire protocol."""


class RoundSettingsError(ProtocolError):
    """The message config a node received is not one it can act on."""


def _problems(exc: ValidationError, what: str) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or what}: {err['msg']}" for err in exc.errors()
    )


# --- round settings -----------------------------------------------------------------------------

#: Keys Flower's strategies write into every message's config themselves (``server-round``;
#: FedProx's ``proximal-mu``), so the server's base config leaves them out.
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
RUN_ID = "run-id"
PLANNED_EVALUATIONS = "planned-evaluations"


class RoundSettings(BaseModel):
    """Local-training settings of one round, under the kebab-case keys of the message config."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    model: str = "lstm"  # one of MODEL_NAMES; server and nodes build the same architecture
    model_overrides: dict[str, Any] = Field(default_factory=dict, alias="model-config")
    task: Task = "risk"
    local_epochs: Annotated[int, Field(ge=1, alias="local-epochs")] = 1
    batch_size: Annotated[int, Field(ge=1, alias="batch-size")] = 32
    learning_rate: Annotated[float, Field(gt=0, alias="learning-rate")] = 1e-3
    proximal_mu: Annotated[float, Field(ge=0, alias=PROXIMAL_MU)] = 0.0  # sent by FedProx only
    seed: int = 0  # the node's split and its per-round shuffling/dropout seeds derive from it
    spec_fingerprint: str = Field(default="", alias="spec-fingerprint")  # "" = do not check
    #: The federation run's own id, stable across server restarts and resumes (the ledger's
    #: ``run_id``); "" = Flower's run id of this message.
    run_id: str = Field(default="", alias=RUN_ID, max_length=64)
    server_round: Annotated[int, Field(ge=0, alias=SERVER_ROUND)] = 0  # set by every strategy
    planned_rounds: Annotated[int, Field(ge=1, alias="planned-rounds")] = 1  # the run's total
    #: Federated evaluations the server plans to ask of a node in the run: under DP each is a
    #: histogram release the node's noise calibration pays for up front. None (not sent): one
    #: per planned round, as with evaluation after every round (``fraction-evaluate`` > 0).
    planned_evaluations: Annotated[int, Field(ge=0)] | None = Field(
        default=None, alias=PLANNED_EVALUATIONS
    )
    #: The server's proposed DP budget; None (on the wire `NO_DP_EPSILON`) proposes no DP. The
    #: other DP fields are None when the server sent none: the node's defaults then apply
    #: (`privacy.budget.node_budget`).
    dp_epsilon: Annotated[float, Field(gt=0)] | None = Field(default=None, alias=DP_EPSILON)
    dp_delta: Annotated[float, Field(gt=0, lt=1)] | None = Field(default=None, alias=DP_DELTA)
    dp_max_grad_norm: Annotated[float, Field(gt=0)] | None = Field(
        default=None, alias="dp-max-grad-norm"
    )
    dp_accountant: Accountant | None = Field(default=None, alias="dp-accountant")

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

    @field_validator("dp_epsilon", mode="before")
    @classmethod
    def _no_dp(cls, value: Any) -> Any:
        return None if value == NO_DP_EPSILON else value

    @property
    def evaluations(self) -> int:
        """The evaluations planned for the run (`planned_evaluations`, else one per round)."""
        if self.planned_evaluations is None:
            return self.planned_rounds
        return self.planned_evaluations

    def model_settings(self) -> Any:
        """The validated model config (raises pydantic's error for a bad override)."""
        # Imported here: the registry imports the models, and so torch (a node has it loaded).
        from shared_models.models.registry import validate_model_config

        return validate_model_config(self.model, self.model_overrides)

    def to_config(self, *, base: bool = False) -> dict[str, bool | int | float | str]:
        """The flat key/value form a Flower ``ConfigRecord`` carries.

        Args:
            base: leave out the keys Flower's strategies set per message (`SERVER_ROUND`,
                `PROXIMAL_MU`): the server's config before the strategy adds them.
        """
        raw = self.model_dump(by_alias=True)
        raw["model-config"] = json.dumps(raw["model-config"], sort_keys=True)
        raw[DP_EPSILON] = NO_DP_EPSILON if self.dp_epsilon is None else self.dp_epsilon
        if base:
            del raw[SERVER_ROUND], raw[PROXIMAL_MU]
        return {key: value for key, value in raw.items() if value is not None}

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
            raise RoundSettingsError(
                f"the server's round config is not valid for this node "
                f"({_problems(exc, '(config)')}); are server and node running the same edufl "
                "version?"
            ) from None
        return settings


# --- node config --------------------------------------------------------------------------------

DATA_PATH = "data-path"
INSTITUTION = "institution"  # also the key of the reply's `NODE_RECORD`
PRIVACY_STATE = "privacy-state"
PRIVACY_ROOT = "privacy-root"
PRIVACY_KEY = "privacy-key"
DP_MODE = "dp"
#: The largest DP-SGD noise multiplier this node trains at; above it a round is declined.
DP_MAX_NOISE = "dp-max-noise"
#: The most parameters a message's weights may have on this node (`client.node.own_code`).
MAX_MODEL_PARAMS = "max-model-params"
#: What Flower's simulation puts in every virtual node's config.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
#: This institution's edufl home: the final global model is adopted into HOME/models.
HOME_PATH = "home-path"
#: Where this node trains and scores: auto, cpu, cuda or cuda:N (`shared_models.devices`).
DEVICE = "device"
#: Torch threads for this node's training and scoring (unset: torch's own, one per core).
THREADS = "threads"
_DP_KEYS = (DP_MODE, DP_EPSILON, DP_DELTA, DP_MAX_NOISE)


class MissingDataPath(DataContractError, PublicError):
    """A node config without the export's path (public: names no student)."""


class NodeConfigError(ProtocolError):
    """A node config (``--node-config``) with an unknown key or an invalid value."""


class NodeConfig(BaseModel):
    """One node's own settings, from ``flower-supernode --node-config`` or the simulation.

    Without ``dp`` (simulations) the server's proposal decides whether a round trains with DP;
    ``edufl client start`` sets ``dp="required"`` (every round trains with DP-SGD, whatever the
    server asks) unless started with ``--no-dp`` (``dp="off"``: a round the server asks without
    DP trains without it and is recorded as non-private in the signed ledger). ``dp-epsilon`` /
    ``dp-delta`` are the institution's budget for a run and override the server's proposal;
    ``dp-max-noise`` is the noise multiplier above which it declines a round (its budget left
    could only pay for an update that is mostly noise).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    data_path: str | None = Field(default=None, alias=DATA_PATH)  # the institution's export
    institution: str | None = Field(default=None, alias=INSTITUTION)  # else the folder's name
    spec_path: str | None = Field(default=None, alias=SPEC_PATH)  # else the default spec
    #: This institution's DP state folder (accountant, ledger, released updates) ...
    privacy_state: str | None = Field(default=None, alias=PRIVACY_STATE)
    #: ... else ROOT/<institution> (a simulation: <out-dir>/privacy).
    privacy_root: str | None = Field(default=None, alias=PRIVACY_ROOT)
    privacy_key: str | None = Field(default=None, alias=PRIVACY_KEY)  # signs the ledger entries
    dp: DPMode | None = Field(default=None, alias=DP_MODE)
    dp_epsilon: Annotated[float, Field(gt=0)] | None = Field(default=None, alias=DP_EPSILON)
    dp_delta: Annotated[float, Field(gt=0, lt=1)] | None = Field(default=None, alias=DP_DELTA)
    #: None: `privacy.budget.DEFAULT_MAX_NOISE_MULTIPLIER`. The server cannot raise it.
    dp_max_noise: Annotated[float, Field(gt=0)] | None = Field(default=None, alias=DP_MAX_NOISE)
    partition_id: Annotated[int, Field(ge=0)] | None = Field(default=None, alias=PARTITION_ID)
    num_partitions: Annotated[int, Field(ge=1)] | None = Field(default=None, alias=NUM_PARTITIONS)
    #: A deployed node refuses larger weights before building anything; None: no bound.
    max_model_params: Annotated[int, Field(ge=1)] | None = Field(
        default=None, alias=MAX_MODEL_PARAMS
    )
    #: Where a delivered final model is adopted (`client.early_warning.adopt`); None: the
    #: node keeps none (a simulation's virtual nodes).
    home_path: str | None = Field(default=None, alias=HOME_PATH)
    #: None trains on the CPU, as before the key existed; `edufl client start` sets it.
    device: str | None = Field(default=None, alias=DEVICE)
    #: None: torch's own choice (a thread per core). Where several nodes or other jobs share
    #: the cores, 1: a second thread spinning for a busy core made a DP round 6x slower.
    threads: Annotated[int, Field(ge=1)] | None = Field(default=None, alias=THREADS)

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        try:
            return None if value is None else parse_device(value, option=DEVICE)
        except DeviceError:
            raise PydanticCustomError("device", f"not a device; use {DEVICE_CHOICES}") from None

    @classmethod
    def parse(cls, node_config: Mapping[str, Any]) -> NodeConfig:
        """Validate a node's config (Flower's ``context.node_config``).

        Raises:
            PrivacyConfigError: a DP key (``dp``, ``dp-epsilon``, ``dp-delta``) is invalid.
            NodeConfigError: another key is unknown or invalid; the message lists them.
        """
        try:
            # Flower's keys only: the field names are for the launcher's constructor.
            return cls.model_validate(dict(node_config), by_alias=True, by_name=False)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                key = str(err["loc"][0]) if err["loc"] else "(node config)"
                if err["type"] == "extra_forbidden":
                    valid = ", ".join(f.alias or n for n, f in cls.model_fields.items())
                    problems.append(f"{key}: unknown key (a typo?); valid keys: {valid}")
                elif key == DP_MODE:
                    problems.append(
                        f"{DP_MODE}={node_config.get(key)!r} is not valid; use 'required' or 'off'"
                    )
                else:
                    problems.append(f"{key}={node_config.get(key)!r}: {err['msg']}")
            error = (
                PrivacyConfigError
                if all(str(e["loc"][0]) in _DP_KEYS for e in exc.errors() if e["loc"])
                else NodeConfigError
            )
            raise error(f"this node's config is not valid: {'; '.join(problems)}") from None

    def export_path(self) -> str:
        """``data-path``, which every node must have.

        Raises:
            DataContractError: it is not set; the message says how to set it.
        """
        if not self.data_path:
            raise MissingDataPath(
                f"this node has no {DATA_PATH!r} in its node config; start it with "
                f"--node-config '{DATA_PATH}=\"/path/to/export\"'"
            )
        return self.data_path

    def to_node_config(self) -> dict[str, str | int | float]:
        """The flat form of Flower's ``context.node_config`` (unset keys left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)

    def to_flower_arg(self) -> str:
        """The value of ``flower-supernode --node-config``: ``key="text" key=1.5 ...``.

        Raises:
            NodeConfigError: a text holds both quote characters (Flower cannot parse it).
        """
        parts = []
        for key, value in self.to_node_config().items():
            if isinstance(value, str):
                value = _flower_quoted(key, value)
            elif isinstance(value, float):
                value = repr(value)
            parts.append(f"{key}={value}")
        return " ".join(parts)


def _flower_quoted(key: str, value: str) -> str:
    # Flower splits on `key="..."` / `key='...'` and reads each value as TOML: a basic string
    # ("...", backslashes escaped) unless it holds a double quote, then a literal one ('...').
    if '"' not in value:
        escaped = value.replace("\\", "\\\\")
        return f'"{escaped}"'
    if "'" not in value:
        return f"'{value}'"
    raise NodeConfigError(f"node config {key}={value!r}: a value cannot hold both ' and \"")


# --- the reply schema ---------------------------------------------------------------------------

#: Record names of a reply's ``RecordDict``.
ARRAYS_RECORD = "arrays"  # ArrayRecord: the trained weights (train replies only)
METRICS_RECORD = "metrics"  # MetricRecord: NUM_EXAMPLES and aggregate metrics
#: ConfigRecord: INSTITUTION (the institution's name, not a student's) and, in a DP reply, the
#: signed ledger entries (LEDGER_ENTRY, LEDGER_EARLIER: aggregate DP parameters). One record, not
#: two: each record is one more object, one more authenticated request to the SuperLink, in
#: every reply of every round (docs/benchmarks.md, question 4).
NODE_RECORD = "node"
#: Where the replies of earlier edufl nodes (before 2026-12-03) carried the ledger entries;
#: `read_reply` still reads it.
PRIVACY_RECORD = "privacy"

#: The weight of a reply in aggregation (Flower's strategies' default ``weighted_by_key``).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train/loss"  # mean loss of the last local epoch
TRAIN_SECONDS = "train/seconds"  # local training time
TRAIN_STEPS = "train/steps"  # optimizer steps taken (the ledger counts them)
LOSS = "loss"  # the task loss of an evaluation
VAL_PREFIX = "val/"  # a train reply's metrics on the node's validation split
#: Aggregate metrics of each head, always sent (NaN when undefined) so every reply of a round
#: carries the same keys, which Flower's strategies require before they aggregate.
HEAD_METRICS: dict[str, tuple[str, ...]] = {
    "risk": ("roc_auc", "accuracy", "precision", "recall", "f1", "average_precision", "brier"),
    "grade": ("mse", "rmse", "mae", "r2"),
    "engagement": ("mse", "rmse", "mae", "r2"),
}

#: Under DP a train reply's metrics hold only `NUM_EXAMPLES` (the node's noised student count,
#: the DP count release of the run) and an evaluate reply's only these too: the noised histograms
#: of predicted risk on the node's test students (one count per student), at-risk students in
#: `RISK_HIST_POS` and the others in `RISK_HIST_NEG`, `RISK_HIST_BINS` equal bins over [0, 1],
#: with `NOISE_HIST_STD` the standard deviation of the Gaussian noise on each count (public).
RISK_HIST_BINS = 10
RISK_HIST_POS = "risk/hist-pos"  # list[float], RISK_HIST_BINS noised counts
RISK_HIST_NEG = "risk/hist-neg"
NOISE_HIST_STD = "noise/hist-std"
NOISE_COUNT_STD = "noise/count-std"  # std of the noise on NUM_EXAMPLES under DP

#: The privacy record's keys: the round's signed entry, and the run's earlier entries of the
#: node's chain (a JSON list), so the server's ledger can fill a gap.
LEDGER_ENTRY = "privacy-ledger-entry"
LEDGER_EARLIER = "privacy-ledger-earlier"


def metric_key(head: str, name: str, *, validation: bool = False) -> str:
    """The key of ``head``'s metric ``name`` (e.g. ``risk/roc_auc``), ``val/`` for validation.

    Raises:
        ProtocolError: the head or metric is not in `HEAD_METRICS`.
    """
    if name not in HEAD_METRICS.get(head, ()):
        raise ProtocolError(f"no metric {name!r} of head {head!r} in the reply schema")
    return f"{VAL_PREFIX if validation else ''}{head}/{name}"


def evaluation_keys(prefix: str = "") -> tuple[str, ...]:
    """Every key an evaluation (``prefix`` ``""``) or a validation (`VAL_PREFIX`) may report."""
    keys = [f"{prefix}{LOSS}"]
    keys += [f"{prefix}{head}/{name}" for head, names in HEAD_METRICS.items() for name in names]
    return tuple(keys)


#: The metrics the run's reports and progress lines quote.
RISK_ROC_AUC = metric_key("risk", "roc_auc")
RISK_ACCURACY = metric_key("risk", "accuracy")
RISK_F1 = metric_key("risk", "f1")
RISK_RECALL = metric_key("risk", "recall")
VAL_RISK_ROC_AUC = metric_key("risk", "roc_auc", validation=True)

#: The allow-list of metric keys: nothing else may leave a node in a reply's metrics.
METRIC_KEYS: frozenset[str] = frozenset(
    (
        NUM_EXAMPLES,
        TRAIN_LOSS,
        TRAIN_SECONDS,
        TRAIN_STEPS,
        *evaluation_keys(),
        *evaluation_keys(VAL_PREFIX),
    )
)
#: The allow-list of a DP node's reply metrics (besides `NUM_EXAMPLES`, the released count):
#: values released through a Gaussian mechanism accounted in the node's ledger, and the public
#: standard deviations of their noise. Nothing else leaves a DP node.
PRIVATE_METRIC_KEYS: frozenset[str] = frozenset(
    (NOISE_COUNT_STD, RISK_HIST_POS, RISK_HIST_NEG, NOISE_HIST_STD)
)
_HISTOGRAM_KEYS = (RISK_HIST_POS, RISK_HIST_NEG)
RecordKind = Literal["ArrayRecord", "MetricRecord", "ConfigRecord"]


@dataclass(frozen=True)
class Reply:
    """Everything a node's reply may carry; `encode_reply` lays it out on the wire."""

    #: Training (or test) records behind the update or the metrics; under DP the node's
    #: released (noised) student count, never an exact one.
    num_examples: int
    #: Aggregate only, each key in `METRIC_KEYS`; under DP in `PRIVATE_METRIC_KEYS` (the
    #: histograms as lists of `RISK_HIST_BINS` floats).
    metrics: Mapping[str, float | list[float]]
    institution: str
    weights: Mapping[str, Any] | None = None  # name -> numpy array; train replies only
    ledger_entry: str | None = None  # the round's signed ledger entry (text)
    ledger_earlier: str = ""  # the run's earlier entries of the chain (a JSON list's text)
    private: bool = False  # a DP node's reply: only released values may leave (see above)


@dataclass(frozen=True)
class ReplyRecord:
    """One record of a reply's content, in the order it is added."""

    name: str
    kind: RecordKind
    items: dict[str, Any]


def encode_reply(reply: Reply) -> tuple[ReplyRecord, ...]:
    """The records of ``reply``: the one way a node builds a reply's content.

    Raises:
        ProtocolError: a metric is not in the allow-list (`METRIC_KEYS`, or for a private reply
            `PRIVATE_METRIC_KEYS`) or not a number (a histogram: not `RISK_HIST_BINS`
            numbers), or a private reply carries no ledger entry.
    """
    allowed = PRIVATE_METRIC_KEYS if reply.private else METRIC_KEYS
    unknown = sorted(set(reply.metrics) - allowed)
    if unknown:
        schema = "the DP reply schema (released values only)" if reply.private else "the schema"
        raise ProtocolError(f"metrics {unknown} are not in {schema}; they may not leave")
    if reply.private and reply.ledger_entry is None:
        raise ProtocolError("a DP reply must carry the signed ledger entry of what it releases")
    metrics: dict[str, int | float | list[float]] = {NUM_EXAMPLES: int(reply.num_examples)}
    for key, value in reply.metrics.items():
        if key in _HISTOGRAM_KEYS:
            metrics[key] = _histogram(key, value)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"metric {key!r} must be a number, got {value!r}")
        metrics[key] = value
    records = []
    if reply.weights is not None:
        records.append(ReplyRecord(ARRAYS_RECORD, "ArrayRecord", dict(reply.weights)))
    records.append(ReplyRecord(METRICS_RECORD, "MetricRecord", metrics))
    node: dict[str, str] = {INSTITUTION: reply.institution}
    if reply.ledger_entry is not None:
        node |= {LEDGER_ENTRY: reply.ledger_entry, LEDGER_EARLIER: reply.ledger_earlier}
    records.append(ReplyRecord(NODE_RECORD, "ConfigRecord", node))
    return tuple(records)


def _histogram(key: str, value: Any) -> list[float]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != RISK_HIST_BINS
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ProtocolError(f"metric {key!r} must be {RISK_HIST_BINS} numbers, got {value!r}")
    return [float(v) for v in value]


@dataclass(frozen=True)
class ReceivedReply:
    """What the server reads from a reply (besides the weights the guard checks)."""

    metrics: dict[str, float]
    institution: str = ""  # "" if the reply names none
    ledger_entry: str = ""  # "" if it sent none
    ledger_earlier: str = ""
    #: A DP evaluation's noised histograms (`RISK_HIST_POS`, `RISK_HIST_NEG`), if it sent any.
    histograms: dict[str, list[float]] = field(default_factory=dict)


def reply_institution(config_records: Mapping[str, Mapping[str, Any]]) -> str:
    """The institution a reply names in its `NODE_RECORD`, or ``""``."""
    name = config_records.get(NODE_RECORD, {}).get(INSTITUTION)
    return name if isinstance(name, str) else ""


def read_reply(
    metric_records: Mapping[str, Mapping[str, Any]],
    config_records: Mapping[str, Mapping[str, Any]],
) -> ReceivedReply:
    """Read a reply's records (name -> items): the server's one way to interpret a reply."""
    metrics: dict[str, float] = {}
    histograms: dict[str, list[float]] = {}
    for record in metric_records.values():
        metrics |= {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
        histograms |= {
            k: [float(x) for x in v]
            for k, v in record.items()
            if k in _HISTOGRAM_KEYS and isinstance(v, list | tuple)
        }
    privacy = config_records.get(NODE_RECORD, {})
    if LEDGER_ENTRY not in privacy:  # a node of an earlier edufl: its own record
        privacy = config_records.get(PRIVACY_RECORD, {})
    return ReceivedReply(
        metrics=metrics,
        institution=reply_institution(config_records),
        ledger_entry=str(privacy.get(LEDGER_ENTRY, "")),
        ledger_earlier=str(privacy.get(LEDGER_EARLIER, "")),
        histograms=histograms,
    )


# --- the final model's delivery -----------------------------------------------------------------

#: After the last round the server sends every connected node a ``query`` message: the final
#: global weights in `ARRAYS_RECORD` and, in this ConfigRecord, the round settings of the final
#: checkpoint (model, overrides, task, seed, spec fingerprint, run id, round) with
#: `WEIGHTS_SHA256`. The node's acknowledgement carries this record too, holding only `ADOPTED`
#: and `WEIGHTS_SHA256`, beside the `NODE_RECORD`.
DELIVERY_RECORD = "delivery"
WEIGHTS_SHA256 = "weights-sha256"  # `weights_sha256` of the delivered weights
ADOPTED = "adopted"  # bool: the node verified the model and adopted it into its home


class DeliveryError(ProtocolError):
    """A delivery message that does not say which model it carries."""


def weights_sha256(weights: Mapping[str, Any]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``weights`` (name -> array), by name.

    The same weights give the same digest on every machine, whatever order they travel in.
    """
    import hashlib

    import numpy as np  # here, not at the top: the launcher and the CLI import this module

    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Delivery:
    """What a delivery message says about the weights it carries."""

    #: The final checkpoint's model, overrides, task, seed, spec fingerprint, run id and round.
    settings: RoundSettings
    weights_sha256: str

    def to_config(self) -> dict[str, bool | int | float | str]:
        """The flat form of the message's `DELIVERY_RECORD`."""
        return {**self.settings.to_config(), WEIGHTS_SHA256: self.weights_sha256}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Delivery:
        """Validate a received delivery record.

        Raises:
            DeliveryError: no checksum, run id, round or spec fingerprint.
            RoundSettingsError: a round setting is unknown or invalid.
        """
        values = dict(config)
        checksum = values.pop(WEIGHTS_SHA256, None)
        settings = RoundSettings.from_config(values)
        missing = [
            key
            for key, ok in (
                (WEIGHTS_SHA256, isinstance(checksum, str) and len(checksum) == 64),
                (RUN_ID, bool(settings.run_id)),
                (SERVER_ROUND, settings.server_round >= 1),
                ("spec-fingerprint", bool(settings.spec_fingerprint)),
            )
            if not ok
        ]
        if missing:
            raise DeliveryError(
                f"the server's delivery of the final model lacks {', '.join(missing)}; it "
                "cannot be verified, so it was not adopted. Are server and node running the "
                "same edufl version?"
            )
        return cls(settings, str(checksum))


@dataclass(frozen=True)
class Acknowledgement:
    """A node's answer to a delivery: nothing about its students (see `client.app`)."""

    adopted: bool
    weights_sha256: str  # of the weights the node received and verified
    institution: str


def encode_acknowledgement(ack: Acknowledgement) -> tuple[ReplyRecord, ...]:
    """The records of a node's acknowledgement: the one way a node builds one."""
    delivery = {ADOPTED: bool(ack.adopted), WEIGHTS_SHA256: str(ack.weights_sha256)}
    return (
        ReplyRecord(DELIVERY_RECORD, "ConfigRecord", delivery),
        ReplyRecord(NODE_RECORD, "ConfigRecord", {INSTITUTION: ack.institution}),
    )


def read_acknowledgement(config_records: Mapping[str, Mapping[str, Any]]) -> Acknowledgement:
    """What the server reads from an acknowledgement (an unreadable one: not adopted)."""
    record = config_records.get(DELIVERY_RECORD, {})
    adopted = record.get(ADOPTED)
    checksum = record.get(WEIGHTS_SHA256)
    return Acknowledgement(
        adopted=adopted is True,
        weights_sha256=checksum if isinstance(checksum, str) else "",
        institution=reply_institution(config_records),
    )


# --- weights on the wire: one packed array per message ------------------------------------------

#: In a deployment a message's (or a reply's) weights travel as one array, not one per tensor:
#: Flower 1.41 moves every array of a message as objects of their own, each asked for in its own
#: HTTPS request by the SuperNode and by the ServerApp (docs/benchmarks.md, question 4). The
#: ServerApp's grid (`server.superlink.packing`) and the node's task (`client.node.packing`)
#: pack and unpack at the transport, with the codec below; the strategy, the guard, the
#: ClientApp and `weights_sha256` see the same named tensors as before. A simulation sends
#: them unpacked.
PACKED_ARRAY = "edufl-packed"
PACKED_STYPE = "edufl.packed/1"
#: The dtypes a packed entry may have (numpy's ``dtype.str``): numbers only, never objects.
_PACKED_KINDS = frozenset("fiub")
_HEADER_BYTES = 4


class PackedArraysError(ProtocolError):
    """A packed array that cannot be unpacked: truncated, inconsistent or not numbers."""


def pack_arrays(arrays: Mapping[str, Any]) -> bytes:
    """``arrays`` (name -> numpy array) as one buffer: a JSON header (name, dtype, shape of
    each, in order) behind its 4-byte length, then each array's C-order bytes."""
    import numpy as np

    entries, chunks = [], []
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype.kind not in _PACKED_KINDS:
            raise PackedArraysError(f"array {name!r} has dtype {array.dtype}; only numbers pack")
        entries.append({"name": str(name), "dtype": array.dtype.str, "shape": list(array.shape)})
        chunks.append(array.tobytes(order="C"))
    header = json.dumps(entries, separators=(",", ":")).encode()
    return len(header).to_bytes(_HEADER_BYTES, "little") + header + b"".join(chunks)


def unpack_arrays(blob: bytes) -> dict[str, Any]:
    """The arrays `pack_arrays` packed, by name, in order (each its own writable copy).

    Raises:
        PackedArraysError: the buffer is truncated or longer than its header says, or an entry
            has no name, a repeated name, a non-numeric dtype or an invalid shape.
    """
    import numpy as np

    def bad(why: str) -> PackedArraysError:
        return PackedArraysError(
            f"the weights' packed array is corrupt ({why}); are server and node running the "
            "same edufl version?"
        )

    if len(blob) < _HEADER_BYTES:
        raise bad(f"{len(blob)} bytes, shorter than its header")
    size = int.from_bytes(blob[:_HEADER_BYTES], "little")
    if size > len(blob) - _HEADER_BYTES:
        raise bad(f"a {size}-byte header in {len(blob)} bytes")
    try:
        entries = json.loads(blob[_HEADER_BYTES : _HEADER_BYTES + size])
        if not isinstance(entries, list):
            raise ValueError("not a list")
    except ValueError as exc:
        raise bad(f"unreadable header: {exc}") from None
    offset = _HEADER_BYTES + size
    arrays: dict[str, Any] = {}
    for k, entry in enumerate(entries):
        try:
            name, dtype = entry["name"], np.dtype(entry["dtype"])
            shape = tuple(int(n) for n in entry["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"entry {k}: {exc}") from None
        if not isinstance(name, str) or not name or name in arrays:
            raise bad(f"entry {k}: a missing or repeated name {name!r}")
        if dtype.kind not in _PACKED_KINDS or any(n < 0 for n in shape):
            raise bad(f"{name!r}: dtype {dtype} or shape {shape} is not a numeric array's")
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = dtype.itemsize * count
        if offset + nbytes > len(blob):
            raise bad(f"{name!r}: {nbytes} bytes of data, {len(blob) - offset} left")
        flat = np.frombuffer(blob, dtype, count=count, offset=offset)
        arrays[name] = flat.reshape(shape).copy()
        offset += nbytes
    if offset != len(blob):
        raise bad(f"{len(blob) - offset} bytes after the last array")
    return arrays


@dataclass(frozen=True)
class RecordTypes:
    """Flower's record classes, handed in by the transport that packs (this layer knows no
    Flower): ``record_dict()`` an empty ``RecordDict``, ``array_record`` the ``ArrayRecord``
    class, ``array`` the ``Array`` class."""

    record_dict: Any
    array_record: Any
    array: Any


def pack_records(content: Mapping[str, Any], types: RecordTypes) -> Any:
    """``content`` (a Flower ``RecordDict``) with each ArrayRecord of several numpy arrays
    packed into one array (`PACKED_ARRAY`); other records, and their order, unchanged."""
    packed = types.record_dict()
    for name, record in content.items():
        if (
            isinstance(record, types.array_record)
            and len(record) > 1
            and all(array.stype == "numpy.ndarray" for array in record.values())
        ):
            blob = pack_arrays({key: array.numpy() for key, array in record.items()})
            array = types.array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)
            record = types.array_record({PACKED_ARRAY: array})
        packed[name] = record
    return packed


def unpack_records(content: Mapping[str, Any], types: RecordTypes) -> Any:
    """``content`` with each packed ArrayRecord (`pack_records`) back to its named arrays.

    Raises:
        PackedArraysError: a packed array is corrupt, or sits beside other arrays.
    """
    unpacked = types.record_dict()
    for name, record in content.items():
        if isinstance(record, types.array_record) and PACKED_ARRAY in record:
            array = record[PACKED_ARRAY]
            if len(record) != 1 or array.stype != PACKED_STYPE:
                raise PackedArraysError(
                    f"record {name!r} holds {PACKED_ARRAY!r} of type {array.stype!r} beside "
                    f"{len(record) - 1} other array(s); are server and node running the same "
                    "edufl version?"
                )
            arrays = unpack_arrays(bytes(array.data))
            record = types.array_record({key: types.array(value) for key, value in arrays.items()})
        unpacked[name] = record
    return unpacked
