"""Federation overhead: a federated simulation's wall time over centralized training's.

Both train the same model on the same students for the same number of sample-epochs: the
simulation runs 4 institutions (the synthetic consortium), 5 rounds of 1 local epoch on Flower's
Ray engine or, with ``--engine inline``, in its own process (`simulations.runner.simulate`,
``engine``; defaults otherwise: FedAvg, every node trains and
evaluates every round); centralized training pools the very same train splits
(`shared_models.data.node.split_node`) and trains 5 epochs (`shared_models.training.fit`, no
validation).
Each runs as a fresh process, as a user would run it, with one torch thread (Ray gives each
worker one; see ``docs/benchmarks.md`` for why two threads are a trap on a shared machine). The
two alternate, several times, at each consortium size.

Where the rest goes comes from timestamps inside the processes (imports, Ray and the workers'
start in round 1, the steady rounds, shutdown), the nodes' own ``train/seconds``, and in-process
timings of what a round moves: serializing the messages (Ray pickles them) and aggregating.

    python -m bench.bench_federation          # 1,200 students x 3 runs, 6,000 x 1, both engines
    python -m bench.bench_federation --students 1200,12000 --runs 5,3
    python -m bench.bench_federation --engine inline   # one engine only (default: ray,inline)
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

from bench.common import Report, Row, Stats, log, markdown, parser, ratio_stats, ray_env

INSTITUTIONS, ROUNDS, LOCAL_EPOCHS, BATCH = 4, 5, 1, 32
TARGET = 1.5
REPO = Path(__file__).resolve().parents[1]


# -- the two measured processes ----------------------------------------------------------------


def _federated(exports: list[Path], out: Path, engine: str = "ray") -> dict[str, Any]:
    marks: dict[str, Any] = {"start": time.time()}
    from server.config import FederationConfig
    from simulations.runner import simulate

    marks["imported"] = time.time()
    config = FederationConfig(
        rounds=ROUNDS,
        local_epochs=LOCAL_EPOCHS,
        batch_size=BATCH,
        min_nodes=len(exports),
        out_dir=out,
    )
    rounds: list[dict[str, float | None]] = []
    marks["simulate"] = time.time()
    simulate(
        config,
        exports,
        engine=engine,
        on_round=lambda r: rounds.append(
            {"end": time.time(), "server_seconds": getattr(r, "seconds", None)}
        ),
    )
    marks["simulated"] = time.time()
    node_train = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        node_train.append(
            [
                e["train"].get("train/seconds")
                for e in record.get("institutions", [])
                if "train" in e
            ]
        )
    return {"marks": marks, "rounds": rounds, "node_train_seconds": node_train}


def _centralized(exports: list[Path]) -> dict[str, Any]:
    marks: dict[str, Any] = {"start": time.time()}
    from shared_models.data.cohort import CohortArrays, Normalizer
    from shared_models.data.contract import load_spec
    from shared_models.data.node import split_node
    from shared_models.models.registry import build_model
    from shared_models.training import FitConfig, fit, set_seed

    marks["imported"] = time.time()
    spec = load_spec(None)
    train = CohortArrays.concatenate([split_node(p, spec, seed=0).train for p in exports])
    inputs = Normalizer(spec.target.grade_min, spec.target.grade_max).fit(train).transform(train)
    set_seed(0)
    model = build_model("lstm", spec.weeks, train.n_dynamic, train.n_static)
    marks["loaded"] = time.time()
    fit(model, inputs, None, "risk", FitConfig(max_epochs=ROUNDS * LOCAL_EPOCHS, batch_size=BATCH))
    marks["trained"] = time.time()
    return {"marks": marks, "students": len(train)}


def child(argv: Sequence[str]) -> int:
    """``--child fed[:ENGINE]|central RESULT OUT EXPORT...``: one run; its timestamps to RESULT."""
    kind, result, out, *exports = argv
    paths = [Path(p) for p in exports]
    kind, _, engine = kind.partition(":")
    data = _federated(paths, Path(out), engine or "ray") if kind == "fed" else _centralized(paths)
    data["marks"]["done"] = time.time()
    Path(result).write_text(json.dumps(data))
    return 0


def _spawn(kind: str, exports: list[Path], work: Path, tag: str) -> dict[str, Any]:
    result = work / f"{tag}.json"
    argv = [sys.executable, "-m", "bench.bench_federation", "--child", kind, str(result)]
    argv += [str(work / f"{tag}-run"), *map(str, exports)]
    env = {**ray_env(), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    spawned = time.time()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    exited = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(result.read_text())
    data["marks"] |= {"spawned": spawned, "exited": exited}
    return data


# -- what a round moves, timed in this process -------------------------------------------------


def _round_costs(reps: int = 30) -> dict[str, float]:
    """Milliseconds per message: build, pickle round trip, and FedAvg over the replies."""
    import pickle

    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from shared_models.data.contract import default_spec
    from shared_models.models.registry import build_model
    from shared_models.models.weights import named_weights

    spec = default_spec()
    model = build_model("lstm", spec.weeks, len(spec.dynamic_names), len(spec.static_names))

    def content() -> RecordDict:
        record = RecordDict()
        record["arrays"] = ArrayRecord({k: Array(v) for k, v in named_weights(model).items()})
        record["metrics"] = MetricRecord({"num-examples": 100})
        record["config"] = ConfigRecord({"server-round": 1})
        return record

    def ms(fn: Any) -> float:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    message = content()  # what Ray pickles to and from a worker; Message metadata is tiny
    replies = [content() for _ in range(INSTITUTIONS)]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_message_ms": ms(content),
        "pickle_round_trip_ms": ms(lambda: pickle.loads(pickle.dumps(message))),
        "aggregate_ms": ms(lambda: aggregate_arrayrecords(replies, "num-examples")),
    }


# -- the parent --------------------------------------------------------------------------------


def _phases(fed: dict[str, Any], central: dict[str, Any]) -> dict[str, float]:
    """Seconds of each phase of one federated run, and of the centralized run beside it."""
    m, rounds = fed["marks"], fed["rounds"]
    ends = [m["simulate"]] + [r["end"] for r in rounds]
    durations = [b - a for a, b in itertools.pairwise(ends)]
    steady = statistics.median(durations[1:]) if len(durations) > 1 else 0.0
    train = [[s for s in r if s is not None] for r in fed["node_train_seconds"]]
    c = central["marks"]
    return {
        "fed_wall": m["exited"] - m["spawned"],
        "fed_start_and_imports": m["imported"] - m["spawned"],
        "fed_round1": durations[0],
        "fed_round1_extra": durations[0] - steady,
        "fed_steady_round": steady,
        "fed_rounds_total": sum(durations),
        "fed_after_rounds": m["done"] - ends[-1],
        "fed_exit": m["exited"] - m["done"],
        "fed_node_train_sum": sum(sum(r) for r in train),
        "fed_node_train_max_per_round": sum(max(r, default=0.0) for r in train),
        "central_wall": c["exited"] - c["spawned"],
        "central_start_and_imports": c["imported"] - c["spawned"],
        "central_load": c["loaded"] - c["imported"],
        "central_train": c["trained"] - c["loaded"],
        "central_exit": c["exited"] - c["trained"],
    }


def measure_size(students: int, runs: int, work: Path, engine: str = "ray") -> dict[str, Any]:
    from simulations.synthetic import write_consortium

    consortium = work / "consortium"
    exports = (
        sorted(p.parent for p in consortium.glob("*/students.csv"))
        if consortium.is_dir()  # a second engine measures the very same exports
        else write_consortium(consortium, institutions=INSTITUTIONS, students=students)
    )
    phases = []
    for k in range(runs):
        order = ("fed", "central") if k % 2 == 0 else ("central", "fed")
        pair: dict[str, dict[str, Any]] = {}
        for kind in order:
            log(f"{students} students, run {k + 1}/{runs}: {kind} ({engine})")
            spawned = f"fed:{engine}" if kind == "fed" else kind
            pair[kind] = _spawn(spawned, exports, work, f"{kind}-{engine}-{k}")
        phases.append(_phases(pair["fed"], pair["central"]))
        log(
            f"  federated {phases[-1]['fed_wall']:.1f} s, centralized "
            f"{phases[-1]['central_wall']:.1f} s"
        )
    keys = phases[0].keys()
    return {
        "students": students,
        "engine": engine,
        "phases": {k: Stats.of([p[k] for p in phases]) for k in keys},
        "ratio": ratio_stats([p["fed_wall"] for p in phases], [p["central_wall"] for p in phases]),
        "ratio_in_process": ratio_stats(
            [p["fed_wall"] - p["fed_start_and_imports"] for p in phases],
            [p["central_wall"] - p["central_start_and_imports"] for p in phases],
        ),
        "runs": phases,
    }


_BREAKDOWN = (
    ("process start + imports (driver)", "fed_start_and_imports", "central_start_and_imports"),
    ("data loading", None, "central_load"),
    ("round 1 beyond a steady round: Ray, workers, their imports", "fed_round1_extra", None),
    ("5 rounds (train + evaluate messages)", "fed_rounds_total", None),
    ("  of which node training on the critical path", "fed_node_train_max_per_round", None),
    ("  node training, all nodes (CPU-seconds)", "fed_node_train_sum", None),
    ("training", None, "central_train"),
    ("after the last round: Ray shutdown, summary, plots", "fed_after_rounds", None),
    ("interpreter exit", "fed_exit", "central_exit"),
    ("wall time", "fed_wall", "central_wall"),
)  # fmt: skip


def _tables(sizes: list[dict[str, Any]], costs: dict[str, float]) -> str:
    out = []
    for size in sizes:
        p = size["phases"]
        rows = [
            [label, p[f].cell(2) if f else "", p[c].cell(2) if c else ""]
            for label, f, c in _BREAKDOWN
        ]
        out.append(
            f"{size['students']} students, {size['engine']} engine: federated / centralized wall "
            "time "
            f"{size['ratio'].cell(2)} x (without interpreter start and imports: "
            f"{size['ratio_in_process'].cell(2)} x)\n\n"
            + markdown(["phase (seconds)", "federated", "centralized"], rows)
        )
    out.append(
        "Per message, in-process ("
        f"{costs['parameters']:,} parameters): build {costs['build_message_ms']:.2f} ms, "
        f"pickle round trip {costs['pickle_round_trip_ms']:.2f} ms; FedAvg over "
        f"{INSTITUTIONS} replies {costs['aggregate_ms']:.2f} ms"
    )
    return "\n\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    p = parser("bench_federation", __doc__.split("\n\n")[0])
    p.add_argument("--students", default="1200,6000", help="consortium sizes, comma-separated")
    p.add_argument(
        "--runs", default="3,1", help="federated/centralized pairs per size (the last repeats)"
    )
    p.add_argument(
        "--engine",
        default="ray,inline",
        help="simulation engine(s), comma-separated, each against centralized in the same run: "
        "ray, inline (what simulate run's default, auto, runs on one machine; "
        "simulations.runner.ENGINES)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.students, args.runs = "400", "1"
    report = Report("bench_federation", "1. Federation overhead", vars(args))
    counts = [int(s) for s in args.students.split(",") if s]
    runs = [int(r) for r in args.runs.split(",") if r]
    runs += [runs[-1]] * (len(counts) - len(runs))
    engines = [e for e in args.engine.split(",") if e]
    unknown = sorted(set(engines) - {"ray", "inline"})
    if unknown or not engines:
        p.error(f"--engine: expected ray and/or inline, got {args.engine!r}")
    sizes = []
    with tempfile.TemporaryDirectory(prefix="edufl-bench-fed-") as tmp:
        for students, n in zip(counts, runs, strict=False):
            for engine in engines:
                sizes.append(measure_size(students, n, Path(tmp) / str(students), engine))
    log("timing serialization and aggregation in-process")
    costs = _round_costs()
    for size in sizes:
        p = size["phases"]
        fixed = p["fed_start_and_imports"].median + p["fed_round1_extra"].median
        report.add(
            Row(
                "1 federation overhead",
                f"{INSTITUTIONS} institutions, {size['students']} students, {ROUNDS} rounds x "
                f"{LOCAL_EPOCHS} epoch"
                + ("" if size["engine"] == "ray" else f", {size['engine']} engine")
                + ": federated / centralized wall time",
                size["ratio"],
                "x",
                target=f"<= {TARGET:g}x",
                met=size["ratio"].median <= TARGET,
                note=f"federated {p['fed_wall'].median:.1f} s (start+imports+Ray+workers "
                f"{fixed:.1f} s, steady round {p['fed_steady_round'].median:.2f} s) vs "
                f"centralized {p['central_wall'].median:.1f} s "
                f"(training {p['central_train'].median:.1f} s)",
            )
        )
    report.details = {
        "sizes": [
            {**s, "phases": {k: vars(v) for k, v in s["phases"].items()},
             "ratio": vars(s["ratio"]), "ratio_in_process": vars(s["ratio_in_process"])}
            for s in sizes
        ],
        "per_message": costs,
    }  # fmt: skip
    print(_tables(sizes, costs))
    report.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
