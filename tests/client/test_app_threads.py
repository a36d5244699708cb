"""The node's ``threads`` (node config, ``edufl client start --threads``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import MessageType
from typer.testing import CliRunner

from client.app import app
from client.node import launcher
from client.node.launcher import NodeOptions
from shared_models.protocol import NodeConfigError
from simulations.cli import app as cli
from tests.client.test_app import (  # _one_torch_thread: test_app's autouse fixture, here too
    _config,
    _global_weights,
    _message,
    _one_torch_thread,  # noqa: F401
)
from tests.client.test_app_device import _node, _trained


def test_a_node_trains_with_its_configured_threads_and_sends_the_same_update(
    export_copy: Path,
) -> None:
    one = _trained(export_copy)
    assert torch.get_num_threads() == 1  # the fixture's: unset, the node leaves torch alone
    two = _trained(export_copy, threads=2)  # as Flower's --node-config parses threads=2
    assert torch.get_num_threads() == 2
    assert one.keys() == two.keys()
    for name, value in one.items():  # an LSTM this small: one or two threads, the same sums
        np.testing.assert_allclose(two[name], value, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("value", [0, -1, "two", 1.5])
def test_threads_other_than_a_positive_count_is_a_node_config_error(
    export_copy: Path, value: Any
) -> None:
    fed = _config()
    msg = _message(MessageType.TRAIN, fed, _global_weights(fed))
    with pytest.raises(NodeConfigError, match=rf"threads={value!r}: "):
        app(msg, _node(export_copy, threads=value))
    assert torch.get_num_threads() == 1


def test_client_start_passes_threads_to_the_node_and_refuses_zero(
    export_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[NodeOptions] = []

    def start(options: NodeOptions, **_: Any) -> Any:
        started.append(options)
        raise KeyboardInterrupt  # stands for Ctrl-C before any process: nothing to follow

    monkeypatch.setattr(launcher, "start_supernode", start)
    argv = ["client", "start", "--data", str(export_copy), "--superlink", "127.0.0.1:9",
            "--insecure", "--home", str(tmp_path / "home")]  # fmt: skip
    result = CliRunner().invoke(cli, [*argv, "--threads", "1"], prog_name="edufl")
    assert [o.threads for o in started] == [1], result.output

    refused = CliRunner().invoke(cli, [*argv, "--threads", "0"], prog_name="edufl")
    assert refused.exit_code == 2
    assert "--threads" in refused.output
    assert len(started) == 1  # refused before any node process
