"""Run one ClientApp task with edufl's own code only: never the code of the app bundle.

Flower 1.41's ``flwr-clientapp`` (``flwr.supernode.runtime.run_clientapp``) installs the app
bundle (FAB) the server sends under FLWR_HOME/apps, puts that folder on ``sys.path`` and imports
the ClientApp its ``pyproject.toml`` names (``[tool.flwr.app.components] clientapp``): whoever
controls the server runs code at every node. `run_task` takes its place in the task process: it
pulls the task from the SuperNode's local Runtime API as Flower does, then

- refuses a bundle that names another ClientApp than `CLIENTAPP` or carries any file besides
  its ``pyproject.toml`` (`check_bundle`; the bundle is read in memory, never unpacked or
  installed, and none of it is put on ``sys.path``);
- refuses a message whose weights exceed the node's own bound (`check_model_size`, from the
  node config's ``max-model-params``) before anything is built from them;
- runs `CLIENTAPP` imported from this node's installed edufl (`own_client_app`), on the
  message with its weights unpacked, and packs the reply's weights into one array
  (`client.node.packing`: fewer objects for Flower to move); a corrupt packed
  array is refused like a bundle.

A refused task is answered with an error reply, as a ClientApp that raised, and logged with the
run and what the bundle named.
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

from shared_models.errors import EduflError
from shared_models.protocol import MAX_MODEL_PARAMS, NodeConfig, PackedArraysError

logger = logging.getLogger(__name__)

#: The only ClientApp a node runs, from its own installed edufl.
CLIENTAPP = "client.app:app"
#: What a bundle may hold: its ``pyproject.toml`` and Flower's manifest and signatures.
_CONFIG_FILE = "pyproject.toml"
_FLOWER_META = ".info/"
#: Bytes a serialized parameter may take (float64) and a numpy header per array.
_BYTES_PER_PARAM = 8
_ARRAY_OVERHEAD = 4096


class BundleRefused(EduflError):
    """The server sent an app bundle this node does not run."""


class ModelTooLarge(EduflError):
    """The server sent weights larger than this node's bound."""


def check_bundle(fab: bytes, run_id: int | str) -> None:
    """Accept only a bundle that names `CLIENTAPP` and carries no file but its config.

    Raises:
        BundleRefused: the message names the run, what the bundle named or carried, and why.
    """
    refuse = f"run {run_id}: refused the app bundle the server sent"
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            names = bundle.namelist()
            config = tomllib.loads(bundle.read(_CONFIG_FILE).decode("utf-8"))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BundleRefused(f"{refuse}: it is not a Flower app bundle ({exc})") from None
    component = _clientapp_component(config)
    if component != CLIENTAPP:
        raise BundleRefused(
            f"{refuse}: it names the ClientApp {component!r}; this node runs only edufl's own "
            f"{CLIENTAPP!r}. Nothing of the bundle was run; ask the consortium operator, who "
            "may have been compromised"
        )
    extra = sorted(n for n in names if n != _CONFIG_FILE and not n.startswith(_FLOWER_META))
    if extra:
        shown = ", ".join(extra[:10]) + (f" and {len(extra) - 10} more" if len(extra) > 10 else "")
        raise BundleRefused(
            f"{refuse}: it carries files ({shown}) besides its {_CONFIG_FILE}; this node runs "
            f"only edufl's own {CLIENTAPP!r} and no code sent by the server. Nothing of the "
            "bundle was run; ask the consortium operator, who may have been compromised"
        )


def _clientapp_component(config: dict[str, Any]) -> str:
    try:
        component = config["tool"]["flwr"]["app"]["components"]["clientapp"]
    except (KeyError, TypeError):
        return "(none)"
    return component if isinstance(component, str) else repr(component)


def model_size(array_records: dict[str, Any]) -> tuple[int, int]:
    """Parameters and serialized bytes of a message's ArrayRecords (name -> ArrayRecord)."""
    params = size = 0
    for record in array_records.values():
        for array in record.values():
            params += math.prod(int(d) for d in array.shape)
            size += len(array.data)
    return params, size


