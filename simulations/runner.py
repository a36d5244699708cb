"""Federated simulations: the real ServerApp and ClientApp logic on Flower's Ray engine.

One virtual node per institution export. Flower's simulation gives each virtual node only a
partition id in its node config, so the simulation's ClientApp maps that id to the i-th export
as the node config's data path (what ``flower-supernode --node-config`` sets in a deployment,
`shared_models.protocol.NodeConfig`) and then calls the very handlers of ``client.app``. The
ServerApp reads the federation config back from its run-config form, as the deployed one does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import client.app as node_app
from server.config import FederationConfig
from server.federation import FederationResult, check_out_dir, run_federation
from server.rounds import RoundReport
from shared_models.errors import EduflError
from shared_models.protocol import NodeConfig

logger = logging.getLogger(__name__)

#: CPUs Ray reserves per virtual node. Flower's default (2) runs one node at a time on a
#: two-core machine; 1 runs as many at once as there are cores. Fractions run more at once but
#: gain nothing on CPU-bound training, and every extra Ray worker first imports torch and
#: Opacus (seconds of CPU each): on two cores, 0.5 doubled the first round's start-up time.
DEFAULT_CPUS_PER_NODE = 1.0


class SimulationError(EduflError, RuntimeError):
    """A simulation that cannot start (no exports, bad resources)."""


def simulate(
    config: FederationConfig,
    data_paths: Sequence[Path | str],
    *,
    cpus_per_node: float = DEFAULT_CPUS_PER_NODE,
    on_round: Callable[[RoundReport], None] | None = None,
) -> FederationResult:
    """Run ``config`` on one virtual node per export in ``data_paths``.

    Args:
        config: the federation (its ``out_dir`` receives checkpoints, metrics and the summary).
        data_paths: institution export folders, one virtual node each.
        cpus_per_node: Ray CPUs reserved per virtual node (fractions run nodes concurrently).
        on_round: called after every committed round (e.g. to print progress).

    Raises:
        SimulationError: no export to simulate, or fewer than ``config.min_nodes``.
        CheckpointError: ``config.out_dir`` holds another run and ``config.resume`` is false.
        FederationError: every node failed in a round (the first error is quoted).
    """
    if not data_paths:
        raise SimulationError("no institution export given; pass --data DIR or --synthetic N")
    if cpus_per_node <= 0:
        raise SimulationError(f"cpus_per_node must be positive, got {cpus_per_node}")
    paths = tuple(str(Path(p).resolve()) for p in data_paths)
    missing = [p for p in paths if not Path(p).is_dir()]
    if missing:
        raise SimulationError(f"export folder(s) not found: {', '.join(missing)}")
    if config.min_nodes > len(paths):
        raise SimulationError(
            f"min_nodes is {config.min_nodes} but only {len(paths)} export(s) were given; "
            "the first round would wait forever"
        )
    check_out_dir(config)  # before Ray starts, not after
    outcome: list[FederationResult] = []
    run_config = config.to_run_config()
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        context.run_config.update(run_config)
        validated = FederationConfig.from_run_config(context.run_config)
        outcome.append(run_federation(grid, validated, on_round=on_round))

    backend_config = {
        "client_resources": {"num_cpus": cpus_per_node, "num_gpus": 0.0},
        "init_args": {
            "logging_level": logging.ERROR,
            "log_to_driver": False,
            "include_dashboard": False,
        },
    }
    with _quiet_engine():
        from flwr.simulation import run_simulation

        run_simulation(
            server_app=server,
            client_app=simulation_client_app(
                paths,
                privacy_root=str((Path(config.out_dir) / "privacy").resolve()),
                spec_path=str(config.spec_path.resolve()) if config.spec_path else "",
            ),
            num_supernodes=len(paths),
            backend_config=backend_config,  # type: ignore[arg-type]
        )
    if not outcome:
        raise SimulationError("the simulation ended before the federation finished")
    return outcome[0]


def simulation_client_app(
    data_paths: Sequence[str], privacy_root: str = "", spec_path: str = ""
) -> ClientApp:
    """A ClientApp that gives virtual node ``i`` the i-th export, then runs `client.app`'s.

    ``privacy_root`` holds each institution's DP state in its own folder (``ROOT/<institution>``,
    under the run directory so a resumed run keeps counting). ``spec_path``, the federation's
    spec, is every virtual node's own (a server's message cannot name a node's files).
    """
    paths = tuple(data_paths)
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        return node_app.train(msg, _with_data_path(context, paths, privacy_root, spec_path))

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return node_app.evaluate(msg, _with_data_path(context, paths, spec_path=spec_path))

    return app


def _with_data_path(
    context: Context, paths: Sequence[str], privacy_root: str = "", spec_path: str = ""
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
    return context


@contextlib.contextmanager
def _quiet_engine() -> Iterator[None]:
    """Keep Flower's and Ray's chatter off the console; always leave Ray shut down."""
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray runs its workers 15 below the driver's priority; on a shared server that let other
    # users' nice-10 jobs starve a simulation's training (docs/benchmarks.md, question 3).
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # Ray's accelerator notice
            yield
    finally:
        flwr_logger.setLevel(level)
        import ray

        if ray.is_initialized():  # Flower shuts Ray down itself unless it crashed first
            ray.shutdown()
