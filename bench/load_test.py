"""Load test: 50 SuperNodes on loopback for 10 rounds, TLS and node authentication on.

Not part of the test suite nor of the benchmark total: it takes minutes and most of a small
machine. It runs a real deployment: `edufl server start` (the SuperLink with its planes split:
the Fleet API alone on the public address, ``--public-host`` 127.0.0.2 by default, with TLS and
node keys; Control and Runtime on 127.0.0.1; then the ServerApp run) and one SuperNode per
institution, each with its own enrolled key and its own synthetic export, in edufl's default
warm-ClientApp mode (`client.node.warm_exec`), DP-SGD on as every node defaults to. It reports:

- whether the planes were split: once the server is up, what an outsider holding ``ca.pem``
  gets from the public address for Control, Runtime and Fleet paths (404, 404, Flower's own
  refusal), and whether the control port answers there (a run whose planes are not split fails);
- what the SuperLink logged: failed requests by path and status, requests the public listener
  refused (the probes' only, when every node kept to the Fleet API), "database is locked";
- rounds completed (of those asked);
- per round, updates expected (every node: ``fraction_train`` is 1) and received (the nodes
  with training metrics in the run's ``metrics.jsonl``), failures and updates lost (must be 0);
- round wall times (median/min/max);
- peak total memory of every process of the deployment (SuperLink, its SuperExec and
  ServerApp, the SuperNodes, their executors and ClientApp tasks), as the sum of RSS (counts
  shared pages once per process) and of PSS (shares them out: what the machine really holds),
  sampled from ``/proc``;
- the 1-minute load average while the run went on (the machine may be shared).

``--launch exec`` starts each node as `edufl client start` does (``start_supernode``): every
node's warm executor imports torch and Opacus itself, about 320 MiB of private memory each,
more than 50 nodes on one small machine can hold. ``--launch fork`` (the default) runs the
very same node code (``client.node.warm_exec.main`` on ``node_argv``'s arguments) in processes
forked from this one after it imported those modules once, so the nodes share those pages (on
the universities' own machines each node has them to itself). Each node's torch uses
``--threads-per-node`` threads (1: 50 nodes share 2 cores), in its node config as
`edufl client start --threads` sets it, applied in each message's process.

The nodes run at ``--node-nice`` (10 by default) below the consortium's processes: on the
universities' machines a node's training never competes with the SuperLink for a CPU, here 50
trainers share 2 cores with it. In the first 50-node runs (nodes at nice 0, then 10; load
average up to 46) the SuperLink's SQLite store timed out on its locks ("database is locked"
after Flower's 5 s busy timeout) and refused 4-7 of the 50 replies of round 1 (HTTP 500):
Flower 1.41's SuperNode drops a reply whose push was refused, and a reply whose objects were
not all uploaded comes back as an error. The server now asks such a node again
(`server.superlink.retry.exchange`) and the node re-sends the update it released from its release
cache; the figures to watch are "updates lost" and "replies asked for again". At nice 19 a
starved SuperNode missed its heartbeats and the SuperLink declared it unavailable, which the
server counts as that node's failure, as for a crashed node: hence nice 10.

    python -m bench.load_test                       # 50 nodes, 10 rounds
    python -m bench.load_test --nodes 10 --rounds 3 --launch exec
    python -m bench.load_test --quick               # 5 nodes, 2 rounds
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bench_deploy import (
    PACED_PULL_S as DEFAULT_PULL_INTERVAL_S,
)
from bench.bench_deploy import (
    PUBLIC_HOST,
    Federation,
    add_threads_argument,
    planes_split,
    superlink_log_summary,
)
from bench.common import Report, Row, Stats, TreeMemory, log, markdown, parser

MIB = 1024**2


class ForkedNodes:
    """Nodes run by `client.node.warm_exec.main` in processes forked from this (preloaded) one."""

    def __init__(
        self,
        hard_limit_s: int,
        nice: int = 0,
        activation_wait: float = 90.0,
        preload: bool = True,
    ) -> None:
        if preload:
            from client.node import warm_exec

            warm_exec._preload(",".join(warm_exec.PRELOAD))
        self.hard_limit_s = hard_limit_s
        self.nice = nice
        self.activation_wait = activation_wait
        self.pids: list[int] = []
        self._nodes: dict[int, _Started] = {}  # pid -> what it was started with
        self._due: list[tuple[float, _Started]] = []  # restarts waiting for their time
        #: Names of nodes started again after the SuperLink did not activate them.
        self.restarted: list[str] = []

    def start(self, options: Any, first_start: float | None = None) -> int:
        from client.node.launcher import node_argv
        from client.node.warm_exec import main as warm_main
        from shared_models import processes

        argv = node_argv(options)[3:]  # what `python -m client.node.warm_exec` would be given
        log_path = options.home / "logs" / "supernode.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_start = log_path.stat().st_size if log_path.exists() else 0
        env = processes.flower_env(options.home)
        pid = os.fork()
        if pid == 0:  # the node: never returns
            code = 1
            try:
                os.setsid()  # a process group of its own, as `processes.start` gives
                os.nice(self.nice)  # inherited by the node's SuperNode and ClientApp tasks
                libc = ctypes.CDLL("libc.so.6", use_errno=True)
                libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the load test
                signal.alarm(self.hard_limit_s)  # and never outlive the hard limit
                fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(options.home)
                os.environ.clear()
                os.environ.update(env)
                code = warm_main(argv)
            finally:
                os._exit(code)
        self.track(pid, options, log_path, log_start, first_start)
        return pid

    def track(
        self,
        pid: int,
        options: Any,
        log_path: Path,
        log_start: int,
        first_start: float | None = None,
    ) -> None:
        """Count ``pid`` as a node of ``options`` (whose log grew from ``log_start``)."""
        self.pids.append(pid)
        first = time.monotonic() if first_start is None else first_start
        self._nodes[pid] = _Started(options, log_path, log_start, first)

    def restart_unactivated(self) -> None:
        """Start again, as `edufl client start --activation-wait` does, a node that exited
        before the SuperLink activated it, ``ACTIVATION_RETRY_S`` after it exited, for up to
        ``activation_wait`` seconds after its first start.

        On a loaded machine a node's activation request can time out after the SuperLink
        has activated it; Flower's SuperNode then asks again, is refused (its key's session is
        marked online) and exits.
        """
        from client.node.cli import ACTIVATION_RETRY_S

        now = time.monotonic()
        for pid, node in list(self._nodes.items()):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done == 0:
                continue
            del self._nodes[pid]
            if activated(node.log_path, node.log_start):
                continue
            if now + ACTIVATION_RETRY_S - node.first_start <= self.activation_wait:
                self._due.append((now + ACTIVATION_RETRY_S, node))
            else:
                waited = now - node.first_start
                log(f"{node.options.name} was not activated; gave up after {waited:.0f} s")
        for due in [d for d in self._due if d[0] <= now]:
            self._due.remove(due)
            node = due[1]
            log(f"{node.options.name} was not activated: started again, as `edufl client start`")
            self.restarted.append(node.options.name)
            self.start(node.options, node.first_start)

    def stop_all(self, timeout: float = 30.0) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for pid in self.pids:
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG) == (0, 0):
                        time.sleep(0.2)
                        continue
                break
        for pid in self.pids:  # whatever is left of each node's group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()


@dataclass(frozen=True)
class _Started:
    options: Any  # client.node.launcher.NodeOptions
    log_path: Path
    log_start: int  # the log's size when this start began
    first_start: float  # time.monotonic() of the node's first start


#: Flower 1.41's SuperNode logs this once the SuperLink has activated it.
ACTIVATED = "SuperNode ID:"


def activated(log_path: Path, log_start: int) -> bool:
    """Whether the node whose log is ``log_path`` was activated after offset ``log_start``."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(log_start)
            return ACTIVATED.encode() in fh.read()
    except FileNotFoundError:
        return False