def check_model_size(array_records: dict[str, Any], max_params: int | None, run_id: Any) -> None:
    """Refuse weights beyond ``max_params`` parameters (or their bytes); None: no bound.

    Raises:
        ModelTooLarge: the message names the run, the size sent and the node's bound.
    """
    if max_params is None:
        return
    params, size = model_size(array_records)
    arrays = sum(len(record) for record in array_records.values())
    max_bytes = max_params * _BYTES_PER_PARAM + arrays * _ARRAY_OVERHEAD
    if params > max_params or size > max_bytes:
        raise ModelTooLarge(
            f"run {run_id}: refused a model of {params:,} parameters ({size:,} bytes); this "
            f"node's bound is {max_params:,} parameters ({MAX_MODEL_PARAMS!r} in its node "
            "config, `edufl client start --max-model-params`)"
        )


def own_client_app() -> Any:
    """`CLIENTAPP`, imported from the edufl this module belongs to (never from elsewhere).

    Raises:
        BundleRefused: ``client.app`` resolves outside this installation (e.g. a folder on
            ``sys.path`` that shadows it).
    """
    from flwr.clientapp import ClientApp

    module_name, _, attribute = CLIENTAPP.partition(":")
    module = importlib.import_module(module_name)
    home = Path(__file__).resolve().parents[1]  # this installation's `client` package
    where = Path(getattr(module, "__file__", "") or "").resolve()
    if home not in where.parents:
        raise BundleRefused(
            f"{module_name} was imported from {where}, not from this node's edufl ({home}); "
            "remove what shadows it from the Python path"
        )
    app = getattr(module, attribute)
    if not isinstance(app, ClientApp):
        raise BundleRefused(f"{CLIENTAPP} is not a ClientApp")
    return app


def own_version() -> str:
    """The installed edufl's version, which the node reports in its log."""
    try:
        return metadata.version("edufl")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def describe_own_code() -> str:
    """One log line: which ClientApp this node runs, of which edufl, from where."""
    home = Path(__file__).resolve().parents[1]
    return (
        f"this node runs only {CLIENTAPP} of edufl {own_version()} ({home}); app bundles "
        "naming other code are refused"
    )


def run_task(address: str, token: str, parent_pid: int | None) -> None:
    """Run one ClientApp task as ``flwr-clientapp`` would, with only edufl's own code.

    Mirrors ``flwr.supernode.runtime.run_clientapp`` (Flower 1.41) without its
    ``install_from_fab`` and ``load_app``: the reply and the task's final status reach the
    SuperNode as they would from Flower's. Ends with ``sys.exit`` (via Flower's ``flwr_exit``).
    """
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.telemetry import EventType
    from flwr.supernode.runtime import run_clientapp
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    from client.node import object_pulls
    from client.node.packing import pack_records, unpack_records

    # The SuperNode may still be pulling the message's objects: ask for them again soon.
    object_pulls.install_task(run_clientapp)
    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # the Runtime API listens on the node's own loopback only
        root_certificates=None,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry_invoker,
    )
    heartbeat = None
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    exit_code = ExitCode.SUCCESS

    def on_exit() -> None:
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        if heartbeat is not None and heartbeat.is_running:
            heartbeat.stop()
        client.close()

    register_signal_handlers(
        event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE,
        exit_message="Task stopped.",
        exit_handlers=[on_exit],
    )
    try:
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        check_bundle(fab.content, run.run_id)
        if message.has_content():  # the weights travel packed (`client.node.packing`)
            message.content = unpack_records(message.content)
        own = NodeConfig.parse(context.node_config)
        check_model_size(dict(message.content.array_records), own.max_model_params, run.run_id)
        reply = own_client_app()(message=message, context=context)
        sub_status, details = SubStatus.COMPLETED, ""
    except (BundleRefused, ModelTooLarge, PackedArraysError) as exc:
        logger.error("%s", exc)
        sub_status, details = SubStatus.FAILED, str(exc)
        if message is not None:
            error = Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=str(exc))
            reply = Message(error, reply_to=message)
        exit_code = ExitCode.TASK_PROC_EXCEPTION
    except Exception as exc:  # as Flower's: the error goes back as the reply
        logger.exception("ClientApp raised an exception")
        reason = f"{type(exc)}:<'{exc}'>"
        sub_status, details = SubStatus.FAILED, reason
        if message is not None:
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reply = Message(Error(code=code, reason=reason), reply_to=message)
        exit_code = ExitCode.TASK_PROC_EXCEPTION
    finally:
        if reply is not None and context is not None:
            try:
                if reply.has_content():
                    reply.content = pack_records(reply.content)
                push_message(client, reply, context)
            except Exception:
                logger.exception("failed to push the reply to the SuperNode")
                exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)
