"""Experiment configs of `edufl reproduce`: one TOML file per seed-paper experiment, validated.

The files live in ``simulations/reproduce/experiments/`` (package data). Each names the models
of a paper's
comparison (registry names, with overrides), the scikit-learn baselines, the metrics and the
paper's own figures, so one generic runner reproduces every experiment. A typo in a key fails
loudly with the key's path (``models.1.overrides``), as every edufl config does.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from privacy.budget import DEFAULT_DELTA, DEFAULT_EPSILON, DEFAULT_MAX_GRAD_NORM
from server.averaging import dp_average_rounds, first_averaged_round
from shared_models.baselines import baseline_names
from shared_models.data.contract import default_spec, load_spec
from shared_models.errors import EduflError
from shared_models.models.registry import MODEL_NAMES, validate_model_config

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"
DATASETS_DIR = Path(__file__).resolve().parents[1] / "datasets"

Mode = Literal["centralized", "federated", "federated-dp"]
MODES: tuple[Mode, ...] = ("centralized", "federated", "federated-dp")
Target = Literal["risk", "grade", "both"]
DatasetName = Literal["synthetic", "oulad", "uci", "uci-por", "uci-mat"]
DATASET_NAMES: tuple[DatasetName, ...] = ("synthetic", "oulad", "uci", "uci-por", "uci-mat")

#: Metrics of each head, as `shared_models.metrics` names them.
RISK_METRICS = ("roc_auc", "accuracy", "precision", "recall", "f1", "average_precision", "brier")
GRADE_METRICS = ("mse", "rmse", "mae", "r2")
LOWER_IS_BETTER = frozenset({"mse", "rmse", "mae", "brier"})
Metric = Literal[
    "roc_auc", "accuracy", "precision", "recall", "f1", "average_precision", "brier",
    "mse", "rmse", "mae", "r2",
]  # fmt: skip
#: How tables and plots name each metric.
METRIC_LABELS = {
    "roc_auc": "ROC-AUC", "accuracy": "accuracy", "precision": "precision", "recall": "recall",
    "f1": "F1", "average_precision": "average precision", "brier": "Brier", "mse": "MSE",
    "rmse": "RMSE", "mae": "MAE", "r2": "R²",
}  # fmt: skip
HEADS: dict[str, tuple[str, ...]] = {
    "risk": ("risk",),
    "grade": ("grade",),
    "both": ("risk", "grade"),
}


class ReproductionError(EduflError, ValueError):
    """A reproduction that cannot run as asked (unknown experiment, missing data, bad option)."""


class ExperimentConfigError(ReproductionError):
    """An experiment config file that is not valid; the message names each bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DPTuning(_Strict):
    """One row's own DP-SGD settings, over the experiment's ``[dp]`` (None: the experiment's).

    A model with a few dozen weights (the DP logistic) wants larger batches and steps than a
    recurrent net under the same noise: fewer, less noisy steps for the same epsilon. A recurrent
    net short of training wants more rounds: the accountant spreads the same epsilon over them.
    """

    learning_rate: Annotated[float, Field(gt=0)] | None = None
    batch_size: Annotated[int, Field(ge=1)] | None = None
    local_epochs: Annotated[int, Field(ge=1)] | None = None
    rounds: Annotated[int, Field(ge=1)] | None = None  # the federated-dp run's, this row only
    average_rounds: Annotated[float, Field(ge=0, le=1)] | None = None  # see DifferentialPrivacy


