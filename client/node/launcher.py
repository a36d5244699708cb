"""An institution's node as deployed: a SuperNode serving this institution's export.

The SuperNode connects out to the consortium's SuperLink over TLS (verified against the
consortium CA), authenticates with the institution's own key, and runs ``client.app:app`` on
the export named in its node config. Nothing listens to the outside: the node's Runtime API
is bound to 127.0.0.1 on a port of its own, so several nodes can share a machine.

The SuperNode always runs with ``--isolation process`` under `client.node.warm_exec`, never
with Flower's default, whose own SuperExec would start ``flwr-clientapp``: that installs the app
bundle the server sends and imports the ClientApp it names. `client.node.own_code` runs only
this installation's ``client.app:app`` and refuses any other bundle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from client.node import flower_surface
from privacy.keys import KeyMaterialError, check_name, load_node_private_key
from shared_models import processes
from shared_models.data.contract import load_spec
from shared_models.data.validate import ValidationReport, validate_export
from shared_models.deployment import REVOKED_NOTICE, check_flower_version, check_insecure_address
from shared_models.errors import DataContractError
from shared_models.processes import Child, DeploymentError
from shared_models.protocol import NodeConfig

logger = logging.getLogger(__name__)

#: Flower's code when the SuperLink refuses the node (e.g. its key is not registered). Flower
#: logs it as "Exit Code: 305"; the process itself exits with 1, as for every error.
EXIT_CONNECTION_REFUSED = 305
_ACTIVATED = flower_surface.ACTIVATED.text
_FLOWER_EXIT = re.compile(re.escape(flower_surface.EXIT_CODE.text) + r"(\d+)")
#: The node's default bound on a received model (40 MB of float32); edufl's models are far
#: smaller (`edufl client start --max-model-params` raises it).
DEFAULT_MAX_MODEL_PARAMS = 10_000_000
#: Seconds a node waits before asking for its next message after one (`client.node.pacing`).
DEFAULT_PULL_INTERVAL_S = 0.25


@dataclass(frozen=True)
class NodeOptions:
    """How to run one institution's SuperNode."""

    data_dir: Path
    superlink: str  # HOST:PORT of the consortium's SuperLink
    root_cert: Path | None  # consortium CA; None only with insecure
    private_key: Path | None  # KEYS/NAME; None only with insecure
    name: str
    home: Path  # FLWR_HOME of this node: the apps it unpacked
    runtime_port: int  # this node's local Runtime API port (unique per machine)
    spec: Path | None = None
    insecure: bool = False
    #: DP-SGD: this institution's own budget for a run; None takes the server's proposal, at
    #: most `privacy.budget.DEFAULT_EPSILON` / `DEFAULT_DELTA`.
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    #: True only with the explicit --no-dp: rounds the server asks without DP then train
    #: without it, and each is recorded as non-private in the signed ledger.
    no_dp: bool = False
    #: Accountant state and the institution's ledger; default HOME/privacy.
    privacy_state: Path | None = None
    #: Fork each message's ClientApp from a process that imported it once; False imports it
    #: in every message's process (as Flower's `flwr-clientapp` would), still with edufl's own
    #: code only (`client.node.own_code`).
    warm_clientapp: bool = True
    #: With ``warm_clientapp``: seconds before the SuperNode asks for the next message after
    #: one (`client.node.pacing`); None keeps Flower's fixed 3 s (``--pull-interval 0``). The
    #: SuperLink copes with paced nodes since its store runs in WAL mode and its public
    #: listener serves a bounded number of requests at once (`server.superlink.serve`).
    pull_interval: float | None = DEFAULT_PULL_INTERVAL_S
    #: The most parameters a model the server sends may have; None: no bound.
    max_model_params: int | None = DEFAULT_MAX_MODEL_PARAMS
    #: Where the ClientApp trains and evaluates (auto, cpu, cuda[:N]); None: the CPU.
    device: str | None = None
    #: Torch threads for each message's training and scoring; None: torch's own (one per core).
    threads: int | None = None


