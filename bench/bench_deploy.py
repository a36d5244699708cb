"""Deployment round overhead: a real SuperLink and three SuperNodes on loopback, TLS on.

Each federation runs as an operator and the universities would run it: `edufl server start`
(the SuperLink with its planes split: the Fleet API alone on the public address, 127.0.0.2
here, Control and Runtime on 127.0.0.1; TLS and node authentication; then the ServerApp run)
and one SuperNode per institution, each serving its own synthetic export with its own enrolled
key, DP-SGD on as every node defaults to. The nodes share this machine's cores, so each trains
with one torch thread (``--threads-per-node``, `edufl client start --threads`), as the load test's
nodes do: with torch's own two threads per node, three nodes' DP rounds on 2 cores took 6x as
long (0.82 s against 0.13 s for the slowest node's training), a second thread waiting for a
core another node holds. The modes compared:

- ``flower``: Flower's own process isolation, for reference only: the SuperNode with Flower's
  default ``--isolation subprocess``, whose SuperExec starts a fresh ``flwr-clientapp`` per
  message; that process installs the app bundle the server sends, imports the ClientApp it
  names (edufl's ``client.app:app`` here) and torch, Opacus and pandas with it. edufl's node
  never runs this way (issue 17: it would run whatever code the bundle names), so no
  `edufl client start` option gives it; the node is started here from
  ``client.node.launcher.supernode_argv`` with the isolation switched back;
- ``cold``: edufl's executor (`client.node.warm_exec`, ``client.node.own_code``: only the
  node's own ``client.app:app``) preloading nothing (``NodeOptions.warm_clientapp=False``):
  each message's process imports torch, Opacus and pandas itself, as ``flwr-clientapp`` does,
  without its interpreter start and bundle install;
- ``warm``: `edufl client start --pull-interval 0`: the same executor forking each message's
  ClientApp from a process that imported them once (and prepared the export), at Flower's
  own pace;
- ``paced``: edufl's default (`edufl client start`, ``--pull-interval 0.25``:
  ``client.node.pacing``, the next message asked for 0.25 s after one instead of Flower's fixed
  3 s).

A round's overhead is its wall time at the server (``seconds`` in the run's ``metrics.jsonl``:
from sending the global model until the last reply is in and aggregated) minus the slowest
node's local training time (``train/seconds`` in a reply without DP; a DP reply carries none,
so the time each node writes in its own log, `add_train_times`). Rounds run without a
federated evaluation, so a round is one message per node. Round 1 also waits for the nodes to
connect, so only later rounds count. With edufl's executor (cold, warm, paced) the overhead is
split further with the task durations it logs: in the task (imports when cold, loading the
export, DP set-up and accounting, validation) and transport (the rest: polling by the
SuperNode and the ServerApp, TLS transfers, aggregation). Federations of the modes alternate,
``--reps`` times each, the order rotating.

    python -m bench.bench_deploy                    # 3 nodes, 1 x 6 rounds per mode
    python -m bench.bench_deploy --reps 2 --rounds 5  # as for the first figures (2 x 5 rounds)
    python -m bench.bench_deploy --quick            # 1 x 3 rounds per mode
"""

from __future__ import annotations

import argparse
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

