"""CPU vs GPU: time per epoch, plain and with DP-SGD, and a DP step on the GPU against the CPU.

Variants, for each model and number of students (synthetic, the default contract's shapes):

- ``plain``: edufl's training without DP (the model as `build_model` makes it, Opacus'
  ``DPLSTM``/``DPGRU`` layers, Adam, batches of ``--batch``), `train_one_epoch`;
- ``dp``: `privacy.DPSession` as a node runs it: students Poisson-sampled and the noise drawn
  on the CPU from ChaCha20 (`privacy.noise`), per-student gradients fused (`privacy.fused_rnn`),
  clipped and noised by Opacus; on the GPU the noise is copied to the device.

Each on ``cpu`` (``--threads`` torch threads, default torch's own) and ``cuda``. A figure is
the wall time of one epoch (the GPU synchronised before the clock stops), the median of
``--reps`` epochs run interleaved with the other variants of that size, after a warm-up of a few
batches each (CUDA context, cuDNN plans, allocator). Sizes above ``--cpu-reps-above`` run one
CPU epoch each (about 10 s per LSTM epoch at 100,000 students, batch 64, on 16 cores).

The numerical check (``--check-students`` students, one batch) builds the model once with
dropout off, copies it to both devices, and on each: per-student gradients (fused, Opacus'
``grad_sample``), then one ``DPOptimizer`` step with noise from ChaCha20 under the same key.
Compared, as max |GPU - CPU| over max |CPU|: the per-student gradients, their clipped sum before
noise (``summed_grad``), the noise tensors the optimizer received (expected identical: drawn on
the CPU, then copied), and the weights after the step. TF32 is off for the check, so float32
agreement (a few 1e-7 relative, summed over the batch) is expected.

Without a CUDA device the script says so and times the CPU only (``--cpu-only`` does that on
purpose). It is not part of ``python -m bench`` (`bench.run_all.OPT_IN`): it needs a GPU to
answer its question.

    python -m bench.bench_gpu                               # 1,000 / 10,000 / 100,000 students
    python -m bench.bench_gpu --sizes 1000,10000 --reps 5 --batch 256
    python -m bench.bench_gpu --quick                       # 1,000 students, 2 epochs
"""

from __future__ import annotations

import copy
import itertools
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from bench.bench_dp import students
from bench.common import MIB, Report, Row, Stats, interleave, log, markdown, parser
from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from privacy.fused_rnn import fuse_recurrent_layers
from privacy.noise import SecureRandom, install_secure_noise
from shared_models.data.cohort import ModelInputs
from shared_models.data.contract import default_spec
from shared_models.devices import describe_device
from shared_models.evaluation import input_tensors
from shared_models.models.registry import build_model
from shared_models.models.weights import unwrap
from shared_models.training import (
    backward_batch,
    make_loader,
    make_optimizer,
    set_seed,
    train_one_epoch,
)

VARIANTS = ("plain", "dp")
WARMUP_BATCHES = 5
#: The check's tolerance: largest difference over the largest value (float32, TF32 off).
AGREE = 1e-4
KEY = bytes(range(32))

Epoch = Callable[[], None]


def _task(model: nn.Module) -> str:
    heads = [h for h in unwrap(model).output_names if h != "engagement"]  # type: ignore[operator]
    return heads[0] if len(heads) == 1 else "multitask"


