"""The node's ``device`` (node config) and `client.local` on a chosen device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, MessageType, RecordDict

from client.app import app
from client.local import build_local_model, local_train
from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from privacy.noise import SecureRandom
from server.config import FederationConfig
from shared_models.data.node import prepare_node_data
from shared_models.devices import DeviceError, model_device
from shared_models.models.weights import assign_weights, named_weights
from shared_models.protocol import NodeConfigError, RoundSettings
from tests.client.test_app import (  # _one_torch_thread: test_app's autouse fixture, here too
    SPEC,
    _config,
    _global_weights,
    _message,
    _one_torch_thread,  # noqa: F401
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _node(export: Path, **config: Any) -> Context:
    node_config = {"data-path": str(export), "institution": "uni_north", **config}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _trained(export: Path, **config: Any) -> dict[str, np.ndarray]:
    fed = _config()
    reply = app(_message(MessageType.TRAIN, fed, _global_weights(fed)), _node(export, **config))
    assert not reply.has_error()
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def test_a_node_on_the_cpu_sends_the_update_of_a_node_without_a_device(export_copy: Path) -> None:
    default = _trained(export_copy)
    on_cpu = _trained(export_copy, device="cpu")
    assert default.keys() == on_cpu.keys()
    for name, value in default.items():
        np.testing.assert_array_equal(on_cpu[name], value, err_msg=name)


@without_cuda
def test_a_node_set_to_cuda_without_a_gpu_declines_naming_its_config_key(
    export_copy: Path,
) -> None:
    fed = _config()
    msg = _message(MessageType.TRAIN, fed, _global_weights(fed))
    with pytest.raises(DeviceError, match=r"^device=cuda: no CUDA device is visible to torch"):
        app(msg, _node(export_copy, device="cuda"))


def test_a_misspelt_node_device_is_a_node_config_error(export_copy: Path) -> None:
    fed = _config()
    msg = _message(MessageType.TRAIN, fed, _global_weights(fed))
    with pytest.raises(NodeConfigError, match=r"device='tpu': not a device; use auto, cpu"):
        app(msg, _node(export_copy, device="tpu"))


def _local_dp_round(
    export: Path, state_dir: Path, device: str | None, fed: FederationConfig | None = None
) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    fed = fed or _config()
    settings = RoundSettings.from_config(fed.train_config(SPEC.fingerprint) | {"server-round": 1})
    node = prepare_node_data(export, SPEC, seed=settings.seed, institution="uni_north")
    weights = _global_weights(fed)
    model = build_local_model(settings, node.shapes, device)
    assign_weights(model, weights)
    plan = DPPlan.for_training(len(node.train), settings.batch_size, settings.local_epochs, 2)
    budget = PrivacyBudget(epsilon=4.0, delta=1e-4)
    session = DPSession.open(state_dir, budget, plan, institution="uni_north")
    local_train(
        model,
        node.train,
        settings,
        weights,
        privatize=lambda m, o, loader: session.make_private(
            m, o, loader, student_ids=node.train.student_ids
        ),
    )
    session.spend_round("run-1", 1, "7")
    return model, named_weights(model)


def test_local_dp_training_on_the_cpu_equals_training_without_a_device(
    export_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same ChaCha20 key for both rounds: the same students sampled, the same noise.
    monkeypatch.setattr("privacy.dp.SecureRandom", lambda: SecureRandom(bytes(32)))
    _, default = _local_dp_round(export_copy, tmp_path / "default", None)
    model, on_cpu = _local_dp_round(export_copy, tmp_path / "cpu", "cpu")
    assert model_device(model) == torch.device("cpu")
    for name, value in default.items():
        np.testing.assert_array_equal(on_cpu[name], value, err_msg=name)


@needs_cuda
def test_local_dp_training_on_cuda_sends_cpu_weights_close_to_the_cpu_round(
    export_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same key: the same students sampled and the same noise. Dropout is off: CUDA's generator
    # draws other masks than the CPU's from the same seed, and other masks alone move this round
    # by about 10 % (first run on an H200: 11.9 %; on the CPU with a second generator: 10.4 %).
    # What is left is float32 summation order (one DP step: 2.7e-6 relative, bench_gpu), which
    # Adam can turn into a learning-rate step for a near-zero gradient, so the round's update is
    # compared as a whole: the GPU's within 1 % of the CPU's, in norm. A device path that
    # sampled, clipped or noised differently would be off by tens of percent.
    monkeypatch.setattr("privacy.dp.SecureRandom", lambda: SecureRandom(bytes(32)))
    fed = _config(model_overrides={"hidden_size": 8, "dropout": 0.0})
    start = _global_weights(fed)
    _, on_cpu = _local_dp_round(export_copy, tmp_path / "cpu", "cpu", fed)
    model, on_gpu = _local_dp_round(export_copy, tmp_path / "gpu", "cuda", fed)
    assert model_device(model).type == "cuda"
    assert all(isinstance(v, np.ndarray) for v in on_gpu.values())
    assert on_gpu.keys() == on_cpu.keys()
    moved = np.sqrt(sum(np.sum((on_cpu[k] - start[k]) ** 2) for k in on_cpu))
    apart = np.sqrt(sum(np.sum((on_gpu[k] - on_cpu[k]) ** 2) for k in on_cpu))
    assert moved > 0
    assert apart / moved < 1e-2, f"GPU update {apart / moved:.2%} off the CPU's"


@needs_cuda
def test_a_node_on_cuda_replies_with_plain_arrays(export_copy: Path) -> None:
    weights = _trained(export_copy, device="cuda")
    assert all(isinstance(v, np.ndarray) for v in weights.values())
