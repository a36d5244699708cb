"""`edufl reproduce`: a seed paper's experiment, centralized, federated and federated with DP.

An experiment config (`simulations.reproduce.config`) names the paper's models, baselines and
metrics; this module plans every training job (rows x modes x repeats, and each cut-off week or
epsilon of a sweep), runs them on the chosen dataset's institution exports, and hands the
outcomes to `simulations.reproduce.report` for the markdown table, JSON and plots.

Protocol. Centralized rows pool each institution's own 70/15/15 split of a seed (or, for a
``kfold`` experiment, K folds of the pooled records), train with early stopping and are scored
on the pooled test split; the scikit-learn baselines and the naive predictor are fitted on the
same split (they are not federated). Federated rows run FedAvg on a Flower simulation (the Ray
engine, or the inline one: `Reproduction.engine`), one virtual node per institution, and their
final global model is scored on the same test students.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from server.federation import FederationError
from server.rounds import RoundReport
from simulations.ray_session import ray_session
from simulations.reproduce import fairness
from simulations.reproduce.config import (
    MODES,
    DifferentialPrivacy,
    ExperimentConfig,
    ModelEntry,
    ReproductionError,
)
from simulations.reproduce.data import PreparedData, choice, prepare, resolve_source
from simulations.reproduce.runs import (
    Outcome,
    PooledSplit,
    Scored,
    SplitCache,
    fit_baseline_rows,
    naive_row,
    timed,
    train_centralized,
    train_federated,
)

logger = logging.getLogger(__name__)

MARKER = ".edufl-reproduction"  # marks a folder this module may clear and rewrite
SEED = 0  # repeat r uses seed SEED + r: the same seed gives the same splits in every mode


class Progress:
    """Where a reproduction reports what it does; the CLI draws a progress bar from it."""

    def start(self, total: int) -> None:
        """``total`` jobs are planned."""

    def job(self, text: str) -> None:
        """A job starts."""

    def done(self, text: str) -> None:
        """A job finished; ``text`` gives its headline metric."""

    def round(self, report: RoundReport, rounds: int) -> None:
        """A federated round was committed."""

    def close(self) -> None:
        """No more jobs."""


@dataclass(frozen=True)
class Job:
    """One unit of work: a model in one mode and repeat, or all baselines of one repeat."""

    mode: str
    repeat: int
    week: int | None
    entry: ModelEntry | None  # None: the baselines (and the naive predictor)
    epsilon: float | None = None

    def describe(self) -> str:
        what = self.entry.label if self.entry else "baselines"
        extra = f", week {self.week}" if self.week else ""
        extra += f", epsilon {self.epsilon:g}" if self.epsilon is not None else ""
        return f"{self.mode} {what}, repeat {self.repeat + 1}{extra}"


@dataclass
class Reproduction:
    """Everything a reproduction did, for the report."""

    config: ExperimentConfig
    dataset: str
    command: str
    modes: list[str]
    quick: bool
    out_dir: Path
    started: str
    seconds: float = 0.0
    source: Path | None = None  # the download read (None: generated)
    jobs: list[Job] = field(default_factory=list)
    done: int = 0  # jobs finished
    error: str = ""  # what stopped an incomplete run
    data: list[dict[str, object]] = field(default_factory=list)  # one per cut-off week
    outcomes: list[Outcome] = field(default_factory=list)
    device: str = "cpu"  # where models train (`shared_models.devices`): cpu, cuda, auto
    engine: str = "ray"  # the federated jobs' engine (`simulations.runner.ENGINES`)
    ray_address: str | None = None  # a Ray cluster to join (engine ray); None: RAY_ADDRESS
    workers: int = 1  # processes running jobs at once (`run_jobs`); 1: one after another
    threads: int = 1  # torch threads of each worker process
    finished: dict[int, list[Outcome]] = field(default_factory=dict, repr=False)  # by job index


def command_line(
    experiment: str,
    dataset: str,
    data: Path | None,
    out: Path,
    modes: Sequence[str] | None,
    quick: bool,
    engine: str = "ray",
    *,
    epsilons: Sequence[float] | None = None,
) -> str:
    """The ``edufl reproduce`` command that runs this reproduction (quoted in every table).

    A Ray cluster's address is left out: it names a machine, not the experiment (the engines
    give the same results).
    """
    parts = ["edufl", "reproduce", experiment, "--dataset", dataset]
    if data is not None:
        parts += ["--data", str(data)]
    parts += ["--out", str(out)]
    if modes:
        parts += ["--modes", ",".join(modes)]
    if quick:
        parts.append("--quick")
    if epsilons is not None:
        parts += ["--epsilons", ",".join(f"{e:g}" for e in epsilons)]
    if engine == "ray":  # inline is what the default (auto) runs without a cluster
        parts += ["--engine", engine]
    return " ".join(parts)


def plan(config: ExperimentConfig, dataset: str, modes: Sequence[str]) -> list[Job]:
    """Every job, in the order they run (the data of one cut-off week at a time)."""
    jobs: list[Job] = []
    has_baselines = bool(config.baselines or config.naive)
    cutoffs = config.weeks_for(dataset)
    weeks: list[int | None] = list(cutoffs) if cutoffs else [None]
    for week in weeks:
        for mode in modes:
            if mode == "centralized":
                for r in range(config.repeats):
                    jobs += [Job(mode, r, week, m) for m in config.models if m.runs_in(mode)]
                    jobs += [Job(mode, r, week, None)] if has_baselines else []
                continue
            epsilons: list[float | None] = [None]
            if mode == "federated-dp":
                epsilons = list(config.epsilons or [config.dp.epsilon])
            for eps in epsilons:
                for r in range(config.federated.repeats):
                    jobs += [Job(mode, r, week, m, eps) for m in config.models if m.runs_in(mode)]
    return jobs


def new_reproduction(
    config: ExperimentConfig,
    dataset: str | None = None,
    *,
    data: Path | None = None,
    out_dir: Path,
    modes: Sequence[str] | None = None,
    quick: bool = False,
    command: str = "",
    device: str = "cpu",
    engine: str = "ray",
    ray_address: str | None = None,
    workers: int = 1,
    threads: int = 1,
) -> Reproduction:
    """Check the request, find the data, clear ``out_dir`` and plan the jobs.

    ``workers``: jobs run at once (`run_jobs`); ``threads``: torch threads per worker process.

    Raises:
        ReproductionError: a dataset or mode the experiment does not offer, missing data, or an
            output folder holding something else (checked before anything is written).
    """
    dataset = dataset or config.default_dataset
    choice(dataset)
    if dataset not in config.datasets:
        raise ReproductionError(
            f"experiment {config.name!r} runs on {', '.join(config.datasets)}, not {dataset!r}"
        )
    chosen_modes = list(modes or config.modes)
    unknown = [m for m in chosen_modes if m not in MODES]
    if unknown or not chosen_modes:
        raise ReproductionError(f"--modes {unknown}: choose among {', '.join(MODES)}")
    from simulations.runner import ENGINES  # Flower's simulation: imported only to run

    if engine not in ENGINES:
        raise ReproductionError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "inline" and ray_address:
        raise ReproductionError(
            f"the inline engine cannot join the Ray cluster {ray_address}; use engine ray"
        )
    if ray_address and not out_dir.is_absolute():
        raise ReproductionError(
            f"--out {str(out_dir)!r} is relative: on the Ray cluster {ray_address} every node "
            "reads the exports and writes its run below it, so give an absolute path on storage "
            "every node mounts"
        )
    if workers < 1 or threads < 1:
        raise ReproductionError(f"workers and threads must be at least 1, got {workers}, {threads}")
    source = resolve_source(dataset, data)
    config = config.quick() if quick else config
    prepare_out_dir(out_dir, config.name)
    return Reproduction(
        config=config,
        dataset=dataset,
        command=command or command_line(config.name, dataset, data, out_dir, modes, quick, engine),
        modes=chosen_modes,
        quick=quick,
        out_dir=out_dir,
        started=datetime.now(UTC).isoformat(timespec="seconds"),
        source=source,
        jobs=plan(config, dataset, chosen_modes),
        device=device,
        engine=engine,
        ray_address=ray_address,
        workers=workers,
        threads=threads,
    )


def default_workers() -> int:
    """Jobs a reproduction runs at once by default: this machine's CPUs, at most 4."""
    return max(1, min(os.cpu_count() or 1, 4))