def _model(name: str, **overrides: Any) -> nn.Module:
    set_seed(0)
    spec = default_spec()
    return build_model(
        name, spec.weeks, len(spec.dynamic_names), len(spec.static_names), overrides or None
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_epoch(
    name: str,
    variant: str,
    device: torch.device,
    inputs: ModelInputs,
    batch: int,
    epochs: int,
    work: Path,
) -> tuple[Epoch, Epoch]:
    """(one epoch, a warm-up of a few batches) of ``variant`` on ``device``.

    ``epochs``: how many the DP plan allows (its step guard counts the warm-up's steps too).
    """
    model = _model(name).to(device)
    task = _task(model)
    loader: Any = make_loader(inputs, batch, shuffle=True)
    optimizer: Any = make_optimizer(model)
    if variant == "dp":
        plan = DPPlan.for_training(len(inputs.at_risk), batch, epochs, 1)
        session = DPSession.open(
            work / f"{name}-{variant}-{device.type}-{len(inputs.at_risk)}",
            PrivacyBudget(epsilon=8.0, delta=0.1 / len(inputs.at_risk)),
            plan,
            institution="bench",
        )
        model, optimizer, loader = session.make_private(model, optimizer, loader)

    def epoch() -> None:
        train_one_epoch(model, loader, optimizer, task)

    def warm_up() -> None:
        train_one_epoch(model, itertools.islice(loader, WARMUP_BATCHES), optimizer, task)

    return epoch, warm_up


def _timed(epoch: Epoch, device: torch.device) -> Callable[[], float]:
    def run() -> float:
        _sync(device)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            epoch()
        _sync(device)
        return time.perf_counter() - started

    return run


def measure(
    name: str,
    inputs: ModelInputs,
    devices: Sequence[torch.device],
    batch: int,
    reps: dict[str, int],
    work: Path,
) -> dict[str, dict[str, Any]]:
    """Seconds per epoch of every variant on every device, and the GPU's peak memory."""
    out: dict[str, dict[str, Any]] = {}
    for device in devices:
        runs = reps[device.type]
        epochs: dict[str, Callable[[], float]] = {}
        for variant in VARIANTS:
            epoch, warm_up = build_epoch(name, variant, device, inputs, batch, runs + 1, work)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                warm_up()
            epochs[f"{device.type}-{variant}"] = _timed(epoch, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = interleave(epochs, runs, warmup=0)
        peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else None
        for label, values in seconds.items():
            out[label] = {"runs": values, "wall": Stats.of(values), "gpu_peak_mib": peak}
    return out


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad_sample.detach().cpu().clone() for n, p in model.named_parameters()}


class _RecordingSource(SecureRandom):
    """A keyed ChaCha20 source that keeps a CPU copy of every noise tensor it hands out."""

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self.draws: list[torch.Tensor] = []

    def normal(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        noise = super().normal(*args, **kwargs)
        self.draws.append(noise.detach().cpu().clone())
        return noise


def dp_step(
    reference: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device
) -> dict[str, dict[str, torch.Tensor]]:
    """One DP-SGD step of a copy of ``reference`` on ``device``: what it computed, on the CPU."""
    model = copy.deepcopy(reference).to(device)
    fuse_recurrent_layers(model)
    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(
        make_optimizer(model),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=len(batch[0]),
    )
    source = _RecordingSource(KEY)
    install_secure_noise(optimizer, source)
    tensors = tuple(t.to(device) for t in batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        backward_batch(wrapped, tensors, optimizer, _task(model))  # type: ignore[arg-type]
        per_student = _grads(model)
        optimizer.step()
    params = dict(model.named_parameters())
    summed = {n: p.summed_grad.detach().cpu() for n, p in params.items()}  # type: ignore[attr-defined]
    noise = {str(k): draw for k, draw in enumerate(source.draws)}  # one for all parameters
    weights = {n: p.detach().cpu().clone() for n, p in params.items()}
    wrapped._close()
    return {"per_student": per_student, "clipped_sum": summed, "noise": noise, "weights": weights}


def agreement(name: str, inputs: ModelInputs) -> dict[str, float]:
    """Max |GPU - CPU| / max |CPU| of each quantity of one DP step (see the module docstring)."""
    reference = _model(name, dropout=0.0)
    batch = input_tensors(inputs)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        cpu = dp_step(reference, batch, torch.device("cpu"))
        gpu = dp_step(reference, batch, torch.device("cuda"))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    out = {}
    for what, expected in cpu.items():
        worst = max(float((gpu[what][n] - v).abs().max()) for n, v in expected.items())
        scale = max(float(v.abs().max()) for v in expected.values())
        out[what] = worst / scale if scale else worst
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("bench_gpu", __doc__.split("\n\n")[0])
    p.add_argument("--models", default="lstm")
    p.add_argument("--sizes", default="1000,10000,100000", help="students, comma-separated")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="CPU torch threads; 0: torch's own")
    p.add_argument("--reps", type=int, default=3, help="timed epochs per variant and device")
    p.add_argument("--cpu-reps-above", type=int, default=10_000, help="one CPU epoch above this")
    p.add_argument("--check-students", type=int, default=256)
    p.add_argument("--cpu-only", action="store_true", help="time the CPU even with a GPU there")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.check_students = "1000", 2, 64
    logging.getLogger().setLevel(logging.ERROR)  # the sessions' "generated a signing key" notes
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.cpu_only
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if gpu else [])
    if not gpu:
        why = "--cpu-only" if args.cpu_only else (
            f"no GPU present: torch {torch.__version__} sees no CUDA device"
            + (" (a CPU build)" if torch.version.cuda is None else "")
        )  # fmt: skip
        log(f"{why}; timing the CPU only, no GPU figures and no numerical check")
    report = Report("bench_gpu", "1. Devices", vars(args) | {"gpu": gpu})
    report.details["devices"] = [describe_device(d) for d in devices]
    report.details["cpu_threads"] = torch.get_num_threads()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="edufl-bench-gpu-") as tmp:
        for model in models:
            if gpu:
                log(f"{model}: DP step on the GPU vs the CPU ({args.check_students} students)")
                checks[model] = agreement(model, students(args.check_students, seed=1))
                log("  " + ", ".join(f"{k} {v:.1e}" for k, v in checks[model].items()))
            for n in sizes:
                reps = {"cpu": args.reps if n <= args.cpu_reps_above else 1, "cuda": args.reps}
                log(f"{model}, {n:,} students: {', '.join(str(d) for d in devices)} x {VARIANTS}")
                label = f"{model}, {n:,} students"
                results[label] = measure(model, students(n), devices, args.batch, reps, Path(tmp))
                # Each setting's medians as soon as they exist: a run cut short keeps them.
                log(
                    "  "
                    + ", ".join(f"{k} {v['wall'].median:.3f} s" for k, v in results[label].items())
                )
    report.details["epochs"] = {
        label: {
            k: {"wall": vars(v["wall"]), "gpu_peak_mib": v["gpu_peak_mib"]} for k, v in r.items()
        }
        for label, r in results.items()
    }
    report.details["dp_gpu_vs_cpu"] = checks
    print(_table(results, gpu))
    if checks:
        print()
        print(_check_table(checks))
    _rows(report, results, checks, gpu)
    report.write(args.json)
    return 0


