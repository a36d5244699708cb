"""Deployment round overhead: a real SuperLink and three SuperNodes on loopback, TLS on.

Each federation runs as an operator and the universities would run it: `edufl server start`
(a SuperLink with TLS and node authentication, then the ServerApp run) and one SuperNode per
institution (``client.node.launcher.start_supernode``, what `edufl client start` runs), each serving
its own synthetic export with its own enrolled key, DP-SGD on as every node defaults to. The
ClientApp modes compared:

- ``flower``: Flower's default (``--isolation subprocess``): the SuperNode's SuperExec starts a
  fresh ``flwr-clientapp`` per message, which imports torch, Opacus and pandas again;
- ``warm``: edufl's default: the SuperNode in ``--isolation process`` under
  ``client.node.warm_exec``, which forks each message's ClientApp from a process that imported
  them once (Flower 1.41 has no long-lived ``flwr-clientapp``: it takes one token, runs one
  message and exits);
- ``paced``: the warm node with ``--pull-interval 0.25`` (``client.node.pacing``: the next
  message asked for 0.25 s after one instead of Flower's fixed 3 s; opt-in).

A round's overhead is its wall time at the server (``seconds`` in the run's ``metrics.jsonl``:
from sending the global model until the last reply is in and aggregated) minus the slowest
node's local training time (``train/seconds`` in that node's own reply). Rounds run without a
federated evaluation, so a round is one message per node. Round 1 also waits for the nodes to
connect, so only later rounds count. In warm mode the overhead is split further with the task
durations the executor logs: in the task (loading the export, DP set-up and accounting,
validation) and transport (the rest: polling by the SuperNode and the ServerApp, TLS transfers,
aggregation). Federations of the two modes alternate, ``--reps`` times each.

    python -m bench.bench_deploy                    # 3 nodes, 1 x 6 rounds per mode
    python -m bench.bench_deploy --reps 2 --rounds 5  # as for the first figures (2 x 5 rounds)
    python -m bench.bench_deploy --quick            # 1 x 3 rounds per mode
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Report, Row, Stats, log, markdown, parser, ratio_stats

MODES = ("flower", "warm", "paced")
#: ``paced``: the warm node with ``edufl client start --pull-interval`` this many seconds.
PACED_PULL_S = 0.25
TARGET_S = 2.0  # issue 8, item 4: deployment overhead per round


def edufl(*args: str) -> str:
    """Run an `edufl` command in this process (keys, enrolment); its output."""
    from typer.testing import CliRunner

    from simulations.cli import app

    result = CliRunner().invoke(app, list(args), prog_name="edufl")
    if result.exit_code != 0:
        raise RuntimeError(f"edufl {' '.join(args)} failed:\n{result.output}")
    return result.output


@dataclass
class Federation:
    """One deployment on loopback: its folders, and every process it started."""

    root: Path
    hard_limit_s: int  # no process started here outlives this, whatever happens to us
    port: int = 0
    children: list[Any] = field(default_factory=list)  # processes.Child or a pid

    def __post_init__(self) -> None:
        from shared_models import processes

        self.port = self.port or processes.free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def keys(self) -> Path:
        return self.root / "consortium" / "keys"

    @property
    def state(self) -> Path:
        return self.root / "consortium" / "state"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def enrol(self, exports: Sequence[Path]) -> list[tuple[str, Path, Path]]:
        """Consortium keys, one key pair per institution, all enrolled: (name, export, key)."""
        edufl("server", "keys", "init", "--dir", str(self.keys))
        nodes = []
        for k, export in enumerate(exports, start=1):
            name = f"uni-{k:02d}"
            edufl(
                "client", "keys", "init", "--dir", str(self.root / "nodes" / name), "--name", name
            )
            pub = str(self.root / "nodes" / name / f"{name}.pub")
            edufl("server", "enrol", pub, "--name", name, "--state", str(self.state))
            nodes.append((name, export, self.root / "nodes" / name / name))
        return nodes

    def start_server(self, rounds: int, min_nodes: int, config: str, timeout_s: int) -> Any:
        """`edufl server start` under coreutils `timeout`; returns once the keys are registered."""
        from shared_models import processes

        cfg = self.root / "federation.toml"
        cfg.write_text(config)
        argv = ["timeout", "-k", "5", str(self.hard_limit_s), sys.executable, "-m"]
        argv += ["simulations.cli", "server", "start", "--keys", str(self.keys)]
        argv += ["--state", str(self.state), "--address", self.address, "--config", str(cfg)]
        argv += ["--rounds", str(rounds), "--min-nodes", str(min_nodes)]
        argv += ["--out", str(self.run_dir), "--timeout", str(timeout_s)]
        server = processes.start(
            "server",
            argv,
            log_path=self.root / "logs" / "server.out",
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=self.root,
        )
        self.children.append(server)
        wait_for("the server to register the keys", lambda: "enrolled institutions:" in
                 server.log_path.read_text(errors="replace"), 600, [server])  # fmt: skip
        return server

    def node_options(
        self, name: str, export: Path, key: Path, warm: bool, pull_interval: float | None = None
    ) -> Any:
        from client.node.launcher import NodeOptions
        from shared_models import processes

        return NodeOptions(
            data_dir=export,
            superlink=self.address,
            root_cert=self.keys / "ca.pem",
            private_key=key,
            name=name,
            home=self.root / "homes" / name,
            runtime_port=processes.free_port(),
            warm_clientapp=warm,
            pull_interval=pull_interval,
        )

    def start_node(
        self, name: str, export: Path, key: Path, warm: bool, pull_interval: float | None = None
    ) -> Any:
        """One SuperNode as `edufl client start` runs it (asked to die with this process)."""
        from client.node.launcher import start_supernode

        options = self.node_options(name, export, key, warm, pull_interval)
        child = start_supernode(options, ready_timeout=180)
        self.children.append(child)
        return child

    def wait_for_run(self, server: Any, timeout_s: float) -> list[dict[str, Any]]:
        """Wait until the server exits; the run's metrics.jsonl records (raises if it failed)."""
        wait_for("the run to finish", lambda: not server.alive(), timeout_s, [server])
        output = server.log_path.read_text(errors="replace")
        if server.process.returncode != 0 or "finished:completed" not in output:
            tail = "\n".join(output.splitlines()[-30:])
            raise RuntimeError(
                f"the run did not complete (exit {server.process.returncode}):\n{tail}"
            )
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def stop_all(self) -> None:
        from shared_models import processes

        for child in reversed(self.children):
            processes.stop(child, timeout=20)
        self.children.clear()


