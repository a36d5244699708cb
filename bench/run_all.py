"""Run every benchmark, print one table of the results and write it as JSON and Markdown.

Each ``bench/bench_*.py`` runs in its own process, one after the other (so they do not compete
for the cores), as ``python -m bench.bench_NAME --json runs/bench/bench_NAME.json``. The combined
table is built from the ``summary`` rows of each script's JSON (see `bench.common`); a script
without them (or one that failed) gets a line saying so, and its own table follows.

    python -m bench                         # all of them (make bench)
    python -m bench --only dp,data --quick  # a smoke test of two
    python -m bench --update-docs           # also refresh the table in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS, Stats, log, machine, markdown

REPO = Path(__file__).resolve().parents[1]
#: The issue's question order; scripts not listed run after these, by name.
ORDER = ("federation", "dp", "scale", "deploy", "data", "startup")
#: Run only when named in ``--only``: ``gpu`` needs a CUDA device to answer its question, and
#: its CPU epochs at 100,000 students take many minutes (``python -m bench --only gpu``).
OPT_IN = ("gpu",)
#: ``--quick`` for scripts that do not take it.
QUICK_ARGS: dict[str, list[str]] = {"deploy": ["--modes", "warm", "--rounds", "3"]}
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:table:begin -->", "<!-- bench:table:end -->"


def scripts(only: set[str] | None, skip: set[str]) -> list[str]:
    """Short names (``dp`` for ``bench_dp.py``) of the scripts to run, in the issue's order."""
    found = sorted(p.stem.removeprefix("bench_") for p in (REPO / "bench").glob("bench_*.py"))
    ranked = sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    chosen = [n for n in ranked if (n in only if only is not None else n not in OPT_IN)]
    return [n for n in chosen if n not in skip]


def run_script(name: str, quick: bool, out: Path) -> dict[str, Any]:
    """Run one script; its JSON (or None), stdout table, exit code and wall time."""
    path = out / f"bench_{name}.json"
    argv = [sys.executable, "-m", f"bench.bench_{name}", "--json", str(path)]
    if quick:
        argv += QUICK_ARGS.get(name, ["--quick"])
    log(f"=== bench_{name}: {' '.join(argv[1:])}")
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
    seconds = time.monotonic() - started
    data = json.loads(path.read_text()) if proc.returncode == 0 and path.is_file() else None
    log(f"=== bench_{name}: exit {proc.returncode} after {seconds:.0f} s")
    return {
        "name": name,
        "rc": proc.returncode,
        "seconds": seconds,
        "table": proc.stdout,
        "json": data,
    }


def _cell(stats: dict[str, Any] | None, unit: str) -> str:
    if stats is None:
        return "n/a"
    s = Stats(**stats)
    digits = 0 if abs(s.median) >= 1000 else 2
    value = f"{s.median:,.{digits}f}" if s.runs == 1 else s.cell(digits)
    return f"{value} {unit}".strip()


def combined_table(results: list[dict[str, Any]]) -> str:
    """One row per summary row of every script; a placeholder for scripts without them."""
    rows = []
    for r in results:
        summary = (r["json"] or {}).get("summary")
        if not summary:
            why = "failed" if r["rc"] else "no summary rows: see its own table"
            rows.append([f"bench_{r['name']}", why, "", "", ""])
            continue
        for row in summary:
            met = {True: "yes", False: "**no**", None: ""}[row["met"]]
            rows.append(
                [
                    row["question"],
                    row["measure"] + (f" ({row['note']})" if row["note"] else ""),
                    _cell(row["stats"], row["unit"]),
                    row["target"],
                    met,
                ]
            )
    return markdown(["question", "measure", "median [min-max]", "target", "met"], rows)


def report(results: list[dict[str, Any]], command: str, total: float) -> str:
    facts = machine()
    times = ", ".join(f"{r['name']} {r['seconds']:.0f} s" for r in results)
    head = (
        f"`{command}` on {facts['cpu_count']} cores (load average before "
        f"{results[0]['load_before'][0]:.1f}, after {os.getloadavg()[0]:.1f}), "
        f"{total / 60:.1f} min in all ({times})."
    )
    tables = "\n\n".join(
        f"### bench_{r['name']}\n\n{r['table'].strip() or '(no output)'}" for r in results
    )
    return f"{head}\n\n{combined_table(results)}\n\n{tables}\n"


def update_docs(text: str, docs: Path = DOCS) -> None:
    """Replace what lies between the table markers in ``docs`` with ``text``."""
    content = docs.read_text()
    before, begin, rest = content.partition(BEGIN)
    _, end, after = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{docs}: no {BEGIN} ... {END} block to replace")
    docs.write_text(f"{before}{BEGIN}\n{text}{END}{after}")
    log(f"updated {docs}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated short names, e.g. dp,data")
    p.add_argument("--skip", default="", help="comma-separated short names")
    p.add_argument("--quick", action="store_true", help="smaller sizes: a smoke test")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--update-docs", action="store_true", help=f"refresh the table in {DOCS}")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    names = scripts(only, set(filter(None, args.skip.split(","))))
    if not names:
        raise SystemExit("no benchmark selected")
    command = "python -m bench " + " ".join(a for a in (argv or sys.argv[1:]) if a)
    started = time.monotonic()
    results = []
    for name in names:
        load_before = os.getloadavg()
        results.append(run_script(name, args.quick, args.out) | {"load_before": load_before})
    total = time.monotonic() - started
    text = report(results, command.strip(), total)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text)
    summary = {
        "command": command.strip(),
        **machine(),
        "seconds": round(total, 1),
        "scripts": [{k: v for k, v in r.items() if k != "table"} for r in results],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log(f"wrote {args.out / 'summary.md'} and summary.json ({total / 60:.1f} min)")
    if args.update_docs:
        update_docs(text)
    return 1 if any(r["rc"] for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