def _table(results: dict[str, dict[str, Any]], gpu: bool) -> str:
    header = ["setting", "CPU plain s", "CPU DP s", "CPU DP / plain"]
    if gpu:
        header += ["GPU plain s", "GPU DP s", "GPU DP / plain", "speed-up plain", "speed-up DP"]
        header += ["GPU peak MiB"]
    rows = []
    for label, r in results.items():
        row = [label, r["cpu-plain"]["wall"].cell(3), r["cpu-dp"]["wall"].cell(3)]
        row.append(f"{r['cpu-dp']['wall'].median / r['cpu-plain']['wall'].median:.2f}x")
        if gpu:
            row += [r["cuda-plain"]["wall"].cell(3), r["cuda-dp"]["wall"].cell(3)]
            row.append(f"{r['cuda-dp']['wall'].median / r['cuda-plain']['wall'].median:.2f}x")
            for variant in VARIANTS:
                cpu, dev = r[f"cpu-{variant}"]["wall"], r[f"cuda-{variant}"]["wall"]
                row.append(f"{cpu.median / dev.median:.1f}x")
            row.append(f"{r['cuda-dp']['gpu_peak_mib']:.0f}")
        rows.append(row)
    return markdown(header, rows)


def _check_table(checks: dict[str, dict[str, float]]) -> str:
    rows = [
        [model, *(f"{c[k]:.1e}" for k in ("per_student", "clipped_sum", "noise", "weights"))]
        for model, c in checks.items()
    ]
    header = ["DP step, GPU vs CPU", "per-student grads", "clipped sum", "noise", "weights after"]
    return markdown(header, rows)


def _rows(
    report: Report,
    results: dict[str, dict[str, Any]],
    checks: dict[str, dict[str, float]],
    gpu: bool,
) -> None:
    for label, r in results.items():
        for variant in VARIANTS:
            cpu = r[f"cpu-{variant}"]
            if not gpu:
                report.add(Row("1 devices", f"{label}: CPU {variant} epoch", cpu["wall"], "s"))
                continue
            dev = r[f"cuda-{variant}"]
            report.add(
                Row(
                    "1 devices",
                    f"{label}: CPU {variant} epoch / GPU {variant} epoch, wall time (medians)",
                    Stats.of([cpu["wall"].median / dev["wall"].median]),
                    "x",
                    note=f"GPU {dev['wall'].median:.3f} s, CPU {cpu['wall'].median:.3f} s",
                )
            )
    for model, c in checks.items():
        worst = max(c["per_student"], c["clipped_sum"], c["weights"])
        report.add(
            Row(
                "1 devices",
                f"{model}: DP step on the GPU vs the CPU, max |diff| / max |value|",
                Stats.of([worst]),
                "",
                target=f"<= {AGREE:g}, noise identical",
                met=worst <= AGREE and c["noise"] == 0.0,
                note=", ".join(f"{k} {v:.1e}" for k, v in c.items()),
            )
        )


if __name__ == "__main__":
    raise SystemExit(main())