def load_rows(records: Sequence[dict[str, Any]], expected: int) -> list[dict[str, Any]]:
    """Per round: wall time, updates expected, received and lost, failures."""
    rows = []
    for record in records:
        received = sum(1 for e in record["institutions"] if "train" in e)
        rows.append(
            {
                "round": record["round"],
                "wall_s": float(record["seconds"]),
                "expected": expected,
                "received": received,
                "lost": expected - received,
                "failures": len(record["failures"]),
            }
        )
    return rows


def run(args: Any, work: Path) -> dict[str, Any]:
    """The whole load test; its figures."""
    from simulations.synthetic import write_consortium

    log(f"writing {args.nodes} synthetic exports ({args.students} students in all)")
    exports = write_consortium(
        work / "exports", institutions=args.nodes, students=args.students, seed=0
    )
    fed = Federation(
        work / "federation",
        hard_limit_s=args.timeout + 300,
        host=args.public_host,
        threads=args.threads_per_node or None,
    )
    log("consortium keys, a key pair per institution, enrolment")
    nodes = fed.enrol(exports)
    config = (
        f"local_epochs = {args.local_epochs}\n"
        f"fraction_evaluate = {1.0 if args.evaluate else 0.0}\n"
        f"round_timeout = {float(args.round_timeout)}\n"
        f"model_overrides = {{ hidden_size = {args.hidden_size} }}\n"
    )
    memory = TreeMemory()
    forked = (
        ForkedNodes(fed.hard_limit_s, args.node_nice, args.activation_wait)
        if args.launch == "fork"
        else None
    )
    started = time.monotonic()
    try:
        server = fed.start_server(args.rounds, args.nodes, config, args.timeout)
        planes = fed.probe_planes()
        log(
            f"server up: public {planes['public']} (Fleet API: "
            f"{'only' if planes_split(planes) else 'NOT ONLY'}), control {planes['control']}; "
            f"starting {args.nodes} nodes ({args.launch})"
        )
        for name, export, key in nodes:
            pull = args.pull_interval or None  # 0: Flower's own pace
            options = fed.node_options(name, export, key, True, pull)
            if forked is not None:
                forked.start(options)
            else:
                fed.start_node(name, export, key, True, pull)
            memory.sample()
        log("all nodes started; waiting for the run")
        last_report = 0.0
        loads: list[float] = []
        while server.alive() and time.monotonic() - started < args.timeout + 120:
            memory.sample()
            loads.append(os.getloadavg()[0])
            if forked is not None:
                forked.restart_unactivated()
            if (free := _available_gib()) < args.min_free_gib:  # the machine is shared
                raise RuntimeError(
                    f"only {free:.1f} GiB of memory left (--min-free-gib {args.min_free_gib}); "
                    f"stopped the load test at {_rounds_done(fed.run_dir)} round(s)"
                )
            if time.monotonic() - last_report > 30:
                log(
                    f"{_rounds_done(fed.run_dir)}/{args.rounds} rounds; peak PSS "
                    f"{memory.peak_pss / MIB:.0f} MiB, RSS {memory.peak_rss / MIB:.0f} MiB; "
                    f"load {os.getloadavg()[0]:.1f}"
                )
                last_report = time.monotonic()
            time.sleep(args.sample_every)
        error = ""
        try:
            records = fed.wait_for_run(server, 60)
        except RuntimeError as exc:  # report what the run did before it failed
            error = _last_error(server.log_path.read_text(errors="replace")) or str(exc)
            log(f"the run failed: {error}")
            records = _records(fed.run_dir)
    finally:
        if forked is not None:
            forked.stop_all()
        fed.stop_all()
    rows = load_rows(records, args.nodes)
    server_log = server.log_path.read_text(errors="replace")
    superlink = superlink_log_summary(fed.superlink_log.read_text(errors="replace"))
    return {
        "error": error,
        "planes": planes,
        "planes_split": planes_split(planes),
        "superlink_log": superlink,
        # replies the server asked for again (server.superlink.retry.exchange), and why they were
        # late
        "asked_again": _asked_again(server_log),
        # nodes the SuperLink did not activate at first, started again (--activation-wait)
        "restarted_nodes": forked.restarted if forked is not None else [],
        "superlink_refused_pushes": sum(
            n for k, n in superlink["failed_requests"].items() if k.endswith("push-messages 500")
        ),
        "rounds_asked": args.rounds,
        "rounds_completed": len(rows),
        "updates_expected": sum(r["expected"] for r in rows),
        "updates_received": sum(r["received"] for r in rows),
        "updates_lost": sum(r["lost"] for r in rows),
        "failures": sum(r["failures"] for r in rows),
        "round_s": vars(Stats.of([r["wall_s"] for r in rows])) if rows else None,
        "rounds": rows,
        "peak_rss_sum_mib": round(memory.peak_rss / MIB),
        "peak_pss_sum_mib": round(memory.peak_pss / MIB),
        "peak_processes": memory.peak_processes,
        "seconds_server_start_to_end": round(time.monotonic() - started, 1),
        # the machine is shared: the 1-minute load average while the run went on
        "load_average": [round(min(loads), 1), round(max(loads), 1)] if loads else None,
        "cpus": os.cpu_count(),
    }