class ModelEntry(_Strict):
    """One neural model of the comparison: a registry model with hyper-parameter overrides."""

    label: Annotated[str, Field(min_length=1)]  # its row in the tables, e.g. "CNN-LSTM (hybrid)"
    model: str  # shared_models.models.registry.MODEL_NAMES
    overrides: dict[str, Any] = Field(default_factory=dict)  # e.g. {mode = "lstm"}
    modes: list[Mode] | None = Field(default=None, min_length=1)  # None: the experiment's modes
    dp: DPTuning | None = None  # this row's federated-dp settings; None: the experiment's [dp]

    @model_validator(mode="after")
    def _known(self) -> ModelEntry:
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; valid names: {', '.join(MODEL_NAMES)}")
        # An unknown or out-of-range override fails here.
        validate_model_config(self.model, self.overrides)
        if self.dp is not None and self.modes is not None and "federated-dp" not in self.modes:
            raise ValueError(f"row {self.label!r} has dp settings but does not run federated-dp")
        return self

    def runs_in(self, mode: str) -> bool:
        """Whether this row is trained in ``mode``."""
        return self.modes is None or mode in self.modes


class NaiveBaseline(_Strict):
    """Cortez & Silva's naive predictor: the final grade is the last observed period grade."""

    feature: str  # a dynamic feature on the grade's own scale (UCI: period_grade)
    label: str = "naive (last grade)"


class PairedTest(_Strict):
    """A paired test of one row against others, over the repeats of centralized training."""

    reference: str  # a model label, e.g. the hybrid
    against: list[str] = Field(min_length=1)  # model labels or baseline names


class Training(_Strict):
    """Centralized training (`shared_models.training.fit`)."""

    max_epochs: Annotated[int, Field(ge=1)] = 60
    patience: Annotated[int, Field(ge=1)] = 10  # epochs without validation improvement
    batch_size: Annotated[int, Field(ge=1)] = 32
    class_weighting: bool = False


class Federated(_Strict):
    """Federated runs (`server.config.FederationConfig` fields) on Flower's Ray simulation."""

    rounds: Annotated[int, Field(ge=1)] = 10
    local_epochs: Annotated[int, Field(ge=1)] = 2
    batch_size: Annotated[int, Field(ge=1)] = 32
    learning_rate: Annotated[float, Field(gt=0)] = 1e-3
    strategy: str = "fedavg"
    repeats: Annotated[int, Field(ge=1)] = 3  # seeds per model; each seed is one simulation


class DifferentialPrivacy(_Strict):
    """DP-SGD at every institution for the federated-dp runs (epsilon per institution, per run)."""

    epsilon: Annotated[float, Field(gt=0)] = DEFAULT_EPSILON
    delta: Annotated[float, Field(gt=0, lt=1)] = DEFAULT_DELTA  # below 1 / students of any one
    max_grad_norm: Annotated[float, Field(gt=0)] = DEFAULT_MAX_GRAD_NORM
    learning_rate: Annotated[float, Field(gt=0)] | None = None  # None: the federated one
    batch_size: Annotated[int, Field(ge=1)] | None = None  # None: the federated one
    local_epochs: Annotated[int, Field(ge=1)] | None = None  # None: the federated one
    # None: the federated one. More rounds at the same epsilon: more, noisier steps (the
    # accountant calibrates the noise to every step of the run).
    rounds: Annotated[int, Field(ge=1)] | None = None
    # The released model: the mean of the global models of this share of the last rounds
    # (`server.averaging`); None: the federation's DP default (the last half).
    average_rounds: Annotated[float, Field(ge=0, le=1)] | None = None


def released_model(dp: DifferentialPrivacy, rounds: int, target: Target) -> str:
    """Which rounds' global models a DP run's released model averages, in words (the
    federation's default where ``dp`` sets none: `server.averaging.dp_average_rounds`; the
    at-risk target trains the task of that name, the others a grade head)."""
    default = dp_average_rounds(target)
    share = default if dp.average_rounds is None else dp.average_rounds
    first, last = first_averaged_round(dp.rounds or rounds, share), dp.rounds or rounds
    if first == last:
        return "the last round's global model released"
    return f"the mean of rounds {first}-{last}'s global models released"


def _averaged(dp: DifferentialPrivacy, rounds: int, target: Target) -> str:
    return "" if dp.average_rounds is None else f", {released_model(dp, rounds, target)}"