def check_export(data_dir: Path, spec: Path | None) -> ValidationReport:
    """Validate the export the node will serve; raise a user error when it is not usable.

    Only ``DATA/mapping.toml`` is considered, as the ClientApp reads the export that way.
    """
    report, _ = validate_export(data_dir, load_spec(spec))
    if not report.usable:
        problems = "\n".join(f"  {p}" for p in report.errors[:20])
        raise DataContractError(
            f"export {data_dir} is not usable ({len(report.errors)} error(s)); fix it before "
            f"starting the node (details: edufl client validate {data_dir}):\n{problems}"
        )
    return report


def check_credentials(
    root_cert: Path | None,
    private_key: Path | None,
    insecure: bool,
    superlink: str | None = None,
) -> tuple[Path | None, Path | None]:
    """Check TLS and node-key options fit together; returns them resolved.

    Also refuses a Flower other than the pinned one, and ``insecure`` towards a ``superlink``
    (``HOST:PORT``) that is not on loopback.
    """
    check_flower_version()
    if insecure and superlink is not None:
        check_insecure_address(processes.split_address(superlink)[0], "--superlink")
    if insecure:
        if root_cert is not None or private_key is not None:
            raise KeyMaterialError(
                "--insecure turns TLS off, and Flower's node authentication needs TLS: "
                "drop --root-cert and --key, or drop --insecure"
            )
        return None, None
    if root_cert is None or private_key is None:
        raise KeyMaterialError(
            "give --root-cert (the consortium's ca.pem) and --key (from `edufl client keys "
            "init`), or --insecure for a plaintext test federation"
        )
    if not root_cert.is_file():
        raise KeyMaterialError(f"{root_cert}: no such CA certificate file")
    load_node_private_key(private_key)
    return root_cert.resolve(), private_key.resolve()


def supernode_argv(options: NodeOptions) -> list[str]:
    """The `flower-supernode` command line for ``options``."""
    argv = [processes.executable("flower-supernode"), "--superlink", options.superlink]
    if options.insecure:
        argv.append("--insecure")
    else:
        assert options.root_cert is not None and options.private_key is not None
        argv += [
            "--root-certificates",
            str(options.root_cert),
            "--auth-supernode-private-key",
            str(options.private_key),
        ]
    return [
        *argv,
        "--node-config",
        node_config(options).to_flower_arg(),
        # Flower 1.41 replaced --clientappio-api-address by --host/--port; loopback only.
        "--host",
        "127.0.0.1",
        "--port",
        str(options.runtime_port),
        # The SuperNode starts no SuperExec (no `flwr-clientapp`, which would install and run
        # the server's app bundle); client.node.warm_exec takes its place.
        "--isolation",
        "process",
    ]


def node_config(options: NodeOptions) -> NodeConfig:
    """The node's config: its export, and DP-SGD as its default (see `client.app`)."""
    state = (options.privacy_state or options.home / "privacy").resolve()
    return NodeConfig(
        data_path=str(options.data_dir.resolve()),
        institution=check_name(options.name),
        spec_path=str(options.spec.resolve()) if options.spec is not None else None,
        privacy_state=str(state),
        dp="off" if options.no_dp else "required",
        dp_epsilon=float(options.dp_epsilon) if options.dp_epsilon is not None else None,
        dp_delta=float(options.dp_delta) if options.dp_delta is not None else None,
        # Ledger entries signed with the enrolled node key.
        privacy_key=str(options.private_key.resolve()) if options.private_key else None,
        max_model_params=options.max_model_params,
        # The final global model is delivered into HOME/models (`edufl client report --home`).
        home_path=str(options.home.resolve()),
        device=options.device,
        threads=options.threads,
    )


