"""Federated simulations: the real ServerApp and ClientApp logic on Flower's Ray engine.

One virtual node per institution export. Flower's simulation gives each virtual node only a
partition id in its node config, so the simulation's ClientApp maps that id to the i-th export
as the node config's data path (what ``flower-supernode --node-config`` sets in a deployment,
`shared_models.protocol.NodeConfig`) and then calls the very handlers of ``client.app``. The
ServerApp reads the federation config back from its run-config form, as the deployed one does.

Engines: ``ray`` (the default) runs the nodes on Flower's Ray engine; ``inline`` runs the very
same ServerApp and ClientApp in this process, one node after another (`simulations.inline_grid`),
without Ray's start-up, worker imports and shutdown: for a few institutions on one machine.

Ray: inside `ray_session()` (`simulations.ray_session`) every simulation shares one Ray instance
and one pool of warm workers; a lone `simulate()` opens a session of its own and closes it at the
end. ``ray_address`` (or ``RAY_ADDRESS``) joins an existing cluster instead of starting Ray: every
node then reads the exports and writes the run's DP state itself, so every path must be absolute
and on storage all nodes mount at the same place (checked on each node before round one).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import client.app as node_app
from server.config import FederationConfig
from server.federation import FederationResult, check_out_dir, run_federation
from server.rounds import RoundReport
from shared_models.devices import DeviceError, parse_device, resolve_device
from shared_models.errors import EduflError
from shared_models.protocol import DEVICE, NodeConfig
from simulations.ray_session import (
    RayClusterError,
    check_paths_on_nodes,
    current_session,
    ray_session,
    session_backend,
)

__all__ = [
    "DEFAULT_CPUS_PER_NODE",
    "ENGINES",
    "RayClusterError",
    "SimulationError",
    "ray_session",
    "simulate",
    "simulation_client_app",
]

logger = logging.getLogger(__name__)

#: CPUs Ray reserves per virtual node. Flower's default (2) runs one node at a time on a
#: two-core machine; 1 runs as many at once as there are cores. Fractions run more at once but
#: gain nothing on CPU-bound training, and every extra Ray worker first imports torch and
#: Opacus (seconds of CPU each): on two cores, 0.5 doubled the first round's start-up time.
DEFAULT_CPUS_PER_NODE = 1.0

#: ``ray``: Flower's Ray engine; ``inline``: every node in this process (`InlineGrid`).
ENGINES = ("ray", "inline")


class SimulationError(EduflError, RuntimeError):
    """A simulation that cannot start (no exports, bad resources)."""


def simulate(
    config: FederationConfig,
    data_paths: Sequence[Path | str],
    *,
    cpus_per_node: float = DEFAULT_CPUS_PER_NODE,
    on_round: Callable[[RoundReport], None] | None = None,
    ray_address: str | None = None,
    device: str = "cpu",
    gpus_per_node: float | None = None,
    engine: str = "ray",
) -> FederationResult:
    """Run ``config`` on one virtual node per export in ``data_paths``.

    Args:
        config: the federation (its ``out_dir`` receives checkpoints, metrics and the summary).
        data_paths: institution export folders, one virtual node each.
        cpus_per_node: Ray CPUs reserved per virtual node (fractions run nodes concurrently).
        on_round: called after every committed round (e.g. to print progress).
        ray_address: a Ray cluster to join (``HOST:PORT``, ``auto``); None: ``RAY_ADDRESS``,
            else the open `ray_session()`'s Ray, else a local Ray for this simulation only.
        device: where every virtual node trains: ``auto``, ``cpu`` or ``cuda``
            (`shared_models.devices`); see `_placement`.
        gpus_per_node: Ray GPUs each virtual node reserves on CUDA; None shares the GPUs Ray
            sees among all nodes (at most one each).
        engine: ``ray``, or ``inline`` to run every node in this process, one after another
            (no Ray: ``cpus_per_node`` is unused; ``ray_address`` and ``gpus_per_node`` are
            refused; on ``cuda`` the nodes take turns on this machine's GPU).

    Raises:
        DeviceError: ``cuda`` without a GPU (here, or in the cluster).
        SimulationError: no export to simulate, or fewer than ``config.min_nodes``; on a
            cluster, a relative path; an unknown engine, or a Ray option with ``inline``.
        RayClusterError: the cluster cannot be joined, or a node does not see the files.
        CheckpointError: ``config.out_dir`` holds another run and ``config.resume`` is false.
        FederationError: every node failed in a round (the first error is quoted).
    """
    if not data_paths:
        raise SimulationError("no institution export given; pass --data DIR or --synthetic N")
    if cpus_per_node <= 0:
        raise SimulationError(f"cpus_per_node must be positive, got {cpus_per_node}")
    if engine not in ENGINES:
        raise SimulationError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "inline":
        return _simulate_inline(config, data_paths, on_round, ray_address, device, gpus_per_node)
    outer = current_session()
    if outer is not None and ray_address and ray_address != outer.address:
        raise SimulationError(
            f"ray_address {ray_address!r} differs from the open Ray session's "
            f"({outer.address or 'a local Ray'}); open the session with that address instead"
        )
    address = outer.address if outer is not None else ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        _require_absolute(address, config, data_paths)
    paths = _checked_paths(config, data_paths)
    wanted = parse_device(device)
    if not address and resolve_device(wanted).type == "cpu":  # here: fail before Ray starts
        wanted = "cpu"
    check_out_dir(config)  # before Ray starts, not after
    with ray_session(address or None) as session:
        session.ensure_ray()
        placement = _placement(wanted, gpus_per_node, len(paths), address or None)
        if session.joined:
            Path(config.out_dir).mkdir(parents=True, exist_ok=True)  # the DP state goes below
            spec = [str(config.spec_path)] if config.spec_path else []
            check_paths_on_nodes([*paths, str(config.out_dir), *spec])
        with _quiet_engine(), session_backend(session):
            return _run(config, paths, cpus_per_node, on_round, placement)


def _checked_paths(config: FederationConfig, data_paths: Sequence[Path | str]) -> tuple[str, ...]:
    paths = tuple(str(Path(p).resolve()) for p in data_paths)
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise SimulationError(f"export folder(s) not found: {', '.join(missing)}")
    if config.min_nodes > len(paths):
        raise SimulationError(
            f"min_nodes is {config.min_nodes} but only {len(paths)} export(s) were given; "
            "the first round would wait forever"
        )
    return paths


def _simulate_inline(
    config: FederationConfig,
    data_paths: Sequence[Path | str],
    on_round: Callable[[RoundReport], None] | None,
    ray_address: str | None,
    device: str,
    gpus_per_node: float | None,
) -> FederationResult:
    """`simulate` with ``engine="inline"``: the same apps, every node in this process."""
    from simulations.inline_grid import InlineGrid, new_run, server_identity

    if ray_address:
        raise SimulationError(
            f"the inline engine runs every node in this process and cannot join the Ray "
            f"cluster {ray_address}; use engine ray (--engine ray) for a cluster, or drop "
            "--ray-address / unset RAY_ADDRESS"
        )
    if gpus_per_node is not None:
        raise SimulationError(
            "gpus_per_node is a Ray reservation; the inline engine's nodes take turns on the "
            "whole GPU: drop --gpus-per-node, or use --engine ray"
        )
    paths = _checked_paths(config, data_paths)
    node_device = str(resolve_device(parse_device(device)))  # fails here without a GPU
    check_out_dir(config)
    outcome: list[FederationResult] = []
    server = _server_app(config, outcome, on_round)
    run = new_run()
    grid = InlineGrid(_client_app(config, paths, node_device), len(paths), run)
    context = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={}
    )
    with _quiet_engine(), server_identity(run):
        server(grid=grid, context=context)
    if not outcome:
        raise SimulationError("the simulation ended before the federation finished")
    return outcome[0]


def _server_app(
    config: FederationConfig,
    outcome: list[FederationResult],
    on_round: Callable[[RoundReport], None] | None,
) -> ServerApp:
    """The simulation's ServerApp: ``config`` through its run-config form, as deployed."""
    run_config = config.to_run_config()
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        context.run_config.update(run_config)
        validated = FederationConfig.from_run_config(context.run_config)
        outcome.append(run_federation(grid, validated, on_round=on_round))

    return server


def _client_app(config: FederationConfig, paths: tuple[str, ...], node_device: str) -> ClientApp:
    spec_path = str(config.spec_path.resolve()) if config.spec_path else ""
    return simulation_client_app(
        paths,
        privacy_root=str((Path(config.out_dir) / "privacy").resolve()),
        spec_path=spec_path,
        files_digest=_files_digest([*paths, spec_path]),
        device=node_device,
    )


def _run(
    config: FederationConfig,
    paths: tuple[str, ...],
    cpus_per_node: float,
    on_round: Callable[[RoundReport], None] | None,
    placement: tuple[str, float] = ("cpu", 0.0),
) -> FederationResult:
    node_device, gpus = placement
    outcome: list[FederationResult] = []
    server = _server_app(config, outcome, on_round)
    # No "init_args": Ray is already up (`RaySession.ensure_ray` starts it with its settings).
    backend_config = {"client_resources": {"num_cpus": cpus_per_node, "num_gpus": gpus}}
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server,
        client_app=_client_app(config, paths, node_device),
        num_supernodes=len(paths),
        backend_config=backend_config,  # type: ignore[arg-type]
    )
    if not outcome:
        raise SimulationError("the simulation ended before the federation finished")
    return outcome[0]