def wait_for(what: str, check: Callable[[], bool], timeout: float, must_live: list[Any]) -> None:
    """Poll ``check``; raise (with log tails) on timeout or when one of ``must_live`` exits."""
    from shared_models import processes

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not all(c.alive() for c in must_live):
            break
        time.sleep(0.5)
    tails = "\n".join(f"--- {c.name}\n{processes.log_tail(c.log_path, 30)}" for c in must_live)
    raise RuntimeError(f"gave up waiting for {what}\n{tails}")


def round_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: wall time, slowest node's training time, overhead, replies and failures."""
    rows = []
    for record in records:
        trained = [e["train"] for e in record["institutions"] if "train" in e]
        slowest = max((float(t.get("train/seconds", "nan")) for t in trained), default=0.0)
        rows.append(
            {
                "round": record["round"],
                "wall_s": float(record["seconds"]),
                "slowest_train_s": round(slowest, 3),
                "overhead_s": round(float(record["seconds"]) - slowest, 3),
                "replies": len(trained),
                "failures": len(record["failures"]),
            }
        )
    return rows


_TASK_DONE = re.compile(r"task \d+: ClientApp done in ([\d.]+) s")


def add_task_split(rows: list[dict[str, Any]], homes: Path) -> None:
    """Split each round's overhead where the warm executor logged its tasks' durations.

    ``in_task_s``: the slowest task (fork to exit) minus the slowest training: loading the
    export, DP set-up and accounting, validation, the Runtime API exchanges. ``transport_s``:
    the rest (the round's wall time minus the slowest task): SuperNode and ServerApp polling,
    TLS transfers, aggregation. Rounds are one task per node (no federated evaluation).
    """
    per_node = [
        [float(m) for m in _TASK_DONE.findall(log.read_text(errors="replace"))]
        for log in sorted(homes.glob("*/logs/supernode.log"))
    ]
    for row in rows:
        k = row["round"] - 1
        tasks = [durations[k] for durations in per_node if k < len(durations)]
        if len(tasks) != len(per_node) or not tasks:
            continue
        row["slowest_task_s"] = round(max(tasks), 3)
        row["in_task_s"] = round(max(tasks) - row["slowest_train_s"], 3)
        row["transport_s"] = round(row["wall_s"] - max(tasks), 3)


