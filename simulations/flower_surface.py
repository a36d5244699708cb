"""Every Flower-internal name and text `simulations.ray_session` and `simulations.inline_grid`
rely on, in one list.

The shared Ray session (one Ray start for many simulations) replaces Flower 1.41's Ray backend
class for the length of a simulation and lends it a pool of already started actors. Those are
Flower internals, outside its public ``flwr.simulation`` API: ``tests/test_flower_pin.py``
checks every name and text below against the installed Flower, so a Flower release that moves
one fails that test, not a reproduction halfway through.
"""

from __future__ import annotations

from shared_models.deployment import FlowerName, FlowerText

_BACKEND = "flwr.server.superlink.fleet.vce.backend.raybackend"
_ACTORS = "flwr.simulation.ray_transport.ray_actor"

NAMES: tuple[FlowerName, ...] = (
    # The class Flower's simulation engine instantiates; replaced while a session runs.
    FlowerName(_BACKEND),
    FlowerName(_BACKEND, "RayBackend"),
    FlowerName(_BACKEND, "RayBackend.build", ("app_fn",)),
    FlowerName(_BACKEND, "RayBackend.terminate", ()),
    FlowerName(_BACKEND, "RayBackend.num_workers"),
    FlowerName(_ACTORS, "BasicActorPool", ("actor_type", "client_resources", "actor_kwargs")),
    FlowerName(_ACTORS, "BasicActorPool.add_actors_to_pool", ("num_actors",)),
    FlowerName(_ACTORS, "ClientAppActor"),
    # The inline engine (simulations/inline_grid.py): the run, the process identity a
    # ServerApp's messages take (set as `run_simulation` sets it) and a failed node's error code.
    FlowerName("flwr.supercore.run", "Run"),
    FlowerName("flwr.supercore.run", "Run.create_empty", ("run_id",)),
    FlowerName("flwr.supercore.task_identity", "TaskIdentity"),
    FlowerName("flwr.supercore.task_identity", "TaskIdentity._task_id"),
    FlowerName("flwr.supercore.task_identity", "TaskIdentity._run_id"),
    FlowerName("flwr.supercore.task_identity", "TaskIdentity._node_id"),
    FlowerName("flwr.common.constant", "SUPERLINK_NODE_ID"),
    FlowerName("flwr.common.constant", "ErrorCode.CLIENT_APP_RAISED_EXCEPTION"),
)

#: Instance attributes the session's backend reads or sets, as Flower's code assigns them.
TEXTS: tuple[FlowerText, ...] = (
    FlowerText(_BACKEND, "self.client_resources = "),
    FlowerText(_BACKEND, "self.actor_kwargs = "),
    FlowerText(_BACKEND, "self.pool: BasicActorPool | None = None"),
    FlowerText(_BACKEND, "self.app_fn: Callable[[], ClientApp] | None = None"),
    FlowerText(_ACTORS, "self.pool: list[VirtualClientEngineActor] = []"),
    FlowerText(_ACTORS, "self.num_actors = 0"),
    FlowerText(_ACTORS, "self.actors_capacity = pool_size_from_resources(client_resources)"),
    FlowerText(_ACTORS, "self._future_to_actor: dict[Any, VirtualClientEngineActor] = {}"),
)
