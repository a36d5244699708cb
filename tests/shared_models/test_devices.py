"""Device specs (`shared_models.devices`) and training/scoring on the device they name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared_models.devices import (
    DEVICE_CHOICES,
    DeviceError,
    describe_device,
    model_device,
    parse_device,
    resolve_device,
)
from shared_models.errors import EduflError, PublicError
from shared_models.evaluation import forward_all, predict
from shared_models.models.registry import build_model
from shared_models.models.weights import load_tensors, named_weights, save_weights
from shared_models.training import FitConfig, fit, set_seed
from tests.shared_models.conftest import synthetic_inputs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("auto", "auto"),
        ("cpu", "cpu"),
        ("cuda", "cuda"),
        ("cuda:0", "cuda:0"),
        (" CUDA:2 ", "cuda:2"),
        ("cuda:007", "cuda:7"),
        ("CPU", "cpu"),
    ],
)
def test_device_specs_are_read_in_their_canonical_spelling(spec: str, canonical: str) -> None:
    assert parse_device(spec) == canonical


MISSPELT = ["tpu", "gpu", "cuda:x", "cuda:", "cuda:-1", "cuda:1.5", "", "mps"]


@pytest.mark.parametrize("spec", MISSPELT)
def test_a_misspelt_device_is_refused_naming_the_option_and_the_choices(spec: str) -> None:
    with pytest.raises(DeviceError) as caught:
        parse_device(spec)
    message = str(caught.value)
    assert message.startswith(f"--device {spec!r}: not a device")
    assert DEVICE_CHOICES in message
    assert "\n" not in message


def test_a_node_config_key_is_named_as_a_key_not_a_flag() -> None:
    with pytest.raises(DeviceError, match=r"^device='tpu': not a device"):
        resolve_device("tpu", option="device")


def test_a_device_error_is_a_public_user_error() -> None:
    # The CLI turns EduflError into one line; a node may send a PublicError's text.
    assert issubclass(DeviceError, EduflError)
    assert issubclass(DeviceError, PublicError)
    assert issubclass(DeviceError, ValueError)


def test_parsing_a_spec_does_not_import_torch() -> None:
    code = (
        "import sys, shared_models.devices as d, shared_models.protocol as p\n"
        "assert d.parse_device('cuda:1') == 'cuda:1'\n"
        "assert p.NodeConfig.parse({'device': 'auto'}).device == 'auto'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)


def test_cpu_resolves_to_the_cpu_and_auto_to_cuda_only_when_torch_sees_one() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert describe_device(torch.device("cpu")) == "cpu"


@without_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_visible_gpu_fails_with_one_line_saying_how_to_fix_it(spec: str) -> None:
    with pytest.raises(DeviceError) as caught:
        resolve_device(spec)
    message = str(caught.value)
    assert message.startswith(f"--device {spec}: no CUDA device is visible to torch ")
    assert torch.__version__ in message
    assert message.endswith("use --device cpu or auto")
    if torch.version.cuda is None:
        assert "(this is a CPU build)" in message
    assert "\n" not in message


def test_a_cuda_build_without_a_device_points_at_the_driver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(DeviceError, match=r"CUDA 12\.4 build: check the NVIDIA driver and CUDA"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_a_cuda_index_beyond_the_visible_devices_lists_the_ones_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(DeviceError, match=r"cuda:2: torch sees 2 CUDA device\(s\), cuda:0 to"):
        resolve_device("cuda:2")


def test_fit_config_refuses_a_misspelt_device_when_built() -> None:
    with pytest.raises(ValueError, match="not a device"):
        FitConfig(device="cuda:x")
    assert FitConfig(device="CUDA").device == "cuda"


def test_model_device_is_where_the_parameters_are() -> None:
    model = build_model("lstm", 6, 4, 3, {"hidden_size": 8})
    assert model_device(model) == torch.device("cpu")
    assert model_device(torch.nn.Sequential()) == torch.device("cpu")


def _fitted(device: str | None, tmp_path: Path) -> tuple[dict[str, np.ndarray], bytes]:
    inputs = synthetic_inputs(n=48, seed=2)
    set_seed(5)
    model = build_model("lstm", 6, 4, 3, {"hidden_size": 8})
    fit(model, inputs, None, "risk", FitConfig(max_epochs=2, batch_size=16, seed=5, device=device))
    path = save_weights(model, tmp_path / str(device) / "model.pt")  # torch's zip names the file
    return named_weights(model), path.read_bytes()


def test_fit_on_cpu_gives_the_same_weights_and_file_bytes_as_without_a_device(
    tmp_path: Path,
) -> None:
    default, default_bytes = _fitted(None, tmp_path)
    on_cpu, cpu_bytes = _fitted("cpu", tmp_path)
    assert default.keys() == on_cpu.keys()
    for name in default:
        np.testing.assert_array_equal(default[name], on_cpu[name], err_msg=name)
    assert default_bytes == cpu_bytes


# -- on a GPU (skipped without one) ------------------------------------------------------------


@needs_cuda
def test_fit_on_cuda_trains_there_and_saves_cpu_tensors(tmp_path: Path) -> None:
    inputs = synthetic_inputs(n=48, seed=2)
    set_seed(5)
    model = build_model("lstm", 6, 4, 3, {"hidden_size": 8})
    fit(model, inputs, None, "risk", FitConfig(max_epochs=2, batch_size=16, device="cuda"))
    assert model_device(model).type == "cuda"
    path = save_weights(model, tmp_path / "model.pt")
    tensors = load_tensors(path)  # refuses anything but plain CPU tensors
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert all(isinstance(v, np.ndarray) for v in named_weights(model).values())
    outputs = forward_all(model, inputs)
    assert all(v.device.type == "cpu" for v in outputs.values())


@needs_cuda
def test_predictions_on_cuda_match_the_cpu_ones() -> None:
    inputs = synthetic_inputs(n=64, seed=3)
    set_seed(1)
    model = build_model("lstm", 6, 4, 3, {"hidden_size": 8})
    on_cpu = predict(model, inputs)["risk"]
    on_gpu = predict(model.to("cuda"), inputs)["risk"]
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3)
