"""Run the hostile-input suite (tests/fuzz) with a larger budget and print what it tried.

    python scripts/fuzz_report.py               # 5x the suite's own number of examples
    python scripts/fuzz_report.py --scale 1     # exactly what `pytest tests/fuzz` runs
    python scripts/fuzz_report.py --markdown    # the table as markdown (docs/reliability.md)

The suite is the same; only ``EDUFL_FUZZ_SCALE`` multiplies every test's examples.
Generation is derandomized, so the figures are reproducible on any machine. Exit status is
pytest's: non-zero when any hostile input ended in a traceback or a half-written output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (
    ("kind", "file kind"),
    ("tried", "inputs tried"),
    ("accepted", "accepted"),
    ("refused", "refused, clear error"),
    ("exit1", "reported as unusable/tampered (exit 1)"),
    ("tracebacks", "tracebacks"),
    ("known_reported", "known bugs elsewhere (reported)"),
    ("outputs_checked", "outputs checked after a failure"),
    ("half_written", "half-written"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=5.0, help="examples multiplier")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {**os.environ, "EDUFL_FUZZ_SCALE": str(args.scale), "EDUFL_FUZZ_REPORT": str(report)}
        command = [sys.executable, "-m", "pytest", "tests/fuzz", "-q", "-p", "no:cacheprovider"]
        start = time.monotonic()
        result = subprocess.run([*command, *args.pytest_args], cwd=ROOT, env=env, check=False)
        seconds = time.monotonic() - start
        rows = json.loads(report.read_text("utf-8")) if report.is_file() else []

    if not rows:
        print("no tally written: did the suite run?", file=sys.stderr)
        return result.returncode or 1
    totals = {key: sum(r[key] for r in rows) for key, _ in COLUMNS[1:]}
    print()
    print(_table(rows, totals, args.markdown))
    print()
    print(
        f"{totals['tried']} hostile inputs tried at scale {args.scale:g}: "
        f"{totals['tracebacks']} tracebacks, {totals['half_written']} half-written outputs "
        f"({totals['outputs_checked']} outputs checked after a failure), "
        f"{totals['known_reported']} hits of known bugs in files outside the fixes; "
        f"{seconds:.0f} s. Command: EDUFL_FUZZ_SCALE={args.scale:g} pytest tests/fuzz"
    )
    return result.returncode


def _table(rows: list[dict[str, object]], totals: dict[str, int], markdown: bool) -> str:
    body = [*rows, {"kind": "total", **totals}]
    if markdown:
        lines = [
            "| " + " | ".join(title for _, title in COLUMNS) + " |",
            "|---|" + "---:|" * (len(COLUMNS) - 1),
        ]
        lines += ["| " + " | ".join(str(r[key]) for key, _ in COLUMNS) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(title), *(len(str(r[key])) for r in body)) for key, title in COLUMNS]
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(COLUMNS, widths, strict=True))]
    for r in body:
        cells = [str(r[key]) for key, _ in COLUMNS]
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