def run_jobs(rep: Reproduction, progress: Progress | None = None) -> None:
    """Run the planned jobs, adding to ``rep.outcomes`` (in plan order) as each finishes.

    On an error ``rep`` keeps what finished (and ``rep.error`` says what stopped it), so the
    caller can still write a partial report before the error propagates. On the Ray engine
    every federated job runs in one Ray session (`simulations.ray_session`): Ray starts at the
    first one, its workers stay warm for the next, and it stops after the last (12-20 s saved
    per job). The inline engine starts nothing: each job runs its nodes in one process.

    With ``rep.workers`` > 1 jobs run in a pool of worker processes (`JobPool`): every job on
    the inline engine; on Ray the centralized jobs (models and baselines), while this process
    runs the federated ones. Every job is seeded by its repeat, so the outcomes are the same as
    one after another, only sooner.
    """
    progress = progress or Progress()
    config, out_dir = rep.config, rep.out_dir
    progress.start(len(rep.jobs))
    started = time.perf_counter()
    lock = threading.Lock()

    def finish(index: int, job: Job, outcomes: list[Outcome]) -> None:
        with lock:
            rep.finished[index] = outcomes
            rep.outcomes = [o for i in sorted(rep.finished) for o in rep.finished[i]]
            rep.done += 1
            last = outcomes[-1]
            value = last.scored.metrics.get(config.primary_metric)
            shown = "n/a" if value is None else f"{value:.3f}"
            progress.done(
                f"{job.describe()}: {config.primary_metric} {shown} ({last.seconds:.0f} s)"
            )

    try:
        busy_here = any(not JobPool.takes(rep, job) for job in rep.jobs)
        pool = JobPool(rep, finish, leave_one=busy_here)
        engine = ray_session(rep.ray_address) if rep.engine == "ray" else contextlib.nullcontext()
        with pool, engine:
            for week, indices in _by_week(rep.jobs):
                pool.check()
                prepared = prepare(
                    rep.dataset, rep.source, out_dir / "data", week=week, quick=rep.quick
                )
                cache = SplitCache(prepared)
                rep.data.append(
                    {
                        "week": week,
                        "institutions": len(prepared.exports),
                        "parts": prepared.parts,
                        "summary": prepared.summary(),
                        "source": str(rep.source) if rep.source else "generated",
                    }
                )
                # The pool's queue is first come, first served: the long (federated) jobs first,
                # so that the last job to finish is a short one.
                queued = sorted(indices, key=lambda i: rep.jobs[i].mode == "centralized")
                here = sorted(i for i in queued if not pool.submit(i, rep.jobs[i], prepared))
                for index in here:
                    job = rep.jobs[index]
                    pool.check()
                    progress.job(job.describe())
                    outcomes = _run(
                        job, config, prepared, cache, out_dir, progress, rep.device, rep.engine
                    )
                    finish(index, job, outcomes)
            pool.wait()
    except BaseException as exc:
        rep.error = f"{type(exc).__name__}: {exc}".strip()
        raise
    finally:
        rep.seconds = time.perf_counter() - started