MODES = ("flower", "cold", "warm", "paced")
#: Modes whose node is edufl's own executor (`client.node.warm_exec`), and whether it preloads.
EXECUTOR_WARM = {"cold": False, "warm": True, "paced": True}
#: ``paced``: the warm node with ``edufl client start --pull-interval`` this many seconds
#: (its default, `client.node.launcher.DEFAULT_PULL_INTERVAL_S`).
PACED_PULL_S = 0.25
TARGET_S = 2.0  # issue 8, item 4: deployment overhead per round
#: Flower's own node's overhead per round when issue 20 set `TARGET_S` (docs/benchmarks.md,
#: section 4): the target was this share of it. Its node logs no training times now, so its round
#: wall time stands in (its one DP step is a small part of 14-23 s). The machine's speed moves
#: both; their ratio, from one run, says whether the default node keeps that share on a machine
#: slower or faster than then.
FLOWER_ROUND_AT_TARGET_S = 14.3
#: The mode the target is for: the node `edufl client start` runs by default.
DEFAULT_MODE = "paced"
#: The public listener's address: a loopback address other than the control plane's 127.0.0.1,
#: so that a request reaching the Control or Runtime API through it would show (issue 17).
PUBLIC_HOST = "127.0.0.2"
#: What an outsider holding ``ca.pem`` tries on the public address: each must be 404.
CLOSED_PATHS = ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/acquire-task")
#: A Fleet route, which must answer (Flower itself refuses the empty request, never 404).
FLEET_PATH = "/v1/fleet/get-run"
_ACCESS = re.compile(r'"(?:GET|POST|PUT|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')
#: `server.superlink.serve.PublicPlane`'s warning for a request it turned away.
_REFUSED_PUBLIC = re.compile(r"refused \S+ \S+ from \S+ on the public listener")


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
    #: The public listener's address (the Fleet API, what the nodes reach); the control plane
    #: stays on 127.0.0.1, so the two planes have addresses of their own as on a real server.
    host: str = PUBLIC_HOST
    port: int = 0
    children: list[Any] = field(default_factory=list)  # processes.Child or a pid
    #: Timestamps on the server's and the nodes' log lines (``--log-times``).
    log_times: bool = False
    #: Every node's torch threads (`edufl client start --threads`); None: torch's own.
    threads: int | None = None

    def __post_init__(self) -> None:
        from shared_models import processes

        self.port = self.port or processes.free_port(self.host)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def superlink_log(self) -> Path:
        return self.state / "logs" / "superlink.log"

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
        edufl("server", "keys", "init", "--dir", str(self.keys), "--address", self.host)
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
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.log_times:  # Flower's lines timed (with its debug lines): the ServerApp's too
            env["FLWR_LOG_LEVEL"] = "DEBUG"
        server = processes.start(
            "server",
            argv,
            log_path=self.root / "logs" / "server.out",
            env=env,
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
            threads=self.threads,
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

    def probe_planes(self) -> dict[str, Any]:
        """What an outsider with ``ca.pem`` gets from the running server's public address."""
        from shared_models import processes

        info = json.loads((self.state / "server.json").read_text("utf-8"))
        _, control_port = processes.split_address(str(info["control"]))
        ca = self.keys / "ca.pem"
        paths = (*CLOSED_PATHS, FLEET_PATH)
        return {
            "public": info["address"],
            "control": info["control"],
            "control_port_open_on_public_host": processes.port_open(self.host, control_port),
            "status": {path: https_post(f"https://{self.address}{path}", ca) for path in paths},
        }

    def start_flower_node(self, name: str, export: Path, key: Path) -> Any:
        """A SuperNode in Flower's default isolation: its SuperExec starts ``flwr-clientapp``
        for each message, which installs the bundle and imports the ClientApp it names.

        The reference edufl's node no longer offers (issue 17); the same command line as
        edufl's node otherwise (`client.node.launcher.supernode_argv`).
        """
        from shared_models import processes

        options = self.node_options(name, export, key, warm=False)
        child = processes.start(
            f"SuperNode {name} (Flower's isolation)",
            flower_supernode_argv(options),
            log_path=options.home / "logs" / "supernode.log",
            env=processes.flower_env(options.home),
            cwd=options.home,
        )
        self.children.append(child)
        processes.wait_until_listening(child, "127.0.0.1", options.runtime_port, 180)
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


def flower_supernode_argv(options: Any) -> list[str]:
    """edufl's `flower-supernode` command line for ``options`` with Flower's default isolation
    (``subprocess``) instead of edufl's (``process``, served by `client.node.warm_exec`)."""
    from client.node.launcher import supernode_argv

    argv = supernode_argv(options)
    argv[argv.index("--isolation") + 1] = "subprocess"
    return argv


def https_post(url: str, ca: Path) -> int:
    """The HTTP status of an empty POST to ``url``, the server verified against ``ca``."""
    import ssl
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        url, data=b"", method="POST", headers={"Content-Type": "application/protobuf"}
    )
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def planes_split(probe: dict[str, Any]) -> bool:
    """Whether a `Federation.probe_planes` result shows only the Fleet API public."""
    status = probe["status"]
    return (
        not probe["control_port_open_on_public_host"]
        and all(status[path] == 404 for path in CLOSED_PATHS)
        and status[FLEET_PATH] != 404
    )


