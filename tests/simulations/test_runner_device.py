"""A simulation's ``--device``: what each virtual node is told and the GPU share it reserves."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from flwr.app import Context, RecordDict

from server.config import FederationConfig
from shared_models.devices import DeviceError
from simulations.runner import SimulationError, _placement, _with_data_path, simulate


def _ray_with_gpus(monkeypatch: pytest.MonkeyPatch, gpus: float) -> None:
    resources = {"CPU": 2.0} | ({"GPU": gpus} if gpus else {})
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)


def test_cpu_nodes_reserve_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _ray_with_gpus(monkeypatch, 2)
    assert _placement("cpu", None, 4, None) == ("cpu", 0.0)


def test_auto_without_a_gpu_in_ray_trains_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _ray_with_gpus(monkeypatch, 0)
    assert _placement("auto", None, 4, None) == ("cpu", 0.0)


def test_cuda_without_a_gpu_in_the_cluster_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    _ray_with_gpus(monkeypatch, 0)
    with pytest.raises(DeviceError, match=r"the Ray cluster at 10\.0\.0\.1:6379 has no GPU"):
        _placement("cuda", None, 4, "10.0.0.1:6379")


@pytest.mark.parametrize(
    ("gpus", "nodes", "asked", "share"),
    [
        (1, 3, None, 0.3333),  # one GPU shared by three nodes
        (1, 1, None, 1.0),
        (4, 2, None, 1.0),  # at most one GPU each
        (2, 8, None, 0.25),
        (1, 3, 0.5, 0.5),  # asked for: two nodes at a time on one GPU
    ],
)
def test_each_cuda_node_reserves_its_share_of_the_gpus_ray_sees(
    monkeypatch: pytest.MonkeyPatch, gpus: float, nodes: int, asked: float | None, share: float
) -> None:
    _ray_with_gpus(monkeypatch, gpus)
    assert _placement("cuda", asked, nodes, None) == ("cuda", share)
    assert _placement("auto", asked, nodes, None) == ("cuda", share)


def test_a_gpu_share_above_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _ray_with_gpus(monkeypatch, 1)
    with pytest.raises(SimulationError, match=r"gpus_per_node must be in \(0, 1\]"):
        _placement("cuda", 2.0, 2, None)


def _context(**config: str | int) -> Context:
    node_config = {"partition-id": 1, "num-partitions": 2, **config}
    return Context(run_id=1, node_id=3, node_config=node_config, state=RecordDict(), run_config={})


def test_each_virtual_node_is_told_the_simulation_device() -> None:
    context = _with_data_path(_context(), ["/a", "/b"], device="cpu")
    assert context.node_config["data-path"] == "/b"
    assert context.node_config["device"] == "cpu"


def test_a_node_config_device_is_not_overridden() -> None:
    context = _with_data_path(_context(device="cuda"), ["/a", "/b"], device="cpu")
    assert context.node_config["device"] == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_simulate_with_cuda_and_no_gpu_fails_before_ray_starts(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    config = FederationConfig(out_dir=tmp_path / "run", min_nodes=1)
    with pytest.raises(DeviceError, match="--device cuda: no CUDA device is visible"):
        simulate(config, [tmp_path / "a"], device="cuda")
    assert not ray.is_initialized()