def _by_week(jobs: Sequence[Job]) -> list[tuple[int | None, list[int]]]:
    """The job indices of each cut-off week, in plan order (`plan` groups them by week)."""
    groups: list[tuple[int | None, list[int]]] = []
    for index, job in enumerate(jobs):
        if not groups or groups[-1][0] != job.week:
            groups.append((job.week, []))
        groups[-1][1].append(index)
    return groups


class JobPool:
    """Worker processes that run a reproduction's jobs beside (or instead of) this process.

    A centralized job (a model's early-stopped training, or the scikit-learn baselines) needs
    neither Flower nor the other jobs, and neither does a federated job on the inline engine
    (its nodes run in the worker, one after another): each worker process loads the exports'
    seeded splits itself and returns the job's outcomes. Federated jobs on Ray stay in this
    process, in its one Ray session. With ``rep.workers`` = 1 there is no pool and `submit`
    declines everything (the caller runs each job itself). Otherwise there are ``rep.workers``
    processes, one fewer when ``leave_one`` (a job this process runs keeps it busy). Processes
    are spawned (no fork of a process holding Ray or torch threads), each with ``rep.threads``
    torch threads. The first error stops the reproduction: `check` and `wait` raise it and the
    jobs not yet started are cancelled. A federated job in a worker reports no rounds to the
    progress display, only its end.
    """

    def __init__(
        self,
        rep: Reproduction,
        finish: Callable[[int, Job, list[Outcome]], None],
        *,
        leave_one: bool,
    ) -> None:
        self.rep = rep
        self.finish = finish
        self.size = 0 if rep.workers == 1 else rep.workers - int(leave_one)
        self.executor: ProcessPoolExecutor | None = None
        self.futures: list[Future[list[Outcome]]] = []
        self.error: BaseException | None = None

    @staticmethod
    def takes(rep: Reproduction, job: Job) -> bool:
        """Whether a pool (``rep.workers`` > 1) runs ``job``, rather than this process."""
        return rep.workers > 1 and (job.mode == "centralized" or rep.engine == "inline")

    def __enter__(self) -> JobPool:
        if self.size > 0:
            self.executor = ProcessPoolExecutor(
                max_workers=self.size,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_start,
                initargs=(self.rep.threads, logging.getLogger().level),
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, index: int, job: Job, prepared: PreparedData) -> bool:
        """Queue ``job`` if the pool runs such jobs (`takes`); else False."""
        if self.executor is None or not self.takes(self.rep, job):
            return False
        rep = self.rep
        future = self.executor.submit(
            _run_in_worker, job, rep.config, prepared, rep.out_dir, rep.device, rep.engine
        )
        future.add_done_callback(lambda f: self._done(f, index, job))
        self.futures.append(future)
        return True

    def _done(self, future: Future[list[Outcome]], index: int, job: Job) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self.error = self.error or error
            return
        self.finish(index, job, future.result())

    def check(self) -> None:
        """Raise the first error a worker's job ended with, if any."""
        if self.error is not None:
            raise self.error

    def wait(self) -> None:
        """Wait for every queued job; raise the first error (the rest are cancelled)."""
        for future in self.futures:
            with contextlib.suppress(CancelledError):
                future.exception()  # waits; errors are kept by _done in completion order
            if self.error is not None and self.executor is not None:
                self.executor.shutdown(wait=True, cancel_futures=True)
                break
        self.check()