def superlink_log_summary(text: str) -> dict[str, Any]:
    """The SuperLink log in figures: requests by status, the failed ones by path and status,
    and requests the public listener refused (anything outside the Fleet API)."""
    by_status: dict[str, int] = {}
    failed: dict[str, int] = {}
    for path, status in _ACCESS.findall(text):
        by_status[status] = by_status.get(status, 0) + 1
        if not status.startswith("2"):
            failed[f"{path} {status}"] = failed.get(f"{path} {status}", 0) + 1
    return {
        "logged_requests_by_status": dict(sorted(by_status.items())),
        "failed_requests": dict(sorted(failed.items())),
        "refused_on_public_listener": len(_REFUSED_PUBLIC.findall(text)),
        "database_locked": text.count("database is locked"),
    }


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
    """Per round: wall time, slowest node's training time, overhead, replies and failures.

    Training time and overhead only where the replies carry ``train/seconds`` (replies that
    release nothing but the update, as since the privacy issue, leave them out).
    """
    rows = []
    for record in records:
        trained = [e["train"] for e in record["institutions"] if "train" in e]
        times = [float(t["train/seconds"]) for t in trained if "train/seconds" in t]
        row: dict[str, Any] = {
            "round": record["round"],
            "wall_s": float(record["seconds"]),
            "replies": len(trained),
            "failures": len(record["failures"]),
        }
        if times:
            row["slowest_train_s"] = round(max(times), 3)
            row["overhead_s"] = round(float(record["seconds"]) - max(times), 3)
        rows.append(row)
    return rows


_TASK_DONE = re.compile(r"task \d+: ClientApp done in ([\d.]+) s")
#: `client.app`'s line in the node's own log (a DP reply carries no training time).
_TRAINED = re.compile(r"round (\d+): .+ trained .*in ([\d.]+) s")


def add_train_times(rows: list[dict[str, Any]], homes: Path) -> None:
    """Each round's slowest training time and overhead, from the nodes' own logs.

    Under DP the reply releases nothing but the update, so ``round_rows`` finds no training
    time; every node logs it locally (the benchmark runs the nodes, so it may read their logs).
    A round gets them only when every node logged it.
    """
    per_node = [
        {int(r): float(t) for r, t in _TRAINED.findall(log.read_text(errors="replace"))}
        for log in sorted(homes.glob("*/logs/supernode.log"))
    ]
    for row in rows:
        times = [node[row["round"]] for node in per_node if row["round"] in node]
        if "slowest_train_s" in row or not per_node or len(times) != len(per_node):
            continue
        row["slowest_train_s"] = round(max(times), 3)
        row["overhead_s"] = round(row["wall_s"] - max(times), 3)


def add_task_split(rows: list[dict[str, Any]], homes: Path) -> None:
    """Split each round's overhead where the warm executor logged its tasks' durations.

    ``in_task_s``: the slowest task (fork to exit) minus the slowest training: loading the
    export, DP set-up and accounting, validation, the Runtime API exchanges. ``transport_s``:
    the rest (the round's wall time minus the slowest task): SuperNode and ServerApp polling,
    TLS transfers, aggregation. Rounds are one task per node (no federated evaluation).
    """
    add_train_times(rows, homes)
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
        if "slowest_train_s" in row:
            row["in_task_s"] = round(max(tasks) - row["slowest_train_s"], 3)
        row["transport_s"] = round(row["wall_s"] - max(tasks), 3)


