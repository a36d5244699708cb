"""Every Flower-internal name and text the server's adapters use, in one list.

The modules of this package import these names where they use them (so that ``--help`` imports
no Flower); this list is what ``tests/test_flower_pin.py`` checks against the installed Flower,
and every ``from flwr... import`` here must appear in it. A Flower release that renames one of
them fails that test, not a deployment. The texts are taken from here by the code that looks
for them.
"""

from __future__ import annotations

from shared_models.deployment import FlowerName, FlowerText

#: `server.superlink.control` registers keys again at each start: Flower's refusal of a known key.
ALREADY_REGISTERED = FlowerText(
    "flwr.superlink.servicer.control.control_handlers", "Public key already in use"
)
#: Flower's Fleet route and code for a node it would not activate (key unknown or in use),
#: and where a refusal's public JSON carries its ``extra`` (shown by the SuperNode).
ACTIVATE_NODE_PATH = FlowerText("flwr.supernode.fleet_http_client", "/v1/fleet/activate-node")
#: The SuperNode's heartbeat route: the public listener serves it in a lane of its own (serve.py).
NODE_HEARTBEAT_PATH = FlowerText(
    "flwr.supernode.fleet_http_client", "/v1/fleet/send-node-heartbeat"
)
ERROR_EXTRA = FlowerText("flwr.supercore.error.base", 'payload["extra"] = self.public_details')
#: The request header carrying the node's public key, base64 (node authentication).
PUBLIC_KEY_HEADER = FlowerName("flwr.supercore.constant", "FLEET_HTTP_PUBLIC_KEY_HEADER")
ACTIVATION_FAILED = FlowerName("flwr.supercore.error", "ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED")
#: retry.py: the ServerApp's connection to a SuperLink, polled by edufl itself. Its module is
#: imported by name, only once such a grid exists.
HTTP_GRID = FlowerName("flwr.superlink.grid.http_grid", "HttpGrid")

NAMES: tuple[FlowerName, ...] = (
    # serve.py: Flower's SuperLink app, configured as `flower-superlink` would configure it.
    FlowerName("flwr.superlink.main", "create_app", ("config", "superlink_lifespan_class")),
    FlowerName(
        "flwr.superlink.cli.flower_superlink", "SuperLinkLifespan", ("config", "state_factory")
    ),
    FlowerName(
        "flwr.superlink.config_loader",
        "SuperLinkLifespanConfig",
        (
            "control_address",
            "health_server_address",
            "host",
            "port",
            "insecure",
            "certificates",
            "superexec_auth_secret",
            "authn_plugin",
            "event_log_plugin",
            "fleet_event_log_plugin",
            "enable_event_log",
            "artifact_provider",
            "enable_supernode_auth",
            "fleet_api_type",
            "fleet_api_address",
            "simulation",
            "ssl_ca_certfile",
            "ssl_certfile",
            "ssl_keyfile",
            "database",
            "isolation",
            "runtime_dependency_install",
        ),
    ),
    FlowerName("flwr.superlink.config_loader", "load_control_authn_plugin", ()),
    FlowerName("flwr.supercore.auth", "load_superexec_auth_secret", ("secret_file",)),
    FlowerName("flwr.common.constant", "ISOLATION_MODE_PROCESS"),
    FlowerName("flwr.common.constant", "TRANSPORT_TYPE_GRPC_RERE"),
    FlowerName("flwr.supercore.http_logging", "get_uvicorn_log_config", ("log_level",)),
    FlowerName("flwr.supercore.logger", "console_handler"),
    # serve.py: the pragmas Flower applies to each new SQLite connection (busy timeout raised).
    FlowerName("flwr.supercore.sql_mixin", "SQLITE_PRAGMAS"),
    # serve.py: how many task heartbeats Flower's core state lets the ServerApp miss.
    FlowerName("flwr.supercore.corestate.sql_corestate", "HEARTBEAT_PATIENCE"),
    PUBLIC_KEY_HEADER,
    ACTIVATION_FAILED,
    HTTP_GRID,
    FlowerName("flwr.superlink.grid.http_grid", "HttpGrid.push_messages", ("messages",)),
    FlowerName("flwr.superlink.grid.http_grid", "HttpGrid.pull_messages", ("message_ids",)),
    # retry.py: the grid's object puller, asked to retry sooner (its keyword arguments).
    FlowerName(
        "flwr.superlink.grid.http_grid",
        "pull_objects",
        ("object_ids", "pull_object_fn", "initial_backoff", "backoff_cap"),
    ),
    FlowerName("flwr.common.constant", "ErrorCode.MESSAGE_UNAVAILABLE"),
    FlowerName("flwr.common.constant", "ErrorCode.REPLY_MESSAGE_UNAVAILABLE"),
    # retry.py: a reply whose packed weights are corrupt becomes this error.
    FlowerName("flwr.common.constant", "ErrorCode.UNKNOWN"),
)

#: serve.py replaces the module global this loop reads on every new connection.
SQLITE_PRAGMA_LOOP = FlowerText("flwr.supercore.sql_mixin", "for pragma, value in SQLITE_PRAGMAS:")

#: ... and the expiry of a task's claim that serve.py's patience lengthens.
TASK_EXPIRY = FlowerText(
    "flwr.supercore.corestate.sql_corestate",
    "seconds=HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL",
)

TEXTS: tuple[FlowerText, ...] = (
    TASK_EXPIRY,
    ALREADY_REGISTERED,
    ACTIVATE_NODE_PATH,
    NODE_HEARTBEAT_PATH,
    ERROR_EXTRA,
    SQLITE_PRAGMA_LOOP,
)