class Reference(_Strict):
    """A figure a paper or the literature reports, shown next to ours."""

    label: str  # the row as the paper names it
    row: str = ""  # our row it corresponds to (a model label or baseline name), if any
    source: str  # e.g. "Salykova et al., Table 1"
    data: str  # what it was measured on
    values: dict[Metric, float] = Field(min_length=1)
    datasets: list[DatasetName] = Field(default_factory=list)  # where it applies; [] = all


class ExperimentConfig(_Strict):
    """One reproduction: models, baselines, metrics and how to split and repeat."""

    name: str
    title: str
    paper: str  # the seed paper or literature it reproduces
    description: str  # what is reproduced and how it departs from the paper
    target: Target
    models: list[ModelEntry] = Field(min_length=1)
    baselines: list[str] = Field(default_factory=list)  # shared_models.baselines names
    naive: NaiveBaseline | None = None
    metrics: list[Metric] = Field(min_length=1)
    primary_metric: Metric
    split: Literal["holdout", "kfold"] = "holdout"  # kfold: centralized K-fold over pooled data
    repeats: Annotated[int, Field(ge=1)] = 3  # seeds (holdout) or folds (kfold, >= 2)
    modes: list[Mode] = Field(default_factory=lambda: list(MODES), min_length=1)
    datasets: list[DatasetName] = Field(default_factory=lambda: list(DATASET_NAMES), min_length=1)
    default_dataset: DatasetName = "synthetic"
    confusion_matrix: bool = False
    paired_test: PairedTest | None = None
    cutoff_weeks: dict[str, list[Annotated[int, Field(ge=1)]]] | None = None  # early warning
    # One week per dataset (``uci`` covers uci-por and uci-mat): every row, baseline and mode
    # sees weeks 1..W only, so a grade computed from late assessments is predicted, not read off.
    grade_cutoff_week: dict[str, int] | None = None
    epsilons: list[Annotated[float, Field(gt=0)]] | None = None  # privacy-utility sweep
    training: Training = Field(default_factory=Training)
    federated: Federated = Field(default_factory=Federated)
    dp: DifferentialPrivacy = Field(default_factory=DifferentialPrivacy)
    references: list[Reference] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        heads = HEADS[self.target]
        for metric in self.metrics:
            head = "risk" if metric in RISK_METRICS else "grade"
            if head not in heads:
                raise ValueError(f"metric {metric!r} needs target 'both' or {head!r}")
        if self.primary_metric not in self.metrics:
            raise ValueError(f"primary_metric {self.primary_metric!r} is not among metrics")
        valid = set(baseline_names("risk")) & set(baseline_names("grade"))
        if self.target != "both":
            valid = set(baseline_names(self.target))
        unknown = [b for b in self.baselines if b not in valid]
        if unknown:
            raise ValueError(f"unknown baseline(s) {unknown}; valid: {', '.join(sorted(valid))}")
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model labels repeat: {labels}")
        if self.paired_test is not None:
            rows = set(self.row_labels)
            missing = [r for r in (self.paired_test.reference, *self.paired_test.against)]
            missing = [r for r in missing if r not in rows]
            if missing:
                raise ValueError(f"paired_test names {missing}, not rows: {sorted(rows)}")
        if self.split == "kfold" and self.repeats < 2:
            raise ValueError("split 'kfold' needs repeats (folds) of at least 2")
        if self.cutoff_weeks is not None and self.epsilons is not None:
            raise ValueError("sweep either cutoff_weeks or epsilons, not both")
        if self.grade_cutoff_week is not None:
            self._check_grade_cutoff(self.grade_cutoff_week)
        if self.default_dataset not in self.datasets:
            raise ValueError(f"default_dataset {self.default_dataset!r} is not among datasets")
        idle = [m.label for m in self.models if not any(m.runs_in(x) for x in self.modes)]
        if idle:
            raise ValueError(f"model row(s) {idle} run in none of the modes {self.modes}")
        return self

    def _check_grade_cutoff(self, cutoffs: dict[str, int]) -> None:
        if "grade" not in HEADS[self.target]:
            raise ValueError(
                f"grade_cutoff_week needs target 'grade' or 'both', not {self.target!r}"
            )
        if self.cutoff_weeks is not None:
            raise ValueError(
                "grade_cutoff_week and cutoff_weeks both choose the weeks a model sees; keep one"
            )
        offered = set(self.datasets) | {d.split("-")[0] for d in self.datasets}
        for dataset, week in cutoffs.items():
            if dataset not in DATASET_NAMES:
                raise ValueError(
                    f"grade_cutoff_week.{dataset}: unknown dataset; valid keys: "
                    f"{', '.join(DATASET_NAMES)}"
                )
            if dataset not in offered:
                raise ValueError(
                    f"grade_cutoff_week.{dataset}: the experiment does not run on {dataset!r} "
                    f"(datasets: {', '.join(self.datasets)}); drop the key or add the dataset"
                )
            last = contract_weeks(dataset)
            if not 1 <= week <= last:
                raise ValueError(
                    f"grade_cutoff_week.{dataset} = {week}: outside the contract's weeks; "
                    f"choose a week from 1 to {last}"
                )

    def dp_for(self, entry: ModelEntry, epsilon: float | None = None) -> DifferentialPrivacy:
        """The experiment's ``[dp]`` with ``entry``'s own settings (and ``epsilon``) over it."""
        update: dict[str, Any] = {} if epsilon is None else {"epsilon": epsilon}
        if entry.dp is not None:
            update |= entry.dp.model_dump(exclude_none=True)
        return self.dp.model_copy(update=update)

    def dp_row_notes(self) -> list[str]:
        """One line per row with its own DP settings, for the report's protocol."""
        fed, notes = self.federated, []
        for m in self.models:
            if m.dp is None or not m.runs_in("federated-dp"):
                continue
            dp = self.dp_for(m)
            notes.append(
                f"  {m.label}: {dp.rounds or fed.rounds} round(s) x "
                f"{dp.local_epochs or fed.local_epochs} local epoch(s), Adam "
                f"{dp.learning_rate or fed.learning_rate:g}, batch "
                f"{dp.batch_size or fed.batch_size}{_averaged(dp, fed.rounds, self.target)}."
            )
        return notes

    @property
    def row_labels(self) -> list[str]:
        """Every row of the comparison: the models, then the baselines."""
        naive = [self.naive.label] if self.naive else []
        return [m.label for m in self.models] + list(self.baselines) + naive

    @property
    def sweep(self) -> Literal["week", "epsilon"] | None:
        if self.cutoff_weeks is not None:
            return "week"
        return "epsilon" if self.epsilons is not None else None

    def references_for(self, dataset: str) -> list[Reference]:
        """The published figures comparable with a run on ``dataset``."""
        return [r for r in self.references if not r.datasets or dataset in r.datasets]

    def weeks_for(self, dataset: str) -> list[int] | None:
        """The cut-off weeks of ``dataset`` (``uci-por`` falls back to ``uci``); None: all weeks.

        The early-warning sweep's weeks, or the one grade cut-off week (`grade_week_for`): the
        pipeline rebuilds the data as known at the end of each week either way.
        """
        if self.cutoff_weeks is None:
            week = self.grade_week_for(dataset)
            return None if week is None else [week]
        family = dataset.split("-")[0]
        weeks = self.cutoff_weeks.get(dataset, self.cutoff_weeks.get(family))
        if not weeks:
            raise ReproductionError(
                f"experiment {self.name!r} lists no cutoff_weeks for dataset {dataset!r}; "
                f"it has: {', '.join(self.cutoff_weeks)}"
            )
        return sorted(set(weeks))

    def grade_week_for(self, dataset: str) -> int | None:
        """The grade cut-off week of ``dataset`` (``uci-por`` falls back to ``uci``); None: none."""
        if self.grade_cutoff_week is None:
            return None
        return self.grade_cutoff_week.get(
            dataset, self.grade_cutoff_week.get(dataset.split("-")[0])
        )

    def quick(self) -> ExperimentConfig:
        """A smoke-test version: 2 repeats, 2 epochs, 1 round, the ends of any sweep."""
        unset = {"local_epochs": None, "rounds": None}  # DP rows too: 1 round x 1 epoch
        update: dict[str, Any] = {
            "repeats": 2,
            "training": self.training.model_copy(update={"max_epochs": 2, "patience": 2}),
            "federated": self.federated.model_copy(
                update={"rounds": 1, "local_epochs": 1, "repeats": 1}
            ),
            "dp": self.dp.model_copy(update=unset),
            "models": [
                m.model_copy(update={"dp": m.dp.model_copy(update=unset)})
                if m.dp is not None
                else m
                for m in self.models
            ],
        }
        if self.cutoff_weeks is not None:
            update["cutoff_weeks"] = {
                k: sorted({min(v), max(v)}) for k, v in self.cutoff_weeks.items()
            }
        if self.epsilons is not None:
            update["epsilons"] = [max(self.epsilons)]
        return self.model_copy(update=update)