def run_federation(mode: str, args: Any, exports: list[Path], root: Path) -> list[dict[str, Any]]:
    """One federation of ``len(exports)`` nodes in ``mode``; its per-round figures."""
    fed = Federation(root, hard_limit_s=args.timeout + 120)
    nodes = fed.enrol(exports)
    config = f"local_epochs = {args.local_epochs}\nfraction_evaluate = 0.0\nround_timeout = 300.0\n"
    try:
        log(f"{mode}: starting the server ({args.rounds} rounds, {len(nodes)} nodes)")
        server = fed.start_server(args.rounds, len(nodes), config, args.timeout)
        started = time.monotonic()
        for name, export, key in nodes:
            pull = PACED_PULL_S if mode == "paced" else None
            fed.start_node(name, export, key, warm=mode != "flower", pull_interval=pull)
        log(f"{mode}: {len(nodes)} nodes up")
        records = fed.wait_for_run(server, args.timeout + 60)
        log(f"{mode}: run completed in {time.monotonic() - started:.0f} s")
    finally:
        fed.stop_all()
    rows = round_rows(records)
    add_task_split(rows, fed.root / "homes")
    return rows


def _stats(rows: Sequence[dict[str, Any]], key: str) -> Stats | None:
    values = [r[key] for r in rows if key in r]
    return Stats.of(values) if values else None


def _cell(stats: Stats | None) -> str:
    return "n/a" if stats is None else stats.cell(2)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("bench_deploy", __doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: flower,warm")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6, help="per federation; round 1 not counted")
    p.add_argument("--reps", type=int, default=1, help="federations per mode, alternating")
    p.add_argument("--students", type=int, default=900, help="in the whole consortium")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--timeout", type=int, default=900, help="seconds per federation")
    p.add_argument("--workdir", type=Path, default=None, help="kept; default a temp dir")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.reps = 3, 1
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    if shutil.which("timeout") is None:
        raise SystemExit("needs coreutils' timeout")
    from simulations.synthetic import write_consortium

    report = Report("bench_deploy", "4. deployment round overhead", vars(args))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edufl-bench-deploy-"))
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    try:
        exports = write_consortium(
            work / "exports", institutions=args.nodes, students=args.students, seed=0
        )
        for rep in range(args.reps):
            shift = rep % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                rows = run_federation(mode, args, exports, work / f"{mode}-{rep + 1}")
                rounds[mode] += [{"rep": rep + 1, **row} for row in rows]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    _report(report, rounds)
    print(_table(report.details))
    report.write(args.json)
    return 0


def _report(report: Report, rounds: dict[str, list[dict[str, Any]]]) -> None:
    """Per mode: median/min/max over the rounds after the first of every federation."""
    keys = ("wall_s", "slowest_train_s", "overhead_s", "in_task_s", "transport_s")
    for mode, rows in rounds.items():
        steady = [r for r in rows if r["round"] > 1]
        stats = {key: _stats(steady, key) for key in keys}
        report.details[mode] = {
            **{key: None if s is None else vars(s) for key, s in stats.items()},
            "failures": sum(r["failures"] for r in rows),
            "rounds": rows,
        }
        overhead = stats["overhead_s"]
        note = f"slowest training {_cell(stats['slowest_train_s'])} s"
        if stats["in_task_s"] is not None:
            note += (
                f"; in the task {_cell(stats['in_task_s'])} s, "
                f"transport {_cell(stats['transport_s'])} s"
            )
        report.add(
            Row(
                "4 deployment overhead",
                f"{mode}: round wall time - slowest node's training",
                overhead,
                "s",
                target=f"< {TARGET_S:g} s",
                met=None if overhead is None else overhead.median < TARGET_S,
                note=note,
            )
        )
    if {"flower", "warm"} <= rounds.keys():
        per_rep = {
            mode: [
                Stats.of(
                    [r["overhead_s"] for r in rows if r["rep"] == rep and r["round"] > 1]
                ).median
                for rep in sorted({r["rep"] for r in rows})
            ]
            for mode, rows in rounds.items()
        }
        report.add(
            Row(
                "4 deployment overhead",
                "overhead warm / flower (per pair of federations)",
                ratio_stats(per_rep["warm"], per_rep["flower"]),
                "x",
            )
        )


def _table(details: dict[str, Any]) -> str:
    header = [
        "ClientApp mode",
        "rounds",
        "round wall s",
        "slowest training s",
        "overhead s",
        "in the task s",
        "transport s",
    ]
    rows = []
    for mode, d in details.items():
        counted = sum(1 for r in d["rounds"] if r["round"] > 1)
        cells = [_cell(None if d[k] is None else Stats(**d[k])) for k in (
            "wall_s", "slowest_train_s", "overhead_s", "in_task_s", "transport_s"
        )]  # fmt: skip
        rows.append([mode, counted, *cells])
    return markdown(header, rows)


if __name__ == "__main__":
    raise SystemExit(main())