def passed(result: dict[str, Any]) -> bool:
    """Every round asked completed, no update lost, and only the Fleet API was public."""
    return (
        not result["error"]
        and result["updates_lost"] == 0
        and result["rounds_completed"] == result["rounds_asked"]
        and result["planes_split"]
    )


def _records(run_dir: Path) -> list[dict[str, Any]]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines]


def _last_error(output: str) -> str:
    """The ServerApp's last exception line, or the run's final status line."""
    lines = [line.strip() for line in output.splitlines()]
    errors = [line for line in lines if line.startswith("flwr.") and "Error" in line]
    finished = [line for line in lines if " finished:" in line]
    return (errors or finished or [""])[-1][:400]


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024**2
    return float("inf")


def _asked_again(server_log: str) -> int:
    """Node replies the server asked for again (its warnings; a line may be logged twice, once
    by Flower's coloured handler and once plain: the plain lines count when there are any)."""
    phrase = "no reply yet from node(s) "
    lines = [line for line in server_log.splitlines() if phrase in line]
    plain = [line for line in lines if "\x1b" not in line] or lines
    return sum(len(line.split(phrase, 1)[1].split(":")[0].split(", ")) for line in plain)


def _rounds_done(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _table(result: dict[str, Any]) -> str:
    r = result
    header = ["round", "wall s", "updates expected", "received", "lost", "failures"]
    rows = [
        [x["round"], f"{x['wall_s']:.1f}", x["expected"], x["received"], x["lost"], x["failures"]]
        for x in r["rounds"]
    ]
    s = Stats(**r["round_s"]) if r["round_s"] else None
    lines = [
        markdown(header, rows),
        "",
        f"rounds completed: {r['rounds_completed']}/{r['rounds_asked']}; updates lost: "
        f"{r['updates_lost']} of {r['updates_expected']}; failed replies: {r['failures']}",
        f"round wall time s: {'n/a' if s is None else s.cell(1)} (median [min-max])",
        f"peak memory, all processes (up to {r['peak_processes']}): PSS "
        f"{r['peak_pss_sum_mib']} MiB, RSS {r['peak_rss_sum_mib']} MiB (sums)",
        f"server start to run end: {r['seconds_server_start_to_end']} s",
        f"replies asked for again: {r['asked_again']}; pushes the SuperLink refused (HTTP 500, "
        f"e.g. 'database is locked'): {r['superlink_refused_pushes']}",
    ]
    if r["restarted_nodes"]:
        lines.append(
            f"nodes started again after the SuperLink did not activate them: "
            f"{', '.join(r['restarted_nodes'])}"
        )
    planes, superlink = r["planes"], r["superlink_log"]
    lines += [
        f"planes: public {planes['public']} answers "
        + ", ".join(f"{path} {code}" for path, code in planes["status"].items())
        + f"; control plane {planes['control']}"
        + f" ({'open' if planes['control_port_open_on_public_host'] else 'closed'} on the public"
        f" address): {'split' if r['planes_split'] else 'NOT SPLIT'}",
        "SuperLink log (Flower leaves out successful routine requests): by status "
        f"{superlink['logged_requests_by_status']}; failed "
        f"{superlink['failed_requests'] or 'none'}; refused on the public listener "
        f"{superlink['refused_on_public_listener']} (the probes above: "
        f"{len(planes['status']) - 1}); 'database is locked' {superlink['database_locked']}",
    ]
    if r["load_average"]:
        low, high = r["load_average"]
        lines.append(f"load average (1 min) during the run: {low}-{high} on {r['cpus']} CPUs")
    if r["error"]:
        lines.append(f"the run FAILED: {r['error']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("load_test", __doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--students", type=int, default=3000, help="in the whole consortium")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--hidden-size", type=int, default=16, help="the LSTM's units")
    p.add_argument("--evaluate", action="store_true", help="also a federated evaluation")
    p.add_argument("--launch", choices=("fork", "exec"), default="fork")
    p.add_argument(
        "--public-host",
        default=PUBLIC_HOST,
        help="loopback address of the public listener (the control plane is on 127.0.0.1)",
    )
    add_threads_argument(p)
    p.add_argument(
        "--node-nice", type=int, default=10, help="niceness of forked nodes (0: as the server)"
    )
    p.add_argument(
        "--activation-wait",
        type=float,
        default=90.0,
        help="start a forked node the SuperLink did not activate again for this many seconds, "
        "as `edufl client start --activation-wait` does (0: never)",
    )
    p.add_argument(
        "--pull-interval",
        type=float,
        default=DEFAULT_PULL_INTERVAL_S,
        help="seconds every node waits before asking for its next message, as `edufl client "
        f"start --pull-interval` (default {DEFAULT_PULL_INTERVAL_S:g}, as that command's; "
        "0: Flower's fixed 3 s)",
    )
    p.add_argument("--round-timeout", type=int, default=900)
    p.add_argument("--timeout", type=int, default=3600, help="seconds for the whole run")
    p.add_argument("--sample-every", type=float, default=5.0, help="memory sampling, s")
    p.add_argument("--min-free-gib", type=float, default=2.0, help="stop below this much")
    p.add_argument("--workdir", type=Path, default=None, help="kept; default a temp dir")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.rounds, args.students = 5, 2, 300
    if shutil.which("timeout") is None:
        raise SystemExit("needs coreutils' timeout")
    report = Report("load_test", "issue 9.2: load", vars(args))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edufl-load-"))
    try:
        result = run(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    report.details = result
    ok = passed(result)
    _rows(report, args, result, ok)
    print(_table(result))
    report.write(args.json)
    return 0 if ok else 1


def _rows(report: Report, args: Any, result: dict[str, Any], ok: bool) -> None:
    question, n = "9.2 load", args.nodes
    report.add(
        Row(
            question,
            f"{n} nodes: rounds completed, updates lost",
            None,
            "",
            target=f"{args.rounds}/{args.rounds} rounds, 0 lost",
            met=ok,
            note=f"{result['rounds_completed']}/{args.rounds} rounds, {result['updates_lost']} "
            f"lost of {result['updates_expected']}"
            + (f"; the run failed: {result['error']}" if result["error"] else ""),
        )
    )
    if result["round_s"]:
        report.add(Row(question, f"{n} nodes: round wall time", Stats(**result["round_s"]), "s"))
    report.add(
        Row(
            question,
            f"{n} nodes: peak memory of all processes (PSS sum)",
            Stats.of([result["peak_pss_sum_mib"]]),
            "MiB",
            note=f"RSS sum {result['peak_rss_sum_mib']} MiB",
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
