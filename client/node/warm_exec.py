"""A SuperNode whose ClientApp processes start warm: ``python -m client.node.warm_exec``.

Flower 1.41 runs every message a node receives in a fresh ``flwr-clientapp`` process (its
SuperExec launches one per task), and each one imports torch, Opacus and pandas again: 5-12 s
of every round on a small machine, for seconds of training. ``flwr-clientapp`` cannot be kept
running instead: it takes one task's token, runs one message and exits.

This command runs the SuperNode with ``--isolation process`` (so the SuperNode starts no
SuperExec of its own) and takes the SuperExec's place: once the SuperLink has let the node in
(so as not to slow its start), it imports the ClientApp's modules once, asks the SuperNode's
local Runtime API for tasks, and runs each task in a child forked from that preloaded image,
through `client.node.own_code.run_task`: Flower's ``run_clientapp`` without its installing and
importing of the app bundle, so the node runs only its own edufl's ``client.app:app`` and
refuses a bundle that names other code. Every message still gets a process of its own that
exits afterwards, as with Flower's default, so nothing (no data, no model, no accountant)
carries over from one message to the next; only the imports do, and, given the node's config
(``--node-config-json``, from `client.node.launcher`), its export read, validated and split
once here (`client.app.prime`), checked again after every task and prepared again when one of
its files changed (a task that finds them changed prepares its own). With ``--preload ""`` (a
"cold" node) each task imports what it needs itself, as Flower's ``flwr-clientapp`` would.

The SuperNode is this process's child; its output passes through here to ours, so one log shows
the SuperNode, this executor and the ClientApps. When the SuperNode announces that it received
a message (all of its objects), the task is asked for at once; otherwise every ``--poll``
seconds, as Flower's SuperExec does. The
command exits with the SuperNode's exit code; SIGTERM or SIGINT stops the SuperNode and any
task in progress.

Usage::

    python -m client.node.warm_exec --runtime-api-address 127.0.0.1:9094 -- flower-supernode ...
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from client.node import flower_surface, log_times
from shared_models.deployment import exit_unless_pinned_flower

logger = logging.getLogger("edufl.warm_exec")

#: Imported before the first task: what `client.app` needs, including what it imports lazily.
PRELOAD = (
    # torch.optim imports it lazily when the first optimizer is made: 0.9-1.0 s of every task
    # (half of a warm task's own overhead) when left to the task.
    "torch._dynamo",
    "flwr.supernode.runtime.run_clientapp",
    "client.node.own_code",
    "client.app",
    "privacy.dp",
    "privacy.budget",
    "privacy.ledger.consortium",
)
#: Seconds between task requests while the SuperNode announces nothing (Flower's SuperExec: 1 s).
#: A request costs the node about 5 ms of CPU (0.1 s would take 5 % of a core per idle node);
#: tasks announced in the SuperNode's log (`_HINT`) are asked for at once anyway.
POLL_S = 2.0
#: The SuperNode logs this once it holds all of a message's objects, after it created the
#: message's task (flwr 1.41); if a release changes it, tasks are still found, ``POLL_S`` later.
#: Not "Receiving: " (logged before the task is created and its objects are pulled from the
#: SuperLink): a task forked then asks the SuperNode for objects it does not hold yet, and
#: Flower's task waits 1 s before asking again (`client.node.object_pulls.install_task`
#: shortens that wait for a task that is handed out early all the same, e.g. by ``POLL_S``).
_HINT = flower_surface.RECEIVED.text.encode()
#: Logged once the SuperLink has let the node in.
_ACTIVATED = flower_surface.ACTIVATED.text.encode()
#: Importing competes for the CPU with the SuperNode's own start: wait this long for it first.
_ACTIVATION_WAIT_S = 60.0
_HINT_POLL_S = 0.05  # how often to ask after the hint, until the task is handed out
_HINT_WINDOW_S = 10.0
_PR_SET_PDEATHSIG = 1
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@dataclass(frozen=True)
class _Task:
    task_id: int
    pid: int


def main(argv: Sequence[str] | None = None) -> int:
    """Start the SuperNode command after ``--`` and serve its ClientApp tasks until it exits."""
    args = _parser().parse_args(argv)
    if args.supernode[:1] == ["--"]:
        args.supernode = args.supernode[1:]
    if not args.supernode:
        raise SystemExit("give the SuperNode command after --")
    _log_to_stderr()
    exit_unless_pinned_flower()  # tasks run through Flower 1.41.0's internals (flower_surface)
    log_times.time_flower_lines()  # the tasks' Flower lines, forked from here
    from client.node.own_code import describe_own_code

    logger.info("warm ClientApp executor: %s", describe_own_code())
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGINT, _raise_exit)
    supernode = subprocess.Popen(  # in our process group: a stop of the group reaches it too
        args.supernode,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    assert supernode.stdout is not None
    relay = _Relay(supernode.stdout.fileno())
    tasks: dict[int, _Task] = {}  # by process id
    code: int | None = None
    primer = _primer(args)
    try:
        relay.wait_until_activated(_ACTIVATION_WAIT_S)
        _preload(args.preload, relay, primer)
        _serve(args.runtime_api_address, args.poll, supernode, relay, tasks, primer)
    except SystemExit as exc:  # SIGTERM/SIGINT (see _raise_exit)
        logger.info("warm ClientApp executor: stopping the SuperNode")
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        _stop_all(supernode, relay, tasks)
    if code is None:  # the SuperNode exited by itself: its exit code is ours
        code = supernode.returncode if supernode.returncode >= 0 else 128 - supernode.returncode
    return code


class _Relay:
    """Copies the SuperNode's output to ours, noticing when it announces a message."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.open = True
        self.activated = False
        self.hints = 0  # messages announced so far (``_HINT``), one task each
        self._tail = b""

    def pump(self, timeout: float) -> int:
        """Copy what the SuperNode wrote (waiting up to ``timeout`` s); how many messages it
        announced (also added to ``hints``)."""
        hinted = 0
        while self.open and select.select([self.fd], [], [], timeout)[0]:
            chunk = os.read(self.fd, 65536)
            if not chunk:  # the SuperNode exited
                self.open = False
                break
            _write_all(1, chunk)
            text = self._tail + chunk
            hinted += text.count(_HINT) - self._tail.count(_HINT)  # the tail's were counted
            self.activated = self.activated or _ACTIVATED in text
            self._tail = text[-64:]
            timeout = 0.0  # take what is there, then return
        self.hints += hinted
        return hinted

    def wait_until_activated(self, timeout: float) -> None:
        """Copy the SuperNode's output until it is in (or gone, or ``timeout`` s passed)."""
        deadline = time.monotonic() + timeout
        while self.open and not self.activated and time.monotonic() < deadline:
            self.pump(min(1.0, max(0.0, deadline - time.monotonic())))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _log_to_stderr() -> None:
    """Our lines, and edufl's own from the ClientApp, in the node's log (not Flower's again)."""
    handler = logging.StreamHandler()
    handler.setFormatter(log_times.formatter())  # timed with EDUFL_NODE_LOG_TIMES=1
    for name in (logger.name, "client", "privacy", "shared_models"):
        package_logger = logging.getLogger(name)
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)
        package_logger.propagate = False  # Opacus configures the root logger when imported


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client.node.warm_exec", description=__doc__)
    parser.add_argument("--runtime-api-address", required=True, help="HOST:PORT (loopback)")
    parser.add_argument("--poll", type=float, default=POLL_S, help="idle seconds between asks")
    parser.add_argument(
        "--preload", default=",".join(PRELOAD), help="comma-separated modules to import once"
    )
    parser.add_argument(
        "--node-config-json",
        default="",
        help="the node config (JSON object) whose export to prepare once, before the tasks",
    )
    parser.add_argument("supernode", nargs=argparse.REMAINDER, help="-- flower-supernode ...")
    return parser


