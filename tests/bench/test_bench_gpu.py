"""bench/bench_gpu.py: runs without a GPU, and stays out of ``python -m bench`` unless named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import bench_gpu, run_all
from bench.bench_dp import students
from shared_models.evaluation import input_tensors


def test_the_gpu_benchmark_runs_only_when_named() -> None:
    assert "gpu" not in run_all.scripts(None, set())
    assert run_all.scripts({"gpu"}, set()) == ["gpu"]
    assert run_all.scripts({"gpu", "dp"}, {"dp"}) == ["gpu"]


def test_a_dp_step_of_the_numerical_check_is_deterministic_under_one_key() -> None:
    reference = bench_gpu._model("lstm", dropout=0.0)
    batch = input_tensors(students(16, seed=1))
    first = bench_gpu.dp_step(reference, batch, torch.device("cpu"))
    second = bench_gpu.dp_step(reference, batch, torch.device("cpu"))
    assert set(first) == {"per_student", "clipped_sum", "noise", "weights"}
    # privacy.noise draws the noise of all parameters at once: one value per weight in all.
    drawn = sum(draw.numel() for draw in first["noise"].values())
    assert drawn == sum(w.numel() for w in first["weights"].values())
    for what, tensors in first.items():
        for name, value in tensors.items():
            torch.testing.assert_close(second[what][name], value, rtol=0, atol=0)
    moved = max(
        float((first["weights"][n] - p.detach()).abs().max())
        for n, p in reference.named_parameters()
    )
    assert moved > 0, "the step changed no weight"


@pytest.mark.slow
def test_the_benchmark_without_a_gpu_times_the_cpu_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench_gpu.json"
    args = ["--sizes", "64", "--batch", "32", "--reps", "1", "--cpu-only", "--json", str(out)]
    assert bench_gpu.main(args) == 0
    captured = capsys.readouterr()
    assert "--cpu-only; timing the CPU only" in captured.err
    data = json.loads(out.read_text())
    assert data["config"]["gpu"] is False
    measures = [row["measure"] for row in data["summary"]]
    assert measures == ["lstm, 64 students: CPU plain epoch", "lstm, 64 students: CPU dp epoch"]
    assert all(row["stats"]["median"] > 0 for row in data["summary"])


@pytest.mark.parametrize("name", ["multitask", "cnn-lstm", "gru", "lstm-gru"])
def test_the_numerical_check_takes_a_dp_step_of_every_recurrent_model(name: str) -> None:
    # The first run on an H200 stopped at multitask: its step left out the engagement head's
    # targets, which train_one_epoch passes (bench_gpu.dp_step now passes them too).
    reference = bench_gpu._model(name, dropout=0.0)
    step = bench_gpu.dp_step(reference, input_tensors(students(16, seed=1)), torch.device("cpu"))
    assert step["weights"].keys() == dict(reference.named_parameters()).keys()
    assert all(v.shape[0] == 16 for v in step["per_student"].values())
