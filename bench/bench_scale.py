"""Simulation scale: 10, 100 and 1,000 virtual institutions on Flower's Ray engine.

One pool of synthetic students (the synthetic consortium, pooled) is split by a Dirichlet label
partition (`simulations.partition.dirichlet_partition`) into N institution exports; the
simulation (`simulations.runner.simulate`) samples a fixed fraction of them to train and another
to evaluate every round. With the pool fixed, the students trained per round stay the same at
every N while the number of nodes (and node messages) grows, so what grows with N is the cost of
having institutions, not of training. Each N runs in a fresh process whose whole process tree
(the driver, Ray's GCS, raylet and workers) is sampled for memory: PSS (shared pages split
between their users, so the sum is what the tree costs the machine) and the RSS sum.

    python -m bench.bench_scale                        # 10, 100, 1000 institutions
    python -m bench.bench_scale --institutions 1000 --fraction 0.1
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import GIB, MIB, Report, Row, Stats, TreeMemory, log, markdown, parser, ray_env

REPO = Path(__file__).resolve().parents[1]
TARGET_GIB = 8.0  # the target for 1,000 institutions


def write_partitioned_exports(
    out: Path, students: int, institutions: list[int], alpha: float, seed: int
) -> dict[int, list[Path]]:
    """One folder of CSV exports per institution, for each N, from one pooled consortium.

    `simulations.partition.write_exports` writes the same tables but splits them with one scan
    of the pool per part (a minute for 1,000 parts here); grouping once keeps this benchmark
    about the simulation.
    """
    import numpy as np
    import pandas as pd

    from shared_models.data.contract import STUDENT_ID, TERM, default_spec
    from simulations.partition import dirichlet_partition, pool_exports
    from simulations.synthetic import write_consortium

    log(f"generating and pooling {students:,} synthetic students")
    pooled = pool_exports(write_consortium(out / "pool", institutions=4, students=students))
    labels = pooled.at_risk(default_spec())
    keys = pd.MultiIndex.from_frame(pooled.students[[STUDENT_ID, TERM]].astype(str))
    rows_of = {
        name: keys.get_indexer(pd.MultiIndex.from_frame(frame[[STUDENT_ID, TERM]].astype(str)))
        for name, frame in (
            ("students", pooled.students),
            ("activity", pooled.activity),
            ("outcomes", pooled.outcomes),
        )
    }
    exports: dict[int, list[Path]] = {}
    for n in institutions:
        started = time.monotonic()
        parts = dirichlet_partition(labels, n, alpha, seed)
        owner = np.empty(len(pooled), dtype=np.int64)
        for k, rows in enumerate(parts.values()):
            owner[rows] = k
        folders = [out / f"n{n}" / name for name in parts]
        for folder in folders:
            folder.mkdir(parents=True)
        for table, rows in rows_of.items():
            frame = getattr(pooled, table)
            for k, part in frame.groupby(owner[rows], sort=True):
                part.to_csv(folders[int(k)] / f"{table}.csv", index=False, lineterminator="\n")
        sizes = [len(p) for p in parts.values()]
        log(
            f"  {n} institutions ({min(sizes)}-{max(sizes)} students each) written in "
            f"{time.monotonic() - started:.0f} s"
        )
        exports[n] = folders
    return exports


def child(argv: Sequence[str]) -> int:
    """``--child RESULT OUT ROUNDS FRACTION EXPORT...``: one simulation; timestamps to RESULT."""
    result, out, rounds, fraction, *exports = argv
    marks: dict[str, Any] = {"start": time.time()}
    import resource

    from server.config import FederationConfig
    from simulations.runner import simulate

    marks["imported"] = time.time()
    config = FederationConfig(
        rounds=int(rounds),
        local_epochs=1,
        fraction_train=float(fraction),
        fraction_evaluate=float(fraction),
        min_nodes=2,
        out_dir=Path(out),
    )
    ends: list[float] = []
    marks["simulate"] = time.time()
    simulate(config, exports, on_round=lambda _: ends.append(time.time()))
    marks["simulated"] = time.time()
    nodes = []
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        entries = record.get("institutions", [])
        nodes.append(
            {
                "train": sum("train" in e for e in entries),
                "evaluate": sum("evaluate" in e for e in entries),
                "failures": len(record.get("failures", [])),
            }
        )
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(result).write_text(
        json.dumps({"marks": marks, "round_ends": ends, "nodes": nodes, "driver_peak": driver_peak})
    )
    return 0


def run_one(
    n: int, exports: list[Path], rounds: int, fraction: float, work: Path
) -> dict[str, Any]:
    """One simulation of ``n`` institutions in a fresh process; its times and peak memory."""
    result = work / f"scale-{n}.json"
    argv = [sys.executable, "-m", "bench.bench_scale", "--child", str(result)]
    argv += [str(work / f"run-{n}"), str(rounds), str(fraction), *map(str, exports)]
    env = {**ray_env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    spawned = time.time()
    with (
        subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        ) as proc,
        TreeMemory(root=proc.pid, interval=0.5).watch() as memory,
    ):
        _, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{n} institutions: the simulation failed:\n{stderr[-3000:]}")
    data: dict[str, Any] = json.loads(result.read_text())
    m, ends = data["marks"], data["round_ends"]
    durations = [b - a for a, b in itertools.pairwise([m["simulate"], *ends])]
    steady = durations[1:] or durations
    messages = [r["train"] + r["evaluate"] for r in data["nodes"]]
    return {
        "institutions": n,
        "wall_s": time.time() - spawned,
        "round_s": durations,
        "steady_round_s": Stats.of(steady),
        "first_round_s": durations[0],
        "node_messages_per_round": statistics.median(messages) if messages else 0,
        "failures": sum(r["failures"] for r in data["nodes"]),
        "peak_pss": memory.peak_pss,
        "peak_rss_sum": memory.peak_rss,
        "driver_peak_rss": data["driver_peak"],
        "processes": memory.peak_processes,
    }


def _growth(results: list[dict[str, Any]], key: str, scale: float) -> float | None:
    """Least-squares slope of ``key`` per institution, in ``scale`` units, over the Ns run."""
    if len(results) < 2:
        return None
    xs = [r["institutions"] for r in results]
    ys = [(r[key].median if isinstance(r[key], Stats) else r[key]) / scale for r in results]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def _table(results: list[dict[str, Any]]) -> str:
    rows = [
        [
            r["institutions"],
            r["node_messages_per_round"],
            f"{r['first_round_s']:.1f}",
            r["steady_round_s"].cell(2),
            f"{r['steady_round_s'].median / max(r['node_messages_per_round'], 1):.3f}",
            f"{r['peak_pss'] / GIB:.2f}",
            f"{r['peak_rss_sum'] / GIB:.2f}",
            f"{r['driver_peak_rss'] / MIB:.0f}",
            r["processes"],
            r["failures"],
        ]
        for r in results
    ]
    header = [
        "institutions",
        "node messages / round",
        "round 1 s",
        "steady round s",
        "s / message",
        "peak PSS GiB (tree)",
        "peak RSS sum GiB",
        "driver peak MiB",
        "processes",
        "failures",
    ]
    return markdown(header, rows)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    p = parser("bench_scale", __doc__.split("\n\n")[0])
    p.add_argument("--institutions", default="10,100,1000")
    p.add_argument("--students", type=int, default=30_000, help="pooled, split over them")
    p.add_argument("--alpha", type=float, default=10.0, help="Dirichlet label skew")
    p.add_argument("--fraction", type=float, default=0.02, help="share trained (and evaluated)")
    p.add_argument("--rounds", type=int, default=3, help="round 1 includes Ray's start")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.institutions, args.students, args.rounds = "10,100", 3000, 2
    counts = [int(n) for n in args.institutions.split(",") if n]
    report = Report("bench_scale", "3. Simulation scale", vars(args))
    results = []
    with tempfile.TemporaryDirectory(prefix="edufl-bench-scale-") as tmp:
        work = Path(tmp)
        exports = write_partitioned_exports(work, args.students, counts, args.alpha, args.seed)
        for n in counts:
            log(f"{n} institutions: simulating {args.rounds} rounds, fraction {args.fraction}")
            results.append(run_one(n, exports[n], args.rounds, args.fraction, work))
            r = results[-1]
            log(
                f"  steady round {r['steady_round_s'].median:.2f} s, peak PSS "
                f"{r['peak_pss'] / GIB:.2f} GiB over {r['processes']} processes"
            )
    seconds_per_1000 = _growth(results, "steady_round_s", 1.0)
    gib_per_1000 = _growth(results, "peak_pss", GIB)
    for r in results:
        big = r["institutions"] >= 1000
        report.add(
            Row(
                "3 simulation scale",
                f"{r['institutions']} institutions: steady round / peak PSS of the process tree",
                r["steady_round_s"],
                "s/round",
                target=f"< {TARGET_GIB:g} GiB at 1,000" if big else "",
                met=(r["peak_pss"] / GIB < TARGET_GIB) if big else None,
                note=f"peak {r['peak_pss'] / GIB:.2f} GiB PSS ({r['peak_rss_sum'] / GIB:.2f} GiB "
                f"RSS sum), {r['node_messages_per_round']:g} node messages/round",
            )
        )
    growth = {
        "round_seconds_per_1000_institutions": None
        if seconds_per_1000 is None
        else 1000 * seconds_per_1000,
        "pss_gib_per_1000_institutions": None if gib_per_1000 is None else 1000 * gib_per_1000,
    }
    report.details = {
        "runs": [{**r, "steady_round_s": vars(r["steady_round_s"])} for r in results],
        "growth": growth,
    }
    print(_table(results))
    print(
        "\nGrowth (least squares over the Ns run): "
        + ", ".join(f"{k} {v:.3g}" for k, v in growth.items() if v is not None)
    )
    report.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