def _thread_count(text: str) -> int:
    """A node's thread count from the command line: 0 (torch's own) or more."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"--threads-per-node must be 0 (torch's own) or more, not {text}"
        )
    return value


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    """``--threads-per-node``, as this benchmark and the load test take it (default 1)."""
    p.add_argument(
        "--threads-per-node",
        type=_thread_count,
        default=1,
        help="every node's torch threads (edufl client start --threads): the nodes share this "
        "machine's cores; 0 leaves torch's own (a thread per core, in every node)",
    )


def run_federation(mode: str, args: Any, exports: list[Path], root: Path) -> list[dict[str, Any]]:
    """One federation of ``len(exports)`` nodes in ``mode``; its per-round figures."""
    fed = Federation(
        root,
        hard_limit_s=args.timeout + 120,
        log_times=args.log_times,
        threads=args.threads_per_node or None,
    )
    nodes = fed.enrol(exports)
    config = f"local_epochs = {args.local_epochs}\nfraction_evaluate = 0.0\nround_timeout = 300.0\n"
    try:
        log(f"{mode}: starting the server ({args.rounds} rounds, {len(nodes)} nodes)")
        server = fed.start_server(args.rounds, len(nodes), config, args.timeout)
        started = time.monotonic()
        for name, export, key in nodes:
            if mode == "flower":
                fed.start_flower_node(name, export, key)
                continue
            pull = PACED_PULL_S if mode == "paced" else None
            fed.start_node(name, export, key, warm=EXECUTOR_WARM[mode], pull_interval=pull)
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
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6, help="per federation; round 1 not counted")
    p.add_argument("--reps", type=int, default=1, help="federations per mode, alternating")
    p.add_argument("--students", type=int, default=900, help="in the whole consortium")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--timeout", type=int, default=900, help="seconds per federation")
    p.add_argument("--workdir", type=Path, default=None, help="kept; default a temp dir")
    add_threads_argument(p)
    p.add_argument(
        "--log-times",
        action="store_true",
        help="timestamps on every node log line (EDUFL_NODE_LOG_TIMES=1), for a timeline",
    )
    args = p.parse_args(argv)
    if args.log_times:  # the nodes inherit this process's environment
        from client.node import log_times

        os.environ[log_times.ENV] = "1"
    if args.quick:
        args.rounds, args.reps = 3, 1
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        p.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    if shutil.which("timeout") is None:
        raise SystemExit("needs coreutils' timeout")
    from shared_models.processes import terminate_on_sigterm

    report = Report("bench_deploy", "4. deployment round overhead", vars(args))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edufl-bench-deploy-"))
    rounds: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    # Under `timeout` (SIGTERM) too, the federation's `finally` stops the server and the nodes.
    with terminate_on_sigterm():
        _run_modes(args, modes, work, rounds)
    _report(report, rounds)
    print(_table(report.details))
    report.write(args.json)
    return 0


def _run_modes(
    args: Any, modes: Sequence[str], work: Path, rounds: dict[str, list[dict[str, Any]]]
) -> None:
    """Every mode's federations, alternating; their rows appended to ``rounds``."""
    from simulations.synthetic import write_consortium

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


