"""What every benchmark shares: progress, median/min/max, machine facts, peak memory, output.

Conventions (``bench/run_all.py`` relies on them; ``bench_deploy.py`` follows them too):

- run from the repository root as ``python -m bench.bench_NAME [--json PATH] [--quick]``;
- progress lines on stderr, the result as a Markdown table on stdout;
- figures in JSON at ``--json`` (default ``runs/bench/bench_NAME.json``): ``benchmark``,
  ``cpu_count``, ``loadavg_before``/``loadavg_after``, ``python``, ``config``, ``details`` and
  ``summary``, the rows of the combined table (`Row`: a measure with median, min, max, runs,
  unit, the issue's target and whether it was met);
- the machine is shared and noisy: every figure is a ratio or a median of variants measured
  side by side (interleaved) in the same run, never a single timing compared across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path("runs/bench")
GIB = 1024**3
MIB = 1024**2


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Stats:
    """Median, min and max of ``runs`` measurements."""

    median: float
    min: float
    max: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> Stats:
        return Stats(self.median * factor, self.min * factor, self.max * factor, self.runs)

    def cell(self, digits: int = 2) -> str:
        """``median [min-max]``, or the single value of one run."""
        if self.runs == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} [{self.min:.{digits}f}-{self.max:.{digits}f}]"


@dataclass(frozen=True)
class Row:
    """One line of the combined table: a measure and, where the issue sets one, its target."""

    question: str
    measure: str
    stats: Stats | None
    unit: str
    target: str = ""
    met: bool | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stats"] = None if self.stats is None else asdict(self.stats)
        return out


def ratio_stats(numerators: Sequence[float], denominators: Sequence[float]) -> Stats:
    """Ratios of paired runs (run k of one variant over run k of the other, side by side)."""
    return Stats.of([a / b for a, b in zip(numerators, denominators, strict=True) if b > 0])


def interleave(
    variants: dict[str, Callable[[], float]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run every variant ``warmup + reps`` times, rotating the order each repetition.

    Each callable returns the figure of one run (e.g. seconds per epoch). Interleaving makes
    load from other users of the machine hit every variant alike; warm-up runs are dropped.
    """
    names = list(variants)
    results: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            value = variants[name]()
            if rep >= warmup:
                results[name].append(value)
    return results


def machine() -> dict[str, Any]:
    """Cores, load and versions, recorded with every result."""
    facts: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": os.getloadavg(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        facts |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    return facts


class Report:
    """The JSON every script writes, with the rows of the combined table."""

    def __init__(self, benchmark: str, question: str, config: dict[str, Any]) -> None:
        self.benchmark = benchmark
        self.question = question
        self.config = config
        self.loadavg_before = os.getloadavg()
        self.started = time.monotonic()
        self.rows: list[Row] = []
        self.details: dict[str, Any] = {}

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def write(self, path: Path) -> dict[str, Any]:
        data = {
            "benchmark": self.benchmark,
            "question": self.question,
            **machine(),
            "loadavg_before": self.loadavg_before,
            "loadavg_after": os.getloadavg(),
            "seconds": round(time.monotonic() - self.started, 1),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in self.config.items()},
            "summary": [row.as_dict() for row in self.rows],
            "details": self.details,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str))
        log(f"wrote {path}")
        return data


def ray_env() -> dict[str, str]:
    """This environment, with Ray's workers at the driver's priority unless told otherwise.

    Ray lowers its workers' priority by 15 (``RAY_worker_niceness``); on a machine shared with
    other users' jobs at nice 10 they then starve, and a simulation measures the neighbours, not
    edufl (see docs/benchmarks.md). Set ``RAY_worker_niceness=15`` to measure Ray's default.
    """
    key = "RAY_worker_niceness"  # Ray's own spelling (its system config key)
    return {**os.environ, key: os.environ.get(key, "0")}


def parser(name: str, description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", type=Path, default=RESULTS / f"{name}.json")
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes and fewer runs (a smoke test)"
    )
    return parser


# -- memory -----------------------------------------------------------------------------------


def _status_bytes(key: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class PeakRSS:
    """Peak resident memory of this process during a block, above its resident memory before.

    Uses Linux's resettable high-water mark (``/proc/self/clear_refs``); freed heap memory is
    returned to the system first so an earlier block's leftovers do not hide this one's peak.
    ``delta`` stays None where that is not available.
    """

    baseline: int | None = None
    peak: int | None = None

    @property
    def delta(self) -> int | None:
        if self.baseline is None or self.peak is None:
            return None
        return max(0, self.peak - self.baseline)

    @contextlib.contextmanager
    def measure(self) -> Iterator[PeakRSS]:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.baseline = _status_bytes("VmRSS:")
        except OSError:
            self.baseline = None
        yield self
        self.peak = _status_bytes("VmHWM:") if self.baseline is not None else None


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class TreeMemory:
    """Peak memory of a process and all its descendants (Ray's processes included), sampled.

    PSS counts a shared page once in total (split between its users), so the sum over the tree
    is what the tree costs the machine; the RSS sum counts shared pages (torch's libraries) once
    per process. Sampled every ``interval`` seconds: a spike shorter than that can be missed.
    """

    root: int = field(default_factory=os.getpid)
    interval: float = 0.5
    peak_pss: int = 0
    peak_rss: int = 0
    peak_processes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        pids = _descendants(self.root)
        self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in pids))
        self.peak_rss = max(self.peak_rss, sum(_status_bytes("VmRSS:", p) or 0 for p in pids))
        self.peak_processes = max(self.peak_processes, len(pids))

    @contextlib.contextmanager
    def watch(self) -> Iterator[TreeMemory]:
        def loop() -> None:
            while not self._stop.wait(self.interval):
                self.sample()

        thread = threading.Thread(target=loop, name="tree-memory", daemon=True)
        self.sample()
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.sample()


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