def with_epsilons(config: ExperimentConfig, text: str) -> ExperimentConfig:
    """``config`` with its epsilon sweep replaced by ``text`` (``--epsilons 1,4,16``).

    Raises:
        ReproductionError: the experiment sweeps no epsilon, or a value is not a positive number.
    """
    if config.sweep != "epsilon":
        raise ReproductionError(
            f"--epsilons: experiment {config.name!r} sweeps no epsilon; it trains at its [dp] "
            f"epsilon {config.dp.epsilon:g} (edit [dp] in a copy of its TOML to change it)"
        )
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ReproductionError(
                f"--epsilons {text!r}: {part!r} is not a positive number; give e.g. 1,4,16"
            )
        values.append(value)
    return config.model_copy(update={"epsilons": sorted(set(values))})


def contract_weeks(dataset: str) -> int:
    """The weeks of ``dataset``'s contract (``uci-por``: UCI's), whole term."""
    family = dataset.split("-")[0]
    if family == "synthetic":
        return default_spec().weeks
    # Each public dataset's contract sits beside its loader (simulations/datasets/<name>/).
    return load_spec(DATASETS_DIR / family / "spec.toml").weeks


def experiment_names() -> list[str]:
    """The experiments shipped with edufl, by file name."""
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


def load_experiment(name_or_path: str | Path) -> ExperimentConfig:
    """A shipped experiment by name (``cnn-lstm``) or any experiment TOML file by path.

    Raises:
        ReproductionError: no such experiment (the message lists the shipped ones).
        ExperimentConfigError: the file is not valid TOML or not a valid experiment.
    """
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = EXPERIMENTS_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise ReproductionError(
                f"unknown experiment {str(name_or_path)!r}; choose one of: "
                f"{', '.join(experiment_names())} (or pass a .toml file)"
            )
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ReproductionError(f"{path}: experiment file not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ExperimentConfigError(f"{path}: cannot read the experiment ({exc})") from None
    return parse_experiment(raw, str(path))


def parse_experiment(raw: dict[str, Any], source: str) -> ExperimentConfig:
    """Validate ``raw``; every problem becomes one line naming its key."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: the experiment config is invalid ({exc.error_count()} problem(s))"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (a typo?)"
            lines.append(f"  - {where}: {msg}")
        raise ExperimentConfigError("\n".join(lines)) from None


def mode_label(mode: str, epsilon: float | None) -> str:
    """``federated-dp (ε=3)``, or the mode alone without DP."""
    return f"{mode} (ε={epsilon:g})" if epsilon is not None else mode
