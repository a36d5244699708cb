"""The node runs only edufl's own ClientApp: bundles naming other code are refused."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tomli_w
from flwr.app import Array, ArrayRecord, Context, Message, Metadata, RecordDict
from flwr.cli.build import build_fab_from_disk, build_fab_from_files

from client.node import own_code
from client.node.own_code import (
    CLIENTAPP,
    BundleRefused,
    ModelTooLarge,
    check_bundle,
    check_model_size,
    own_client_app,
)
from server.superlink.launcher import CLIENTAPP as SERVERS_CLIENTAPP
from server.superlink.launcher import ServerLayout, write_app
from shared_models.protocol import MAX_MODEL_PARAMS, NodeConfig

#: The review's proof of concept: a ClientApp that reads the node's data folder.
_MALICIOUS_APP = """
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp

Path({marker!r}).write_text("ran")  # on import
app = ClientApp()

@app.train()
def train(msg, context):
    rows = Path(context.node_config["data-path"], "students.csv").read_text()
    return Message(RecordDict({{"loot": ConfigRecord({{"rows": rows}})}}), reply_to=msg)
"""


def _pyproject(clientapp: str) -> bytes:
    app = {"publisher": "edufl", "components": {"serverapp": "x:app", "clientapp": clientapp}}
    project = {"name": "edufl-federation", "version": "1.0.0", "license": "Apache-2.0"}
    return tomli_w.dumps({"project": project, "tool": {"flwr": {"app": app}}}).encode()


def _fab(clientapp: str = CLIENTAPP, **files: bytes) -> bytes:
    fab, _ = build_fab_from_files({"pyproject.toml": _pyproject(clientapp), **files})
    return fab


def honest_fab(tmp_path: Path) -> bytes:
    """The bundle `flwr run` makes of the app folder edufl's own server writes."""
    app_dir = write_app(ServerLayout(tmp_path / "state"), {"rounds": 2, "model": "lstm"})
    return build_fab_from_disk(app_dir)


def test_the_server_names_the_clientapp_the_node_runs() -> None:
    assert SERVERS_CLIENTAPP == CLIENTAPP == "client.app:app"


def test_the_bundle_edufl_s_own_server_makes_is_accepted(tmp_path: Path) -> None:
    check_bundle(honest_fab(tmp_path), run_id=7)


def test_a_bundle_naming_another_clientapp_is_refused_naming_the_run_and_the_component() -> None:
    with pytest.raises(BundleRefused, match=r"run 7: .*names the ClientApp 'evil\.app:app'"):
        check_bundle(_fab("evil.app:app"), run_id=7)


def test_a_bundle_naming_no_clientapp_is_refused() -> None:
    fab, _ = build_fab_from_files({"pyproject.toml": _pyproject(CLIENTAPP)})
    with pytest.raises(BundleRefused, match="not a Flower app bundle"):
        check_bundle(b"not a zip" + fab[:10], run_id=1)


@pytest.mark.parametrize(
    "files",
    [
        {"client/app.py": b"import os\n"},  # would shadow edufl's own client.app
        {"evil.py": b"print('pwned')\n"},
        {"notes/readme.md": b"harmless, but not ours\n"},
    ],
)
def test_a_bundle_carrying_any_file_but_its_config_is_refused(files: dict[str, bytes]) -> None:
    with pytest.raises(BundleRefused, match=rf"run 3: .*carries files \({next(iter(files))}"):
        check_bundle(_fab(CLIENTAPP, **files), run_id=3)


def _arrays(*shapes: tuple[int, ...]) -> dict[str, ArrayRecord]:
    record = ArrayRecord({f"w{i}": Array(np.zeros(s, np.float32)) for i, s in enumerate(shapes)})
    return {"arrays": record}


def test_a_model_within_the_node_s_bound_passes_and_a_larger_one_is_refused() -> None:
    check_model_size(_arrays((10, 10), (10,)), max_params=110, run_id=1)
    check_model_size(_arrays((1000, 1000)), max_params=None, run_id=1)  # no bound
    with pytest.raises(ModelTooLarge, match=rf"run 5: .*111 parameters.*{MAX_MODEL_PARAMS}"):
        check_model_size(_arrays((10, 10), (11,)), max_params=110, run_id=5)