def _report(report: Report, rounds: dict[str, list[dict[str, Any]]]) -> None:
    """Per mode: median/min/max over the rounds after the first of every federation.

    Each mode's measure is its overhead where its rounds have training times (a DP reply
    carries none: edufl's executor logs them, `add_train_times`), else its round's wall time
    (Flower's own node logs none). The ratios between modes compare overheads when both have
    them, else wall times (the nodes train the same students the same way in every mode).
    """
    keys = ("wall_s", "slowest_train_s", "overhead_s", "in_task_s", "transport_s", "slowest_task_s")
    labels = {
        "overhead_s": "round wall time - slowest node's training",
        "wall_s": "round wall time (replies carry no training time)",
    }

    def measure_of(*modes: str) -> str:
        return "overhead_s" if all(_stats(rounds[m], "overhead_s") for m in modes) else "wall_s"

    for mode, rows in rounds.items():
        measure = measure_of(mode)
        label = labels[measure]
        targeted = measure == "overhead_s" and mode == DEFAULT_MODE
        steady = [r for r in rows if r["round"] > 1]
        stats = {key: _stats(steady, key) for key in keys}
        report.details[mode] = {
            **{key: None if s is None else vars(s) for key, s in stats.items()},
            "failures": sum(r["failures"] for r in rows),
            "rounds": rows,
        }
        value = stats[measure]
        notes = [f"slowest training {_cell(stats['slowest_train_s'])} s"] * bool(
            stats["slowest_train_s"]
        )
        if stats["slowest_task_s"] is not None:
            notes.append(f"slowest task {_cell(stats['slowest_task_s'])} s")
        if stats["in_task_s"] is not None:
            notes.append(f"in the task {_cell(stats['in_task_s'])} s")
        if stats["transport_s"] is not None:
            notes.append(f"transport {_cell(stats['transport_s'])} s")
        report.add(
            Row(
                "4 deployment overhead",
                f"{mode}: {label}",
                value,
                "s",
                target=f"< {TARGET_S:g} s" if targeted else "",
                met=None if value is None or not targeted else value.median < TARGET_S,
                note="; ".join(notes),
            )
        )
    if {DEFAULT_MODE, "flower"} <= rounds.keys() and measure_of(DEFAULT_MODE) == "overhead_s":
        share = TARGET_S / FLOWER_ROUND_AT_TARGET_S
        ratio = ratio_stats(
            _per_rep(rounds[DEFAULT_MODE], "overhead_s"), _per_rep(rounds["flower"], "wall_s")
        )
        report.add(
            Row(
                "4 deployment overhead",
                f"{DEFAULT_MODE} overhead / flower round wall time (per pair of federations; the "
                f"{TARGET_S:g} s target was {share:.2f} of Flower's node's "
                f"{FLOWER_ROUND_AT_TARGET_S:g} s when set)",
                ratio,
                "x",  # a reading aid beside the target's row, not a target of its own
            )
        )
    for mode, reference in (("warm", "flower"), ("warm", "cold")):
        if {mode, reference} <= rounds.keys():
            measure = measure_of(mode, reference)
            report.add(
                Row(
                    "4 deployment overhead",
                    f"{'overhead' if measure == 'overhead_s' else 'round wall time'} {mode} / "
                    f"{reference} (per pair of "
                    "federations)",
                    ratio_stats(
                        _per_rep(rounds[mode], measure), _per_rep(rounds[reference], measure)
                    ),
                    "x",
                )
            )


def _per_rep(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    """The median ``key`` of each federation (rounds after the first), in rep order."""
    return [
        Stats.of([r[key] for r in rows if r["rep"] == rep and r["round"] > 1]).median
        for rep in sorted({r["rep"] for r in rows})
    ]


def _table(details: dict[str, Any]) -> str:
    header = [
        "node (ClientApp mode)",
        "rounds",
        "round wall s",
        "slowest training s",
        "overhead s",
        "slowest task s",
        "in the task s",
        "transport s",
    ]
    rows = []
    for mode, d in details.items():
        counted = sum(1 for r in d["rounds"] if r["round"] > 1)
        cells = [_cell(None if d[k] is None else Stats(**d[k])) for k in (
            "wall_s", "slowest_train_s", "overhead_s", "slowest_task_s", "in_task_s", "transport_s"
        )]  # fmt: skip
        rows.append([mode, counted, *cells])
    return markdown(header, rows)


if __name__ == "__main__":
    raise SystemExit(main())
