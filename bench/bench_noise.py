"""CSPRNG noise: time per DP epoch with ChaCha20 noise and sampling over torch's generator.

The default LSTM trained with `privacy.DPSession` (fused per-student gradients), two variants on
the same random students, batch size and thread count, epochs interleaved:

- ``torch-noise``: the session's optimizer put back on torch's Mersenne Twister
  (``torch.normal``, one float32 draw per value), what edufl ran before;
- ``chacha20``: the session as it is: `privacy.noise.SecureRandom` for the noise (four float64
  draws summed per value, Opacus' secure-mode mitigation).

Both sample students from ChaCha20 (`privacy.sampling`): one 8-byte draw per student per step,
next to four per model parameter for the noise.

The ratio is the median of the ratios of epochs run side by side, on this thread's CPU time
(one torch thread), wall time beside it; the noise alone is also timed per step.

    python -m bench.bench_noise
    python -m bench.bench_noise --students 4096 --reps 7
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.bench_dp import _timed, students
from bench.common import Report, Row, Stats, interleave, log, markdown, parser, ratio_stats
from privacy.budget import DPPlan, PrivacyBudget
from privacy.dp import DPSession
from privacy.noise import SecureRandom
from shared_models.data.contract import default_spec
from shared_models.models.registry import build_model
from shared_models.training import make_loader, make_optimizer, set_seed, train_one_epoch

VARIANTS = ("torch-noise", "chacha20")


def _epoch(variant: str, inputs: Any, batch: int, epochs: int, work: Path) -> Any:
    spec = default_spec()
    set_seed(0)
    model = build_model("lstm", spec.weeks, len(spec.dynamic_names), len(spec.static_names))
    plan = DPPlan.for_training(len(inputs.at_risk), batch, epochs, 1)
    session = DPSession.open(
        work / variant, PrivacyBudget(epsilon=8.0, delta=1e-5), plan, institution="bench"
    )
    loader = make_loader(inputs, batch, shuffle=True)
    private, opt, dp_loader = session.make_private(model, make_optimizer(model), loader)
    if variant == "torch-noise":
        del opt.add_noise  # back to DPOptimizer.add_noise: torch.normal on opt.generator
        opt.generator = torch.Generator().manual_seed(0)
    return lambda: train_one_epoch(private, dp_loader, opt, "risk"), model


def _noise_seconds(params: int, reps: int) -> dict[str, Stats]:
    """Seconds to draw one step's noise for ``params`` values, each way."""
    source, gen = SecureRandom(), torch.Generator().manual_seed(0)
    draws = {
        "torch-noise": lambda: torch.normal(0.0, 1.0, size=(params,), generator=gen),
        "chacha20": lambda: source.normal((params,), 1.0, dtype=torch.float32),
    }

    def timed(draw: Any) -> float:
        start = time.perf_counter()
        draw()
        return time.perf_counter() - start

    runs = interleave({k: (lambda d=d: timed(d)) for k, d in draws.items()}, reps, warmup=2)
    return {k: Stats.of(v) for k, v in runs.items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = parser("bench_noise", __doc__.split("\n\n")[0])
    p.add_argument("--students", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5, help="timed epochs per variant")
    args = p.parse_args(argv)
    if args.quick:
        args.students, args.reps = 256, 2
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    report = Report("bench_noise", "CSPRNG noise cost", vars(args))
    inputs = students(args.students)
    with tempfile.TemporaryDirectory(prefix="edufl-bench-noise-") as tmp:
        built = {v: _epoch(v, inputs, args.batch, args.reps + 2, Path(tmp)) for v in VARIANTS}
        params = sum(p.numel() for p in built["chacha20"][1].parameters())
        walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
        log(f"lstm ({params} parameters), {args.students} students, batch {args.batch}")
        cpu = interleave({v: _timed(e, walls[v]) for v, (e, _) in built.items()}, args.reps)
    steps = -(-args.students // args.batch)
    per_step = _noise_seconds(params, 20)
    x_cpu = ratio_stats(cpu["chacha20"], cpu["torch-noise"])
    x_wall = ratio_stats(walls["chacha20"][1:], walls["torch-noise"][1:])
    rows = [
        [
            v,
            Stats.of(cpu[v]).cell(),
            Stats.of(walls[v][1:]).cell(),
            f"{1e3 * per_step[v].median:.2f}",
            f"{1e3 * per_step[v].median * steps:.0f}",
        ]
        for v in VARIANTS
    ]
    rows.append(["ratio chacha20 / torch-noise", x_cpu.cell(3), x_wall.cell(3), "", ""])
    print(f"lstm, {params} parameters, {args.students} students, batch {args.batch}, ~{steps} "
          f"steps per epoch, {args.threads} thread(s)\n")  # fmt: skip
    header = ["variant", "CPU s/epoch", "wall s/epoch", "noise ms/step", "noise ms/epoch"]
    print(markdown(header, rows))
    report.add(
        Row("CSPRNG noise cost", "LSTM DP epoch, ChaCha20 over torch noise", x_cpu, "x (CPU)")
    )
    report.details = {
        "parameters": params,
        "steps_per_epoch": steps,
        "cpu": {v: vars(Stats.of(cpu[v])) for v in VARIANTS},
        "wall": {v: vars(Stats.of(walls[v][1:])) for v in VARIANTS},
        "noise_seconds_per_step": {v: vars(s) for v, s in per_step.items()},
        "x_cpu": vars(x_cpu),
        "x_wall": vars(x_wall),
    }
    report.write(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
