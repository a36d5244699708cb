"""Every Flower-internal name and text the node's adapters use, in one list.

The modules of this package import these names where they use them (a task imports only what
it runs); this list is what ``tests/test_flower_pin.py`` checks against the installed Flower,
and every ``from flwr... import`` here must appear in it. A Flower release that renames one of
them, or rewords a log line edufl reads, fails that test, not a node. The texts and the names
edufl replaces are taken from here by the code that uses them.
"""

from __future__ import annotations

from shared_models.deployment import FlowerName, FlowerText

_LOOP = "flwr.supernode.start_client_internal"
_RUN_CLIENTAPP = "flwr.supernode.runtime.run_clientapp"

#: Logged once the SuperLink has let the node in (`launcher.follow`, `warm_exec`).
ACTIVATED = FlowerText(_LOOP, "SuperNode ID:")
#: Logged once the SuperNode holds all of a message's objects (`warm_exec`'s hint).
RECEIVED = FlowerText(_LOOP, "Received successfully")
#: Opens Flower's exit message, followed by the code (`launcher.follow`).
EXIT_CODE = FlowerText("flwr.supercore.exit.exit", "Exit Code: ")
#: A refused activation is shown with the refusal's public note, where the SuperLink puts
#: `shared_models.deployment.REVOKED_NOTICE` for a revoked key.
REFUSAL_NOTE = FlowerText(
    "flwr.supernode.fleet_http_connection", 'message += f"\\n{flower_error.public_details}"'
)
#: The SuperNode loop's fixed sleeps that `pacing` shortens (idle pull, reply check).
IDLE_SLEEP = FlowerText(_LOOP, "time.sleep(3)")
REPLY_CHECK_SLEEP = FlowerText(_LOOP, "time.sleep(0.5)")
#: The SuperNode loop's functions `pacing` wraps, and the object puller `object_pulls` speeds up.
PULL = FlowerName(
    _LOOP,
    "_pull_and_store_message",
    (
        "state",
        "object_store",
        "node_config",
        "receive",
        "get_run",
        "get_fab",
        "pull_object",
        "confirm_message_received",
        "trusted_entities",
    ),
)
PUSH = FlowerName(_LOOP, "_push_messages", ("state", "object_store", "send", "push_object"))
LOOP_TIME = FlowerName(_LOOP, "time")
PULL_OBJECTS = FlowerName(
    _LOOP, "pull_objects", ("object_ids", "pull_object_fn", "initial_backoff")
)
#: The task's own pull of its message from the SuperNode, which `object_pulls` speeds up too.
TASK_PULL = FlowerName(
    _RUN_CLIENTAPP,
    "pull_and_inflate_object_from_tree",
    (
        "object_tree",
        "pull_object_fn",
        "confirm_object_received_fn",
        "initial_backoff",
        "backoff_cap",
        "max_tries_per_object",
    ),
)
#: The SuperNode's wait for a heartbeat's answer, which `heartbeats` lengthens: read for each
#: call by the Fleet HTTP client, and by the heartbeat sender to space its heartbeats.
_FLEET_CLIENT = "flwr.supernode.fleet_http_client"
_HEARTBEAT = "flwr.supercore.heartbeat"
HEARTBEAT_CALL_TIMEOUT = FlowerName(_FLEET_CLIENT, "HEARTBEAT_CALL_TIMEOUT")
HEARTBEAT_CALL = FlowerText(_FLEET_CLIENT, "timeout=HEARTBEAT_CALL_TIMEOUT,")
HEARTBEAT_SPACING = FlowerText(
    _HEARTBEAT, "next_interval: float = HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT"
)

NAMES: tuple[FlowerName, ...] = (
    PULL,
    HEARTBEAT_CALL_TIMEOUT,
    FlowerName(_HEARTBEAT, "HEARTBEAT_CALL_TIMEOUT"),
    PUSH,
    LOOP_TIME,
    PULL_OBJECTS,
    TASK_PULL,
    FlowerName("flwr.supernode.cli", "flower_supernode", ()),
    # log_times: timestamps on Flower's console lines (EDUFL_NODE_LOG_TIMES=1).
    FlowerName("flwr.supercore.logger", "update_console_handler", ("timestamps",)),
    # warm_exec: asks the node's Runtime API for tasks as Flower's SuperExec would.
    FlowerName(_RUN_CLIENTAPP),
    FlowerName("flwr.proto.runtime_pb2", "AcquireTaskRequest", ("supported_task_types",)),
    FlowerName("flwr.supercore.constant", "TaskType.CLIENT_APP"),
    FlowerName("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", ("component_name",)),
    FlowerName("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor", ("token",)),
    FlowerName(
        "flwr.supercore.runtime",
        "RuntimeHttpClient.from_server_address",
        ("server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"),
    ),
    FlowerName("flwr.supercore.runtime", "RuntimeHttpClient.AcquireTask", ("request",)),
    # own_code: `flwr-clientapp`'s task, without installing or importing the bundle.
    FlowerName("flwr.common.constant", "ErrorCode.LOAD_CLIENT_APP_EXCEPTION"),
    FlowerName("flwr.common.constant", "ErrorCode.CLIENT_APP_RAISED_EXCEPTION"),
    FlowerName("flwr.common.constant", "SubStatus.COMPLETED"),
    FlowerName("flwr.common.constant", "SubStatus.FAILED"),
    FlowerName("flwr.supercore.app_utils", "start_parent_process_monitor", ("parent_pid",)),
    FlowerName("flwr.supercore.exit", "ExitCode.SUCCESS"),
    FlowerName("flwr.supercore.exit", "ExitCode.TASK_PROC_EXCEPTION"),
    FlowerName("flwr.supercore.exit", "ExitCode.CLIENTAPP_COMMUNICATION_ERROR"),
    FlowerName("flwr.supercore.exit", "flwr_exit", ("code", "event_type")),
    FlowerName(
        "flwr.supercore.exit",
        "register_signal_handlers",
        ("event_type", "exit_message", "exit_handlers"),
    ),
    FlowerName("flwr.supercore.heartbeat", "HeartbeatSender", ("heartbeat_fn",)),
    FlowerName("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http", ("client",)),
    FlowerName("flwr.supercore.retry", "make_simple_http_retry_invoker", ()),
    FlowerName("flwr.supercore.telemetry", "EventType.FLWR_CLIENTAPP_RUN_LEAVE"),
    FlowerName(_RUN_CLIENTAPP, "pull_task_input", ("client",)),
    FlowerName(_RUN_CLIENTAPP, "push_message", ("client", "message", "context")),
    FlowerName(_RUN_CLIENTAPP, "push_task_output", ("client", "context", "sub_status", "details")),
)

TEXTS: tuple[FlowerText, ...] = (
    ACTIVATED,
    RECEIVED,
    EXIT_CODE,
    REFUSAL_NOTE,
    IDLE_SLEEP,
    REPLY_CHECK_SLEEP,
    HEARTBEAT_CALL,
    HEARTBEAT_SPACING,
)
