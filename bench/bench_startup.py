"""Start-up: `edufl --help` and `edufl client validate` as whole processes, `flwr --help` beside;
and N federated simulations in one Ray session against N that each start Ray.

Each command runs as a fresh process (the installed console scripts, as a user types them),
interleaved with the others so that load from other users of the machine hits all alike. The
figures are wall seconds from start to exit and the process's peak resident memory (from
``wait4``: at least this script's own, about 20 MiB, which a forked child starts with).
``flwr --help`` is the anchor: Flower's own CLI on the same machine at the same time. The
validated export is one synthetic institution of 1,000 students (seed 0), written first.

Simulations: a fresh process runs N `simulations.runner.simulate` calls one after the other
(2 synthetic institutions, 1 round of 1 local epoch each), either each on its own Ray (started
and shut down by the call, as every federated job of `edufl reproduce` did before issue 20) or
all inside one `ray_session()` (Ray and its warm workers shared). The figure is the seconds of
the N calls, timed inside the process (its interpreter start and exit are the same for both).

    python -m bench.bench_startup            # 5 runs of each after one warm-up; 3 simulations x 1
    python -m bench.bench_startup --runs 11 --simulations 5 --session-runs 3
    python -m bench.bench_startup --simulations 0      # commands only
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    MIB,
    Report,
    Row,
    Stats,
    interleave,
    log,
    markdown,
    parser,
    ratio_stats,
    ray_env,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: The issue's targets, in seconds (median of 5 on this machine).
TARGETS = {"edufl --help": 0.5, "edufl client validate": 1.5}


def _script(name: str, module: str) -> list[str]:
    """The console script ``name`` next to this interpreter, else ``python -m module``."""
    path = BIN / name
    return [str(path)] if path.is_file() else [sys.executable, "-m", module]


def run_once(argv: Sequence[str], peaks: list[float]) -> float:
    """Wall seconds of one whole process; its peak RSS (bytes) is appended to ``peaks``."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ
    )
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{err.decode()[-2000:]}")
    peaks.append(usage.ru_maxrss * 1024.0)  # kilobytes on Linux
    return seconds