def test_bytes_beyond_the_shapes_are_refused_too() -> None:
    arrays = _arrays((2,))
    fake = Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"\0" * 10_000_000)
    arrays["arrays"]["w0"] = fake
    with pytest.raises(ModelTooLarge, match="2 parameters"):
        check_model_size(arrays, max_params=100, run_id=1)


def test_the_own_clientapp_comes_from_this_installation() -> None:
    app = own_client_app()
    import client.app

    assert app is client.app.app
    assert "client.app:app of edufl" in own_code.describe_own_code()


def test_the_node_config_carries_the_bound() -> None:
    own = NodeConfig.parse({"data-path": "/d", MAX_MODEL_PARAMS: 1000})
    assert own.max_model_params == 1000


# --- a task with a malicious bundle, with Flower's Runtime API stubbed ------------------------


class _Client:
    def close(self) -> None:
        pass


def _task(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fab: bytes,
    node_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `own_code.run_task` on a train message with ``fab``; what reached the SuperNode."""
    import flwr.cli.install
    import flwr.supercore.exit
    import flwr.supercore.heartbeat
    import flwr.supercore.runtime
    import flwr.supernode.runtime.run_clientapp as flower
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 9), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    metadata = Metadata(
        run_id=9,
        message_id="m1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600,
        message_type="train",
    )
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(3, np.float32))})})
    message = Message(content=content, metadata=metadata)
    context = Context(
        run_id=9,
        node_id=1,
        node_config={"data-path": str(tmp_path / "data"), **(node_config or {})},
        state=RecordDict(),
        run_config={},
    )
    pushed: dict[str, Any] = {}
    handlers: list[Any] = []
    monkeypatch.setattr(
        flower, "pull_task_input", lambda _c: (message, context, SimpleNamespace(run_id=9), _F(fab))
    )
    monkeypatch.setattr(flower, "push_message", lambda _c, reply, _ctx: pushed.update(reply=reply))
    monkeypatch.setattr(
        flower, "push_task_output", lambda **kw: pushed.update(status=kw["sub_status"])
    )
    monkeypatch.setattr(
        flwr.supercore.runtime.RuntimeHttpClient, "from_server_address", lambda **_kw: _Client()
    )
    monkeypatch.setattr(
        flwr.supercore.heartbeat.HeartbeatSender, "start", lambda self: None, raising=False
    )
    monkeypatch.setattr(
        flwr.supercore.exit,
        "register_signal_handlers",
        lambda **kw: handlers.extend(kw["exit_handlers"]),
    )

    def _exit(code: int, **_kw: Any) -> None:
        for handler in handlers:
            handler()
        raise SystemExit(code)

    monkeypatch.setattr(flwr.supercore.exit, "flwr_exit", _exit)

    def _no_install(*_a: Any, **_kw: Any) -> None:
        raise AssertionError("the bundle was installed")

    monkeypatch.setattr(flwr.cli.install, "install_from_fab", _no_install)
    path_before = list(sys.path)
    with pytest.raises(SystemExit) as exit_:
        own_code.run_task("127.0.0.1:1", "token", parent_pid=None)
    assert sys.path == path_before
    pushed["code"] = exit_.value.code
    return pushed


class _F:
    def __init__(self, content: bytes) -> None:
        self.content = content


def test_a_task_with_the_review_s_malicious_bundle_runs_none_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "marker"
    code = _MALICIOUS_APP.format(marker=str(marker)).encode()
    for fab in (_fab("evil:app", **{"evil.py": code}), _fab(CLIENTAPP, **{"client/app.py": code})):
        with caplog.at_level("ERROR", logger="client.node.own_code"):
            pushed = _task(tmp_path, monkeypatch, fab)
        assert not marker.exists()
        assert pushed["code"] != 0 and pushed["status"] == "failed"
        assert pushed["reply"].has_error()
        assert "refused the app bundle" in pushed["reply"].error.reason
        assert "run 9: refused the app bundle" in caplog.text
        assert "evil" not in sys.modules


def test_a_task_asking_for_a_model_beyond_the_bound_is_refused_before_the_clientapp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    called: list[int] = []
    monkeypatch.setattr(own_code, "own_client_app", lambda: called.append(1))
    pushed = _task(tmp_path, monkeypatch, _fab(CLIENTAPP), {MAX_MODEL_PARAMS: 2})
    assert called == []
    assert "refused a model of 3 parameters" in pushed["reply"].error.reason
