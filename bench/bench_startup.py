"""Start-up: `edufl --help` and `edufl client validate` as whole processes, `flwr --help` beside.

Each command runs as a fresh process (the installed console scripts, as a user types them),
interleaved with the others so that load from other users of the machine hits all alike. The
figures are wall seconds from start to exit and the process's peak resident memory (from
``wait4``: at least this script's own, about 20 MiB, which a forked child starts with).
``flwr --help`` is the anchor: Flower's own CLI on the same machine at the same time. The
validated export is one synthetic institution of 1,000 students (seed 0), written first.

    python -m bench.bench_startup            # 5 runs of each after one warm-up
    python -m bench.bench_startup --runs 11
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import MIB, Report, Row, Stats, interleave, log, markdown, parser

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


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("bench_startup", __doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="measured runs of each command")
    p.add_argument("--students", type=int, default=1000, help="students in the validated export")
    args = p.parse_args(argv)
    if args.quick:
        args.runs = 3
    report = Report("bench_startup", "7. Start-up", vars(args))
    with tempfile.TemporaryDirectory(prefix="edufl-bench-startup-") as tmp:
        export = write_export(Path(tmp), args.students)
        log(f"export of {args.students} students in {export}")
        results = measure(export, args.runs)
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
    report.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