_WORKER_CACHE: dict[Path, SplitCache] = {}


def _worker_start(threads: int, log_level: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level)


def _run_in_worker(
    job: Job,
    config: ExperimentConfig,
    prepared: PreparedData,
    out_dir: Path,
    device: str,
    engine: str,
) -> list[Outcome]:
    """A worker process's job (its splits loaded once per export folder and week)."""
    key = prepared.exports[0].parent
    if key not in _WORKER_CACHE or _WORKER_CACHE[key].data.week != prepared.week:
        _WORKER_CACHE[key] = SplitCache(prepared)
    return _run(job, config, prepared, _WORKER_CACHE[key], out_dir, Progress(), device, engine)


def prepare_out_dir(out_dir: Path, experiment: str) -> None:
    """Make ``out_dir`` ready: new, empty, or an earlier reproduction (whose outputs go).

    Raises:
        ReproductionError: the folder exists, is not empty and holds something else.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ReproductionError(f"--out {out_dir}: exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MARKER).is_file():
        for child in out_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    elif any(out_dir.iterdir()):
        raise ReproductionError(
            f"--out {out_dir}: not empty and not an earlier reproduction; choose a new or empty "
            "folder (a reproduction replaces everything in its folder)"
        )
    (out_dir / MARKER).write_text(f"{experiment}\n", "utf-8")


def _run(
    job: Job,
    config: ExperimentConfig,
    data: PreparedData,
    cache: SplitCache,
    out_dir: Path,
    progress: Progress,
    device: str = "cpu",
    engine: str = "ray",
) -> list[Outcome]:
    seed = SEED + job.repeat

    def outcome(
        label: str, kind: Literal["model", "baseline"], scored: Scored, seconds: float
    ) -> Outcome:
        return Outcome(
            label, kind, job.mode, job.repeat, seed, job.week, job.epsilon, seconds, scored
        )

    if job.mode == "centralized":
        split = _split(config, cache, job.repeat)
        if job.entry is not None:
            entry = job.entry
            scored, seconds = timed(
                lambda: train_centralized(
                    entry, config.target, data.spec, split, config.training, seed, device
                )
            )
            if job.repeat == 0:
                fairness.attach(scored, split.test, data.spec, seed)
            return [outcome(entry.label, "model", scored, seconds)]
        rows, seconds = timed(
            lambda: fit_baseline_rows(config.baselines, config.target, data.spec, split, seed)
        )
        if config.naive is not None:
            rows[config.naive.label] = naive_row(config.naive, config.target, data.spec, split)
        each = seconds / max(len(rows), 1)
        return [outcome(name, "baseline", s, each) for name, s in rows.items()]
    assert job.entry is not None
    entry = job.entry
    dp = None
    if job.mode == "federated-dp":
        dp = config.dp_for(entry, job.epsilon)
    run_dir = out_dir / "runs" / job.mode / _slug(entry.label) / _run_name(job, seed)
    try:
        scored, seconds = _train_federated(
            entry, job, config, data, dp, seed, run_dir, progress, device, engine
        )
    except FederationError as exc:
        # Every institution refused round 1: at this epsilon the noise each step needs is
        # above the nodes' ceiling (dp-max-noise). A point of the frontier all the same, kept
        # as such (no metric) rather than ending the whole reproduction.
        from privacy.dp import DECLINES_ROUND  # torch and Opacus: imported only when needed

        if dp is None or DECLINES_ROUND not in str(exc):
            raise
        logger.warning("%s: every institution declined (%s)", job.describe(), exc)
        scored, seconds = (
            Scored({m: None for m in config.metrics}, None, 0, 0, {"declined": str(exc)}),
            0.0,
        )
        return [outcome(entry.label, "model", scored, seconds)]
    if job.repeat == 0:  # the federation's test students: each institution's seeded split
        fairness.attach(scored, cache.holdout(seed).test, data.spec, seed)
    return [outcome(entry.label, "model", scored, seconds)]


def _train_federated(
    entry: ModelEntry,
    job: Job,
    config: ExperimentConfig,
    data: PreparedData,
    dp: DifferentialPrivacy | None,
    seed: int,
    run_dir: Path,
    progress: Progress,
    device: str,
    engine: str,
) -> tuple[Scored, float]:
    rounds = (dp.rounds if dp is not None else None) or config.federated.rounds
    return timed(
        lambda: train_federated(
            entry,
            config.target,
            data,
            config.federated,
            dp,
            seed,
            run_dir,
            on_round=lambda report: progress.round(report, rounds),
            device=device,
            engine=engine,
        )
    )


def _split(config: ExperimentConfig, cache: SplitCache, repeat: int) -> PooledSplit:
    if config.split == "kfold":
        return cache.kfold(config.repeats, SEED)[repeat]
    return cache.holdout(SEED + repeat)


def _run_name(job: Job, seed: int) -> str:
    parts = [f"week{job.week:02d}"] if job.week else []
    parts += [f"eps{job.epsilon:g}"] if job.epsilon is not None else []
    return "-".join([*parts, f"seed{seed}"])


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "model"