def simulation_client_app(
    data_paths: Sequence[str],
    privacy_root: str = "",
    spec_path: str = "",
    files_digest: dict[str, str] | None = None,
    device: str = "",
) -> ClientApp:
    """A ClientApp that gives virtual node ``i`` the i-th export, then runs `client.app`'s.

    ``privacy_root`` holds each institution's DP state in its own folder (``ROOT/<institution>``,
    under the run directory so a resumed run keeps counting). ``spec_path``, the federation's
    spec, is every virtual node's own (a server's message cannot name a node's files).
    ``files_digest`` (path -> digest of its files' names, sizes and times): a worker kept warm
    from an earlier simulation forgets what it prepared from a path whose files changed since.
    ``device`` (``cpu``, ``cuda``) becomes each node's ``device`` unless its config sets one.
    """
    paths = tuple(data_paths)
    digest = dict(files_digest or {})
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        _forget_changed_files(digest)
        return node_app.train(msg, _with_data_path(context, paths, privacy_root, spec_path, device))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        _forget_changed_files(digest)
        return node_app.evaluate(
            msg, _with_data_path(context, paths, spec_path=spec_path, device=device)
        )

    return app


#: In a worker process: the digest of each path's files when it last served a simulation.
_seen_files: dict[str, str] = {}


