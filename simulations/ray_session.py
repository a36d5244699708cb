"""One Ray session for many simulations: Ray started (or a cluster joined) once, workers kept warm.

Flower 1.41's Ray backend (``flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend``)
calls ``ray.init`` only when Ray is not running yet, but builds a new pool of ``ClientAppActor``
workers for every simulation and, at its end, terminates them and calls ``ray.shutdown()``. So
every federated job paid for Ray's start (about 11 processes), for each worker's import of
torch, Opacus and Flower, and for the shutdown: 12-20 s on a quiet two-core machine
(docs/benchmarks.md, "federation overhead"), dozens of times in a reproduction.

Inside `ray_session()` the backend Flower builds is `_SessionBackend` instead: it takes its
actors from the session (creating them the first time), hands them back when the simulation ends
and leaves Ray running. An actor runs whatever ClientApp function each message carries, so one
pool serves any number of simulations. The session ends Ray only if it started it: a cluster it
joined (``address`` or ``RAY_ADDRESS``) keeps running; ``ray.shutdown()`` then only disconnects
this driver, and the session's actors (owned by this driver) go with it.

Everything here touches Flower's and Ray's internals; `simulations.runner` is the only user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared_models.errors import EduflError

logger = logging.getLogger(__name__)

#: Seconds to wait for every node of a joined cluster to report which paths it sees.
PATH_CHECK_TIMEOUT_S = 120.0


class RayClusterError(EduflError, RuntimeError):
    """A Ray cluster that cannot run the simulation (unreachable, or its nodes lack the files)."""


@dataclass
class RaySession:
    """Ray for a series of simulations, started on first use.

    Attributes:
        address: the cluster to join; None starts a local Ray instance on first use.
        started: this session called ``ray.init`` (and so disconnects or shuts down at the end).
        joined: Ray runs on a cluster this session did not start (``address`` was given).
        simulations: simulations run so far in this session.
    """

    address: str | None = None
    started: bool = False
    joined: bool = False
    simulations: int = 0
    _actors: dict[tuple[tuple[str, float], ...], list[Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ensure_ray(self) -> None:
        """Start Ray (or join the cluster) unless it already runs in this process."""
        import ray

        if ray.is_initialized():
            return
        self._actors.clear()  # handles from a Ray instance that is gone
        _quiet_ray_environment()
        pythonpath = os.pathsep.join(p for p in sys.path if p)
        if os.environ.get("PYTHONPATH"):
            pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
        init_args: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.ERROR,
            "log_to_driver": False,
            # Workers import the project as this driver does (Flower's backend does the same).
            "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}},
        }
        if self.address:
            init_args["address"] = self.address
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # Ray's accelerator notice
                ray.init(**init_args)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            if not self.address:
                raise
            raise RayClusterError(
                f"cannot join the Ray cluster at {self.address!r} ({exc}); check the address "
                "(`ray status` on the head node prints it) and that this machine reaches its port"
            ) from exc
        self.started = True
        self.joined = bool(self.address)
        alive = [n for n in ray.nodes() if n.get("Alive")]
        logger.info(
            "Ray %s: %d node(s), %s CPUs",
            f"cluster {self.address}" if self.joined else "started locally",
            len(alive),
            sum(n.get("Resources", {}).get("CPU", 0) for n in alive),
        )

    def take(self, resources: dict[str, float]) -> list[Any]:
        """The idle actors kept for ``resources`` (none the first time)."""
        key = _key(resources)
        for other in [k for k in self._actors if k != key]:
            # Flower sizes a pool by the cluster's total resources, not the free ones: actors
            # of another shape would hold CPUs the new pool counts on, and it would wait forever.
            _kill(self._actors.pop(other))
        return self._actors.pop(key, [])

    def give_back(self, resources: dict[str, float], actors: list[Any]) -> None:
        """Keep ``actors`` (idle) for the next simulation asking for ``resources``."""
        self._actors.setdefault(_key(resources), []).extend(actors)

    @property
    def actors(self) -> list[Any]:
        """The idle actors kept, of any shape."""
        return [a for group in self._actors.values() for a in group]

    def close(self) -> None:
        """Kill the kept actors; shut Ray down, or only disconnect from a joined cluster."""
        import ray

        for group in self._actors.values():
            _kill(group)
        self._actors.clear()
        if self.started and ray.is_initialized():
            ray.shutdown()  # on a joined cluster: disconnects this driver, the cluster stays
        self.started = False


_current: RaySession | None = None


def current_session() -> RaySession | None:
    """The session `ray_session()` opened in this process, if any."""
    return _current


@contextlib.contextmanager
def ray_session(address: str | None = None) -> Iterator[RaySession]:
    """Run every `simulations.runner.simulate` inside the block on one Ray session.

    Ray starts (or the cluster at ``address`` is joined) at the first simulation, not on entry,
    so a block that ends up running none costs nothing. Nested blocks share the outer session.

    Args:
        address: a Ray cluster (``HOST:PORT``, ``auto``, ``ray://HOST:PORT``); None reads
            ``RAY_ADDRESS`` as Ray does, and without it starts a local Ray instance.
    """
    global _current
    if _current is not None:
        yield _current
        return
    session = RaySession(address=address or os.environ.get("RAY_ADDRESS") or None)
    _current = session
    try:
        yield session
    finally:
        _current = None
        session.close()


@contextlib.contextmanager
def session_backend(session: RaySession) -> Iterator[None]:
    """Make Flower's simulation build `_SessionBackend` (on ``session``) while the block runs."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    with session._lock:  # one simulation at a time per session: they share one actor pool
        raybackend.RayBackend = _session_backend_class(original, session)  # type: ignore[misc]
        try:
            yield
        finally:
            raybackend.RayBackend = original  # type: ignore[misc]
            session.simulations += 1


def _session_backend_class(base: type, session: RaySession) -> type:
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

    class _SessionBackend(base):  # type: ignore[misc,valid-type]
        """Flower's Ray backend, with its actors borrowed from ``session`` and Ray left up."""

        def build(self, app_fn: Any) -> None:
            self.pool = BasicActorPool(ClientAppActor, self.client_resources, self.actor_kwargs)
            kept = session.take(self.client_resources)
            _kill(kept[self.pool.actors_capacity :])  # the cluster lost a node since
            kept = kept[: self.pool.actors_capacity]
            self.pool.pool.extend(kept)
            self.pool.num_actors = len(kept)
            # A node may have joined the cluster since: fill the pool up to what fits now.
            self.pool.add_actors_to_pool(self.pool.actors_capacity - len(kept))
            self.app_fn = app_fn
            logger.debug("simulation pool: %d kept, %d new actors", len(kept), self.num_workers)

        def terminate(self) -> None:
            if self.pool is None:
                return
            # Actors still busy belong to a simulation that failed mid-round: not reusable.
            busy = list(self.pool._future_to_actor.values())
            _kill(busy)
            session.give_back(self.client_resources, [a for a in self.pool.pool if a not in busy])
            self.pool = None

    return _SessionBackend


def check_paths_on_nodes(paths: Sequence[str]) -> None:
    """Fail unless every alive node of the cluster sees every path in ``paths``.

    Each node runs a tiny task (no CPU reserved) that tests the paths on its own file system, so a
    missing shared mount fails here with the node named, not halfway through round one.

    Raises:
        RayClusterError: a node lacks a path, or did not answer within `PATH_CHECK_TIMEOUT_S`.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_missing_paths)
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    pending = {
        n["NodeManagerAddress"]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(list(paths))
        for n in nodes
    }
    try:
        found = ray.get(list(pending.values()), timeout=PATH_CHECK_TIMEOUT_S)
        answers = dict(zip(pending, found, strict=True))
    except ray.exceptions.GetTimeoutError as exc:
        raise RayClusterError(
            f"the cluster's nodes did not report within {PATH_CHECK_TIMEOUT_S:.0f} s whether they "
            "see the exports; check that every node can start workers (`ray status`)"
        ) from exc
    lacking = {node: missing for node, missing in answers.items() if missing}
    if lacking:
        where = "; ".join(f"node {node} lacks {', '.join(m)}" for node, m in lacking.items())
        raise RayClusterError(
            f"{where}. Every Ray node reads the exports and writes the run's DP state itself: put "
            "them on storage every node mounts at the same absolute path (e.g. NFS)"
        )


def _missing_paths(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def _quiet_ray_environment() -> None:
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray runs its workers 15 below the driver's priority; on a shared server that let other
    # users' nice-10 jobs starve a simulation's training (docs/benchmarks.md, question 3).
    os.environ.setdefault("RAY_worker_niceness", "0")


def _key(resources: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((k, float(v)) for k, v in resources.items()))


def _kill(actors: list[Any]) -> None:
    import ray

    for actor in actors:
        with contextlib.suppress(Exception):  # already dead, or Ray is going down
            ray.kill(actor)
