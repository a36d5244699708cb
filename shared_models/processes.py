"""Child processes of a deployment: start, wait until ready, stop by process id.

Both `edufl server start` (a SuperLink) and `edufl client start` (a SuperNode) run a Flower
daemon as a child. This module lives in ``shared_models`` only because that is the one package
both ``server`` and ``client`` may import; it knows nothing about models.

Every child is started in its own session, so that it and whatever it spawns form one process
group that `stop` can signal by the child's id, and it is asked to die with its parent
(``PR_SET_PDEATHSIG`` on Linux): a crashed or killed edufl command never leaves a Flower daemon
behind. Flower's SuperExec runs in a session of its own and starts the ServerApp and ClientApp
processes there, outside that group, possibly while we stop: so `stop` also notes the child's
descendants (from ``/proc``) before signalling, and kills any that outlive it together with
the process groups they lead.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared_models.errors import EduflError

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class DeploymentError(EduflError, RuntimeError):
    """A Flower daemon could not be started, reached or stopped as asked."""


@dataclass
class Child:
    """A started daemon: its process, and the file its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_start: int = 0  # size of the log before this process wrote to it

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's commands: own home folder, no telemetry, no update check.

    Flower otherwise reports usage to flower.ai and looks for new releases at every start;
    neither belongs in a consortium's deployment, and both stall where there is no internet.
    """
    env = dict(os.environ)
    # Flower's daemons start their helpers (flower-superexec, flwr-serverapp, ...) through
    # PATH: make sure the ones installed beside this Python are found, even outside a venv.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]).rstrip(os.pathsep)
    env.update(
        FLWR_HOME=str(flwr_home.resolve()),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def executable(name: str) -> str:
    """Path of a console script, preferring the one installed next to this Python."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"`{name}` not found; install edufl with its dependencies")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS picks it; free until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def split_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) as ``(host, port)``; a user error if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or (host.count(":") and not host.startswith("[")):
        if default_port is None:
            raise DeploymentError(f"address {address!r} must be HOST:PORT")
        host, port = address, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeploymentError(f"address {address!r} must be HOST:PORT with a port in 1-65535")
    return host, int(port)


def start(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Child:
    """Start ``argv`` as the leader of a new process group, its output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        log_start = log_file.tell()
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    logger.info("started %s (pid %d), log %s", name, process.pid, log_path)
    return Child(name, process, log_path, log_start)


def wait_until_listening(child: Child, host: str, port: int, timeout: float = 60.0) -> None:
    """Block until ``child`` accepts connections on ``host:port``; raise if it exits or stalls."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise DeploymentError(
                f"{child.name} exited with code {child.process.returncode} before listening on "
                f"{host}:{port}; its log ({child.log_path}) ends with:\n{log_tail(child.log_path)}"
            )
        if port_open(host, port):
            logger.info("%s is listening on %s:%d", child.name, host, port)
            return
        time.sleep(0.2)
    stop(child)
    raise DeploymentError(
        f"{child.name} did not listen on {host}:{port} within {timeout:.0f} s; "
        f"its log ({child.log_path}) ends with:\n{log_tail(child.log_path)}"
    )


def stop(child: Child | int, timeout: float = 15.0) -> int | None:
    """Stop a child and its process group: SIGTERM, then SIGKILL after ``timeout`` seconds.

    Args:
        child: A `Child`, or the id of a process `start` created (the leader of its group).
        timeout: Seconds to wait for a graceful exit before killing.

    Returns:
        The exit code when ``child`` is a `Child` we can reap, else None.
    """
    pid = child.pid if isinstance(child, Child) else child
    process = child.process if isinstance(child, Child) else None
    family = _descendants(pid)
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _running(pid, process):
        time.sleep(0.1)
    if _running(pid, process):
        logger.warning("process %d ignored SIGTERM for %.0f s; killing it", pid, timeout)
        _signal_group(pid, signal.SIGKILL)
    else:
        # Kill what is left of the group (never the bare id: it may already be reused):
        # Flower's SuperExec and app processes otherwise linger until they notice.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    for descendant, started, leads_group in family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if leads_group:
                # An id stays reserved while its group has members: this reaches only processes
                # started into that group, even ones spawned after the snapshot.
                os.killpg(descendant, signal.SIGKILL)
            elif (stat := _stat(descendant)) is not None and stat[2] == started:
                os.kill(descendant, signal.SIGKILL)  # the same process, not a reused id
    if process is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return process.wait(timeout=5)
    return None


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while inside, so ``finally`` blocks stop the children."""

    def _raise(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a log file, indented (empty when there is none)."""
    try:
        text = path.read_text("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _running(pid: int, process: subprocess.Popen[bytes] | None) -> bool:
    if process is not None:
        return process.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        # Not the leader of a group (or the group is gone): signal the single process.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _descendants(pid: int) -> list[tuple[int, int, bool]]:
    """``(pid, start time, leads its group)`` of each process below ``pid`` (none without /proc)."""
    stats = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(entry.name))
        if stat is not None:
            stats[int(entry.name)] = stat
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in stats.items():
        children.setdefault(parent, []).append(child)
    found: list[tuple[int, int, bool]] = []
    todo = list(children.get(pid, []))
    while todo:
        current = todo.pop()
        _, group, started = stats[current]
        found.append((current, started, group == current))
        todo.extend(children.get(current, []))
    return found


def _stat(pid: int) -> tuple[int, int, int] | None:
    """Parent id, process group and start time (clock ticks) from ``/proc/PID/stat``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[1]), int(fields[2]), int(fields[19])