def _forget_changed_files(digest: dict[str, str]) -> None:
    changed = [p for p, d in digest.items() if _seen_files.get(p, d) != d]
    _seen_files.update(digest)
    if changed:
        logger.info("files changed since the last simulation, cache cleared: %s", changed)
        node_app.clear_caches()


def _files_digest(paths: Sequence[str]) -> dict[str, str]:
    """Path -> digest of the names, sizes and modification times of the files under it."""
    out = {}
    for path in filter(None, paths):
        root = Path(path)
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        h = hashlib.sha256()
        for f in files:
            with contextlib.suppress(OSError):
                st = f.stat()
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        out[path] = h.hexdigest()
    return out


def _require_absolute(
    address: str, config: FederationConfig, data_paths: Sequence[Path | str]
) -> None:
    """On a cluster every node opens the paths itself: a relative one means nothing there."""
    given = [("export", str(p)) for p in data_paths] + [("--out", str(config.out_dir))]
    if config.spec_path:
        given.append(("--spec", str(config.spec_path)))
    relative = [f"{what} {p!r}" for what, p in given if not Path(p).is_absolute()]
    if relative:
        raise SimulationError(
            f"on the Ray cluster {address} every node reads the exports and writes the run's "
            f"DP state itself, so paths must be absolute; relative: {', '.join(relative)}. Give "
            "absolute paths on storage every node mounts at the same place (e.g. /shared/...)"
        )


def _with_data_path(
    context: Context,
    paths: Sequence[str],
    privacy_root: str = "",
    spec_path: str = "",
    device: str = "",
) -> Context:
    own = NodeConfig.parse(context.node_config)
    if own.partition_id is None:
        raise SimulationError("a virtual node has no partition id in its node config")
    update = {"data_path": paths[own.partition_id]}
    if privacy_root and own.privacy_root is None:
        update["privacy_root"] = privacy_root
    if spec_path and own.spec_path is None:
        update["spec_path"] = spec_path
    context.node_config.update(own.model_copy(update=update).to_node_config())
    if device and own.device is None:
        context.node_config[DEVICE] = device
    return context


def _placement(
    wanted: str, gpus_per_node: float | None, nodes: int, cluster: str | None
) -> tuple[str, float]:
    """The device of every virtual node and the Ray GPUs each reserves (0 on the CPU).

    ``wanted``: ``cpu``, ``cuda`` (or ``cuda:N``) or ``auto``, already resolved on this machine
    unless the nodes run on a ``cluster``; Ray counts the GPUs they can have. On CUDA Ray sets
    each node's ``CUDA_VISIBLE_DEVICES`` to the GPU it granted, so the node's device is ``cuda``
    and an index in ``cuda:N`` chooses nothing (``CUDA_VISIBLE_DEVICES`` on the driver does).
    """
    if wanted == "cpu":
        return "cpu", 0.0
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0.0))
    if gpus == 0:
        if wanted == "auto":
            return "cpu", 0.0
        where = f"the Ray cluster at {cluster}" if cluster else "Ray on this machine"
        raise DeviceError(
            f"--device {wanted}: {where} has no GPU to give the virtual nodes; use --device "
            "cpu or auto"
        )
    if wanted.startswith("cuda:"):
        logger.warning(
            "--device %s: Ray chooses each virtual node's GPU; the index is unused", wanted
        )
    share = gpus_per_node if gpus_per_node is not None else min(1.0, gpus / nodes)
    share = math.floor(share * 10_000) / 10_000  # Ray's resource granularity
    if not 0 < share <= 1:
        raise SimulationError(f"gpus_per_node must be in (0, 1], got {gpus_per_node}")
    return "cuda", share


@contextlib.contextmanager
def _quiet_engine() -> Iterator[None]:
    """Keep Flower's and Ray's chatter off the console (Ray itself: `ray_session`)."""
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Ray's accelerator notice
            yield
    finally:
        flwr_logger.setLevel(level)
