"""``--device`` on every command that trains or scores: one clear line when it cannot be had."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from simulations.cli import app

runner = CliRunner()
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def _invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args), prog_name="edufl")
    return result.exit_code, result.stdout, result.stderr


def _commands(export: Path, out: Path) -> dict[str, list[str]]:
    data = str(export)
    return {
        "train": ["train", data, "--out", str(out / "train"), "--epochs", "1"],
        "simulate run": [
            "simulate", "run", "--data", data, "--rounds", "1", "--out", str(out / "sim"),
        ],
        "reproduce": [
            "reproduce", "at-risk-lstm", "--quick", "--modes", "centralized",
            "--out", str(out / "rep"),
        ],
        "client start": [
            "client", "start", "--data", data, "--superlink", "127.0.0.1:9", "--insecure",
            "--home", str(out / "home"),
        ],
        "client score": ["client", "score", "--data", data, "--db", str(out / "db.sqlite")],
        "client report": ["client", "report", "--data", data, "--out", str(out / "report")],
    }  # fmt: skip


COMMANDS = ("train", "simulate run", "reproduce", "client start", "client score", "client report")


@without_cuda
@pytest.mark.parametrize("command", COMMANDS)
def test_device_cuda_without_a_gpu_fails_with_one_line_naming_the_fix(
    command: str, export_copy: Path, tmp_path: Path
) -> None:
    args = _commands(export_copy, tmp_path)[command]
    code, out, err = _invoke(*args, "--device", "cuda")
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: --device cuda: no CUDA device is visible to torch ")
    assert lines[0].endswith("use --device cpu or auto")
    assert "Traceback" not in out + err
    assert not (tmp_path / "train" / "model.pt").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_misspelt_device_fails_with_one_line_listing_the_choices(
    command: str, export_copy: Path, tmp_path: Path
) -> None:
    args = _commands(export_copy, tmp_path)[command]
    code, out, err = _invoke(*args, "--device", "cuda:x")
    assert code == 2, out + err
    assert err.strip() == (
        "error: --device 'cuda:x': not a device; use auto, cpu, cuda or cuda:N (N = 0, 1, ...: "
        "the CUDA device's index)"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_training_and_scoring_command_documents_the_device_option(command: str) -> None:
    code, out, _ = _invoke(*command.split(), "--help")
    assert code == 0
    assert "--device" in out and "auto" in out


def test_train_on_the_cpu_writes_the_same_model_file_as_train_without_device(
    export_copy: Path, tmp_path: Path
) -> None:
    common = ["train", str(export_copy), "--epochs", "2", "--batch-size", "32"]
    code, out, err = _invoke(*common, "--out", str(tmp_path / "a" / "run"), "--device", "cpu")
    assert code == 0, out + err
    code, out, err = _invoke(*common, "--out", str(tmp_path / "b" / "run"))
    assert code == 0, out + err
    if torch.cuda.is_available():
        pytest.skip("without --device this machine trains on its GPU")
    a = (tmp_path / "a" / "run" / "model.pt").read_bytes()
    b = (tmp_path / "b" / "run" / "model.pt").read_bytes()
    assert a == b