def write_export(folder: Path, students: int) -> Path:
    """One synthetic institution, written by another process.

    This process stays small: a child's peak RSS from ``wait4`` includes what it shared with
    this process when it was forked, so pandas loaded here would count in every command.
    """
    script = (
        "import sys; from pathlib import Path; from simulations.synthetic import "
        "write_consortium; print(write_consortium(Path(sys.argv[1]), institutions=1, "
        "students=int(sys.argv[2]), seed=0)[0])"
    )
    argv = [sys.executable, "-c", script, str(folder), str(students)]
    out = subprocess.run(argv, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def measure(export: Path, runs: int) -> dict[str, dict[str, Stats]]:
    """Seconds and peak RSS (MiB) of each command, ``runs`` interleaved runs after a warm-up."""
    commands = {
        "edufl --help": [*_script("edufl", "simulations.cli"), "--help"],
        "edufl client validate": [
            *_script("edufl", "simulations.cli"), "client", "validate", str(export),
        ],
        "flwr --help": [*_script("flwr", "flwr.cli.app"), "--help"],
    }  # fmt: skip
    peaks: dict[str, list[float]] = {name: [] for name in commands}

    def variant(name: str) -> float:
        seconds = run_once(commands[name], peaks[name])
        log(f"{name}: {seconds:.2f} s, peak {peaks[name][-1] / MIB:.0f} MiB")
        return seconds

    times = interleave({name: lambda n=name: variant(n) for name in commands}, reps=runs)
    return {
        name: {
            "seconds": Stats.of(times[name]),
            "peak_mib": Stats.of([p / MIB for p in peaks[name][-runs:]]),
        }
        for name in commands
    }


#: One child process: N simulations, shared Ray session or not; prints the seconds as JSON.
SIMULATIONS = """
import contextlib, json, sys, time
from pathlib import Path
from server.config import FederationConfig
from simulations.runner import ray_session, simulate

mode, n, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
exports = sys.argv[4:]
each = []
started = time.perf_counter()
with ray_session() if mode == "session" else contextlib.nullcontext():
    for i in range(n):
        t = time.perf_counter()
        config = FederationConfig(rounds=1, local_epochs=1, min_nodes=len(exports),
                                  out_dir=out / f"{mode}-{i}")
        simulate(config, exports)
        each.append(time.perf_counter() - t)
total = time.perf_counter() - started  # includes the session's shutdown
print("SECONDS " + json.dumps({"total": total, "each": each}))
"""


def write_consortium_exports(folder: Path, students: int) -> list[str]:
    """Two synthetic institutions (seed 0), written by another process."""
    script = (
        "import sys; from pathlib import Path; from simulations.synthetic import "
        "write_consortium; [print(p) for p in write_consortium(Path(sys.argv[1]), "
        "institutions=2, students=int(sys.argv[2]), seed=0)]"
    )
    argv = [sys.executable, "-c", script, str(folder), str(students)]
    out = subprocess.run(argv, cwd=REPO, check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


def measure_simulations(
    exports: list[str], out: Path, n: int, runs: int
) -> dict[str, list[dict[str, object]]]:
    """``runs`` interleaved runs (no warm-up: each is minutes) of N separate vs one session."""
    found: dict[str, list[dict[str, object]]] = {"separate": [], "session": []}

    def variant(mode: str) -> float:
        run_dir = out / f"{mode}-{len(found[mode])}"
        argv = [sys.executable, "-c", SIMULATIONS, mode, str(n), str(run_dir), *exports]
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=ray_env())
        lines = [x for x in proc.stdout.splitlines() if x.startswith("SECONDS ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{mode} simulations exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        figures = json.loads(lines[-1].removeprefix("SECONDS "))
        found[mode].append(figures)
        each = ", ".join(f"{s:.1f}" for s in figures["each"])
        log(f"{n} simulations, {mode}: {figures['total']:.1f} s (each {each})")
        return float(figures["total"])

    interleave({m: lambda m=m: variant(m) for m in found}, reps=runs, warmup=0)
    return found


def _simulation_rows(report: Report, found: dict[str, list[dict[str, object]]], n: int) -> None:
    totals = {m: [float(f["total"]) for f in runs] for m, runs in found.items()}  # type: ignore[arg-type]
    later = [s for f in found["session"] for s in list(f["each"])[1:]]  # type: ignore[call-overload]
    report.add(
        Row(
            "7 start-up",
            f"{n} simulations (2 institutions x 1 round): one Ray session / one Ray each",
            ratio_stats(totals["session"], totals["separate"]),
            "x",
            note=(
                f"one session {Stats.of(totals['session']).cell(1)} s, one Ray each "
                f"{Stats.of(totals['separate']).cell(1)} s; a simulation after the first in "
                f"the session {Stats.of(later).cell(1) if later else 'n/a'} s"
            ),
        )
    )
    report.details["simulations"] = found


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("bench_startup", __doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="measured runs of each command")
    p.add_argument("--students", type=int, default=1000, help="students in the validated export")
    p.add_argument(
        "--simulations", type=int, default=3, help="N simulations per process (0: skip them)"
    )
    p.add_argument("--session-runs", type=int, default=1, help="processes of each kind")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 3
        args.simulations = min(args.simulations, 2)
    report = Report("bench_startup", "7. Start-up", vars(args))
    with tempfile.TemporaryDirectory(prefix="edufl-bench-startup-") as tmp:
        export = write_export(Path(tmp), args.students)
        log(f"export of {args.students} students in {export}")
        results = measure(export, args.runs)
        found = {}
        if args.simulations > 0:
            exports = write_consortium_exports(Path(tmp) / "consortium", 240)
            found = measure_simulations(exports, Path(tmp), args.simulations, args.session_runs)
    rows = []
    for name, stats in results.items():
        target = TARGETS.get(name)
        label = f"{name} ({args.students:,} students)" if "validate" in name else name
        report.add(
            Row(
                "7 start-up",
                label,
                stats["seconds"],
                "s",
                target=f"< {target:g} s" if target is not None else "anchor",
                met=None if target is None else stats["seconds"].median < target,
                note=f"peak RSS {stats['peak_mib'].median:.0f} MiB",
            )
        )
        rows.append([label, stats["seconds"].cell(), stats["peak_mib"].cell(0)])
    report.details = {
        name: {key: vars(value) for key, value in stats.items()} for name, stats in results.items()
    }
    print(markdown(["command", "seconds, median [min-max]", "peak RSS MiB"], rows))
    if found:
        _simulation_rows(report, found, args.simulations)
        row = report.rows[-1]
        print(f"\n{row.measure}: {row.stats.cell() if row.stats else 'n/a'} x ({row.note})")
    report.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