def node_argv(options: NodeOptions) -> list[str]:
    """The node's command: the SuperNode under `client.node.warm_exec` (preloading nothing
    unless ``warm_clientapp``), paced by `client.node.pacing` when ``pull_interval`` is set."""
    runtime = f"127.0.0.1:{options.runtime_port}"
    warm = [sys.executable, "-m", "client.node.warm_exec", "--runtime-api-address", runtime]
    if not options.warm_clientapp:
        warm += ["--preload", ""]
    else:  # the executor prepares the export once, before the first message
        warm += ["--node-config-json", json.dumps(node_config(options).to_node_config())]
    if options.pull_interval is None:
        return [*warm, "--", *supernode_argv(options)]
    paced = [sys.executable, "-m", "client.node.pacing"]
    paced += ["--pull-interval", repr(float(options.pull_interval))]
    return [*warm, "--", *paced, "--", *supernode_argv(options)]


def start_supernode(options: NodeOptions, *, ready_timeout: float = 60.0) -> Child:
    """Start the SuperNode and wait until its local Runtime API is up.

    The returned child leads the node's process group (the `client.node.warm_exec` process,
    the SuperNode its child): `processes.stop` stops them all, and
    one log holds the SuperNode's and the ClientApps' output.
    """
    host, _ = processes.split_address(options.superlink)
    check_flower_version()
    if options.insecure:
        check_insecure_address(host, "--superlink")
    if '"' in str(options.data_dir.resolve()) or '"' in str(options.spec or ""):
        raise DataContractError('paths given to a node must not contain a double quote (")')
    log_path = options.home / "logs" / "supernode.log"
    _private_files(options.home, log_path)
    child = processes.start(
        f"SuperNode {options.name}",
        node_argv(options),
        log_path=log_path,
        env=processes.flower_env(options.home),
        cwd=options.home,
    )
    try:
        processes.wait_until_listening(child, "127.0.0.1", options.runtime_port, ready_timeout)
    except DeploymentError:
        processes.stop(child)
        raise
    return child


def _private_files(home: Path, log_path: Path) -> None:
    """The node's home (keys' paths, unpacked apps, privacy state, logs) and log: its own only.

    The home and the log folder are made 0700 (narrowed if they exist wider), the log created
    0600 before the SuperNode writes to it.
    """
    for folder in (home, log_path.parent):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_mode & 0o077:
            folder.chmod(0o700)
    os.close(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    log_path.chmod(0o600)


def follow(child: Child, poll: float = 0.5) -> int:
    """Echo the node's log to stdout until the node exits; returns its exit code.

    Raises:
        NodeRevoked: the SuperLink refused the node's key as revoked (said in the log).
        NodeRefused: the SuperLink refused the node otherwise; the message says what to check.
    """
    activated, flower_code, revoked = False, None, None
    with open(child.log_path, encoding="utf-8", errors="replace") as log:
        log.seek(child.log_start)
        while True:
            code = child.process.poll()  # before reading, so the last lines are not lost
            for line in log:
                activated = activated or _ACTIVATED in line
                if match := _FLOWER_EXIT.search(line):
                    flower_code = int(match.group(1))
                if REVOKED_NOTICE in line:
                    revoked = line[line.index(REVOKED_NOTICE) :].strip()
                print(line, end="", flush=True)
            if code is not None:
                break
            time.sleep(poll)
    if revoked is not None and not activated:
        raise NodeRevoked(
            f"the SuperLink refused {child.name}: this institution's node key is revoked, so "
            f"retrying cannot help. The server said: {revoked}"
        )
    if flower_code == EXIT_CONNECTION_REFUSED and not activated:
        raise NodeRefused(
            f"the SuperLink refused {child.name} (Flower exit code {flower_code}); check that "
            "the consortium operator enrolled this institution's .pub key "
            "(`edufl server enrol`), that --superlink is right and the server runs"
        )
    return code


class NodeRefused(DeploymentError):
    """The SuperLink would not activate the node: its key is not enrolled (or was revoked), or
    a previous session of the same key is still marked online (a node that crashed, until the
    SuperLink misses its heartbeats: at most 2 x 30 s in Flower 1.41)."""


class NodeRevoked(DeploymentError):
    """The SuperLink refused the node's key because the consortium revoked (or replaced) it.

    Not a `NodeRefused`: `edufl client start` does not retry it.
    """