def _primer(args: argparse.Namespace) -> Callable[[], None] | None:
    """What prepares the node's export in this process (`client.app.prime`), if anything."""
    if not args.node_config_json or not args.preload:
        return None  # a cold node keeps nothing in this process
    try:
        node_config = json.loads(args.node_config_json)
        if not isinstance(node_config, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise SystemExit(f"--node-config-json: {exc}") from None

    def prime() -> None:
        from client.app import prime as prime_export

        prime_export(node_config)

    return prime


def _preload(
    modules: str, relay: _Relay | None = None, primer: Callable[[], None] | None = None
) -> None:
    """Import ``modules`` (comma-separated), prepare the export (``primer``), and keep them
    out of the garbage collector."""
    started = time.monotonic()
    for name in filter(None, (m.strip() for m in modules.split(","))):
        if relay is not None:
            relay.pump(0.0)  # the SuperNode's lines, without waiting for all imports
            if not relay.open:  # it exited (e.g. the SuperLink refused it): nothing to serve
                return
        try:
            importlib.import_module(name)
        except ImportError as exc:  # a missing optional part only costs its import per task
            logger.warning("warm ClientApp executor: cannot preload %s: %s", name, exc)
    if primer is not None and (relay is None or relay.open):
        primer()
    # Frozen objects are never collected, so a task's collections do not write to (and copy)
    # the pages it shares with this process.
    gc.collect()
    gc.freeze()
    logger.info("warm ClientApp executor: modules loaded in %.1f s", time.monotonic() - started)


def _serve(
    address: str,
    poll: float,
    supernode: subprocess.Popen[bytes],
    relay: _Relay,
    tasks: dict[int, _Task],
    primer: Callable[[], None] | None = None,
) -> None:
    """Fork a task child for every ClientApp task the SuperNode hands out, until it exits.

    After each task ends, ``primer`` checks the prepared export against its files.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    host, _, port = address.rpartition(":")
    while not _listening(host.strip("[]"), int(port)):
        if relay.pump(0.2) or not relay.open or supernode.poll() is not None:
            break
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the Runtime API listens on the node's own loopback only
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    # Asked quickly only while a task announced is not handed out yet: the hint may come after
    # the task was found by an idle ask, and must not keep the quick asks on into the next
    # round's message, whose objects would then still be arriving.
    next_ask, acquired, last_task = 0.0, 0, time.monotonic()
    hinted_until = last_task + _HINT_WINDOW_S if relay.hints else 0.0  # announced in preload
    with contextlib.closing(client):
        while relay.open and supernode.poll() is None:
            if _reap(tasks) and primer is not None and not tasks:
                primer()
            hinted = relay.pump(max(0.0, next_ask - time.monotonic()))
            now = time.monotonic()
            if relay.hints < acquired and now - last_task > _HINT_WINDOW_S:
                acquired = relay.hints  # tasks without a hint (e.g. another Flower's log)
            owed = relay.hints - acquired
            if hinted and owed > 0:
                next_ask, hinted_until = 0.0, now + _HINT_WINDOW_S
            if now < next_ask:
                continue
            quick = owed > 0 and now < hinted_until
            next_ask = now + (_HINT_POLL_S if quick else poll)
            try:
                reply = client.AcquireTask(request)
            except Exception as exc:  # the SuperNode is starting or stopping: ask again
                logger.debug("no task: %s", exc)
                next_ask = now + poll
                continue
            if reply.HasField("task") and reply.token:
                task = _fork_task(address, reply.token, reply.task.task_id, relay.fd)
                tasks[task.pid] = task
                acquired, last_task = acquired + 1, time.monotonic()
                if relay.hints <= acquired:
                    hinted_until = 0.0


def _fork_task(address: str, token: str, task_id: int, relay_fd: int) -> _Task:
    # No signal handler may run in the child before it resets them (ours would stop the
    # SuperNode from there): block both signals across the fork.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    pid = os.fork()
    if pid == 0:
        os.close(relay_fd)
        _run_task(address, token, task_id)  # never returns
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    logger.info("task %d: ClientApp in process %d", task_id, pid)
    return _Task(task_id, pid)


def _run_task(address: str, token: str, task_id: int) -> None:
    """In the forked child: run one ClientApp task with edufl's own code, then exit."""
    started, code = time.monotonic(), 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        from client.node.own_code import run_task

        sys.argv = ["flwr-clientapp"]  # Flower names the exiting component by argv[0]
        run_task(address, token, parent_pid=os.getppid())
        code = 0
    except SystemExit as exc:  # run_task always ends with flwr_exit -> sys.exit
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logger.exception("ClientApp task failed")
    finally:
        if code == 0:  # bench/bench_deploy.py reads this line
            logger.info("task %d: ClientApp done in %.2f s", task_id, time.monotonic() - started)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the parent's atexit handlers and finalizers


def _reap(tasks: dict[int, _Task]) -> int:
    """Collect the tasks that ended; how many did."""
    ended = 0
    for pid in list(tasks):
        with contextlib.suppress(ChildProcessError):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                continue
            if code := os.waitstatus_to_exitcode(status):
                logger.warning("task %d: ClientApp exited with code %d", tasks[pid].task_id, code)
        del tasks[pid]
        ended += 1
    return ended


def _stop_all(
    supernode: subprocess.Popen[Any], relay: _Relay, tasks: dict[int, _Task], grace: float = 10.0
) -> None:
    """Stop the SuperNode and any task child (SIGKILL after ``grace`` s); copy its last output."""
    for pid in tasks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if supernode.poll() is None:
        supernode.terminate()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (tasks or supernode.poll() is None or relay.open):
        relay.pump(0.1)
        _reap(tasks)
    for pid in tasks:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if supernode.poll() is None:
        supernode.kill()
    supernode.wait()
    relay.pump(0.0)
    _reap(tasks)


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
