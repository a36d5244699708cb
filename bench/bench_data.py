"""Data path: OULAD loading (rows/s, peak memory vs rows and students) and scoring (students/s).

OULAD: `simulations.datasets.oulad.loader.read` on the AAA sample
(``../shared/datasets/oulad_sample_AAA``;
skipped when absent) and on OULAD-format copies made from it in a temporary folder, with
``studentVle.csv`` repeated (more log rows for the same students) or with the students
replicated under new ids (more students, proportionally more rows). Each read runs in a fresh
process that reports its peak resident memory above its memory after the imports. Streaming
means the peak stops growing with the log rows; the full download (32,593 registrations,
10,655,280 log rows) is projected as the peak at about its row count (x30 the sample's rows)
plus the memory one more registration costs (replicated students vs repeated rows, at the same
row count) times the registrations the sample lacks.

Scoring (moved from ``simulations/bench_scoring.py``): one large synthetic institution scored
after week 6 by a small trained LSTM; each stage of `edufl client score` timed on every student:
load + validate the export, scoring, indicators, reasons (occlusion), rules, the store write.

    python -m bench.bench_data                   # sample x1, x4, x16, x30 rows; x4 students
    python -m bench.bench_data --vle-factors 1,2,4,8,16,30 --score-students 100000
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bench.common import MIB, PeakRSS, Report, Row, Stats, log, markdown, parser

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "datasets" / "oulad_sample_AAA"
FULL = {"registrations": 32_593, "vle_rows": 10_655_280}  # the full OULAD download
_ID_OFFSET = 10_000_000  # above every OULAD id_student, below the loader's 10**9 key base
_REPLICATED = ("studentInfo.csv", "studentRegistration.csv", "studentAssessment.csv")
T = TypeVar("T")


# -- OULAD ------------------------------------------------------------------------------------


def make_variant(sample: Path, out: Path, students: int, repeat: int) -> dict[str, int]:
    """An OULAD folder with ``students`` x the sample's students and ``repeat`` x its log rows.

    Replicated students get new ids; a repeated log row adds its clicks again (a valid file).
    """
    import pandas as pd

    out.mkdir(parents=True)
    for name in ("courses.csv", "assessments.csv", "vle.csv"):
        shutil.copy(sample / name, out / name)
    for name in (*_REPLICATED, "studentVle.csv"):
        frame = pd.read_csv(sample / name, dtype={"id_student": "int64"}, keep_default_na=False)
        target = out / (name if name != "studentVle.csv" else "base.csv")
        with target.open("w", newline="") as fh:
            for k in range(students):
                copy = frame.assign(id_student=frame["id_student"] + k * _ID_OFFSET)
                copy.to_csv(fh, header=k == 0, index=False, lineterminator="\n")
    base = (out / "base.csv").read_bytes()
    header, _, body = base.partition(b"\n")
    with (out / "studentVle.csv").open("wb") as fh:
        fh.write(header + b"\n")
        for _ in range(repeat):
            fh.write(body)
    (out / "base.csv").unlink()
    rows = body.count(b"\n") * repeat
    registrations = sum(1 for _ in (sample / "studentInfo.csv").open()) - 1
    return {"registrations": registrations * students, "vle_rows": rows}


def child(argv: Sequence[str]) -> int:
    """``--child FOLDER RESULT``: read one OULAD folder; seconds and peak memory to RESULT."""
    folder, result = argv
    from simulations.datasets.oulad import loader as oulad

    with PeakRSS().measure() as peak:
        started = time.perf_counter()
        cohort = oulad.read(folder)
        seconds = time.perf_counter() - started
    Path(result).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "registrations": len(cohort.registrations),
                "baseline": peak.baseline,
                "peak": peak.peak,
                "delta": peak.delta,
            }
        )
    )
    return 0


def _read_in_child(folder: Path, result: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.bench_data", "--child", str(folder), str(result)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"reading {folder} failed:\n{proc.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(result.read_text())
    return data


def _fit(points: list[dict[str, Any]]) -> dict[str, float] | None:
    """Growth with rows at the top of the rows series, cost per registration, the projection.

    None unless the rows series has two points and one replicated-students point has a
    rows-only twin with the same row count.
    """
    rows = sorted((p for p in points if p["students_factor"] == 1), key=lambda p: p["vle_rows"])
    more = [p for p in points if p["students_factor"] > 1]
    twin = {p["vle_rows"]: p for p in rows}
    if len(rows) < 2 or not more or more[0]["vle_rows"] not in twin:
        return None
    wide, same_rows = more[0], twin[more[0]["vle_rows"]]
    per_registration = (wide["peak_delta"] - same_rows["peak_delta"]) / (
        wide["registrations"] - same_rows["registrations"]
    )
    top, below = rows[-1], rows[-2]
    slope = (top["peak_delta"] - below["peak_delta"]) / (top["vle_rows"] - below["vle_rows"])
    projected = top["peak_delta"] + per_registration * (
        FULL["registrations"] - top["registrations"]
    )
    return {
        "mib_per_million_rows_at_top": slope * 1e6 / MIB,
        "top_rows": top["vle_rows"],
        "peak_ratio_top_vs_sample": top["peak_delta"] / rows[0]["peak_delta"],
        "rows_ratio_top_vs_sample": top["vle_rows"] / rows[0]["vle_rows"],
        "bytes_per_registration": per_registration,
        "projected_full_mib": projected / MIB,
    }


def measure_oulad(
    sample: Path, factors: list[tuple[int, int]], runs: int, work: Path
) -> dict[str, Any]:
    points = []
    for students, repeat in factors:
        folder = work / f"oulad-s{students}-r{repeat}"
        shape = make_variant(sample, folder, students, repeat)
        reads = []
        for k in range(runs):
            log(f"OULAD x{students} students, x{repeat} rows ({shape['vle_rows']:,}): {k + 1}")
            reads.append(_read_in_child(folder, work / f"read-{students}-{repeat}-{k}.json"))
        shutil.rmtree(folder)
        deltas = [r["delta"] for r in reads if r["delta"] is not None]
        points.append(
            {
                "students_factor": students,
                "rows_factor": repeat,
                **shape,
                "seconds": Stats.of([r["seconds"] for r in reads]),
                "rows_per_s": Stats.of([shape["vle_rows"] / r["seconds"] for r in reads]),
                "peak_delta": statistics.median(deltas) if deltas else float("nan"),
                "peak_rss": max(r["peak"] or 0 for r in reads),
            }
        )
    return {"points": points, "fit": _fit(points)}


# -- scoring ----------------------------------------------------------------------------------


def _stage(label: str, n: int, reps: int, fn: Callable[[], T], out: dict[str, Stats]) -> T:
    seconds, value = [], None
    for _ in range(reps):
        started = time.perf_counter()
        value = fn()
        seconds.append(time.perf_counter() - started)
    out[label] = Stats.of([n / s for s in seconds])
    log(f"  {label:<24} {out[label].median:12,.0f} students/s")
    return value  # type: ignore[return-value]


def measure_scoring(students: int, week: int, train_students: int, reps: int, work: Path) -> Any:
    """Students per second of every stage of a scoring run (median over ``reps``)."""

    from client.early_warning.indicators import compute_indicators
    from client.early_warning.reasons import explain, occlusion
    from client.early_warning.rules import apply_rules, load_rules
    from client.early_warning.scoring import load_observed_term, load_scoring_model, score_cohort
    from client.early_warning.store import RunInfo, Store
    from shared_models.data.contract import default_spec
    from simulations.scoring_figures import train_risk_model
    from simulations.synthetic import write_consortium

    spec = default_spec()
    log(f"scoring: generating {students:,} students, training a small model")
    (export,) = write_consortium(
        work / "big", institutions=1, students=students, seed=0, file_format="parquet"
    )
    (small,) = write_consortium(work / "small", institutions=1, students=train_students, seed=1)
    train_risk_model(load_observed_term(small, spec).cohort, spec, work / "model", max_epochs=3)
    scorer = load_scoring_model(work / "model", spec)
    rules = load_rules(None, spec)
    rates: dict[str, Stats] = {}
    load = lambda: load_observed_term(export, spec, week)  # noqa: E731 - one line per stage
    term = _stage("load + validate export", students, reps, load, rates)
    cohort, k, n = term.cohort, term.observed_weeks, len(term.cohort)
    scores = _stage("scoring", n, reps, lambda: score_cohort(scorer, cohort, k), rates)
    indicators = _stage(
        "indicators",
        n,
        reps,
        lambda: compute_indicators(cohort, k, probability=scores.probability, grade=scores.grade),
        rates,
    )
    typical = scorer.normalizer.dynamic_reference()
    reasons = _stage(
        "reasons (occlusion)",
        n,
        reps,
        lambda: explain(occlusion(scorer, cohort, k), indicators, spec, typical),
        rates,
    )
    recs = _stage("rules", n, reps, lambda: apply_rules(rules, scores.tier, indicators), rates)
    info = RunInfo(str(export), str(work / "model"), scorer.card.model, "default rules")
    counter = iter(range(reps))

    def write() -> int:
        with Store(work / f"bench-{next(counter)}.sqlite") as store:
            return store.save_run(info, scores, reasons, recs, len(term.unscored_ids))

    _stage("store write", n, reps, write, rates)
    per_student = sum(1 / rates[s].median for s in rates if s != "load + validate export")
    return {"students": n, "stages": rates, "end_to_end_no_load": 1 / per_student}


# -- the script -------------------------------------------------------------------------------


def _factors(text: str, students: int) -> list[tuple[int, int]]:
    """Row factors with the sample's students, then ``students`` x students at x1 rows each."""
    out = [(1, int(f)) for f in text.split(",") if f]
    return out + ([(students, 1)] if students > 1 else [])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    p = parser("bench_data", __doc__.split("\n\n")[0])
    p.add_argument("--oulad", type=Path, default=SAMPLE, help="the OULAD sample folder")
    p.add_argument("--vle-factors", default="1,4,16,30", help="studentVle.csv repeated")
    p.add_argument("--student-factor", type=int, default=4, help="students replicated this often")
    p.add_argument("--runs", type=int, default=2, help="reads of each OULAD variant")
    p.add_argument("--score-students", type=int, default=3000)
    p.add_argument("--score-week", type=int, default=6)
    p.add_argument("--score-reps", type=int, default=3)
    args = p.parse_args(argv)
    if args.quick:
        args.vle_factors, args.student_factor, args.runs = "1,2", 2, 1
        args.score_students, args.score_reps = 500, 1
    import torch

    torch.set_num_threads(1)  # see docs/benchmarks.md: two threads are a trap when shared
    report = Report("bench_data", "5. Data path", vars(args))
    with tempfile.TemporaryDirectory(prefix="edufl-bench-data-") as tmp:
        work = Path(tmp)
        oulad = None
        if (args.oulad / "studentVle.csv").is_file():
            factors = _factors(args.vle_factors, args.student_factor)
            oulad = measure_oulad(args.oulad, factors, args.runs, work)
        else:
            log(f"no OULAD sample at {args.oulad}: the loader part is skipped")
        scoring = measure_scoring(
            args.score_students, args.score_week, 1000, args.score_reps, work / "scoring"
        )
    _report(report, oulad, scoring)
    print(_tables(oulad, scoring))
    report.write(args.json)
    return 0


def _report(report: Report, oulad: dict[str, Any] | None, scoring: dict[str, Any]) -> None:
    if oulad is None:
        report.add(Row("5 data path", "OULAD loader", None, "", note="skipped: no OULAD sample"))
    else:
        first, fit = oulad["points"][0], oulad["fit"]
        report.add(
            Row(
                "5 data path",
                f"OULAD loader on the AAA sample ({first['vle_rows']:,} log rows)",
                first["rows_per_s"],
                "rows/s",
                note=f"peak {first['peak_delta'] / MIB:.0f} MiB above the imports",
            )
        )
        if fit is not None:
            report.add(
                Row(
                    "5 data path",
                    "OULAD peak memory growth per million more log rows, same students, at "
                    f"{fit['top_rows']:,} rows",
                    Stats.of([fit["mib_per_million_rows_at_top"]]),
                    "MiB",
                    target="independent of log rows",
                    met=abs(fit["mib_per_million_rows_at_top"]) < 1.0,
                    note=f"x{fit['rows_ratio_top_vs_sample']:.0f} the sample's rows: "
                    f"x{fit['peak_ratio_top_vs_sample']:.2f} its peak; "
                    f"{fit['bytes_per_registration'] / 1024:.1f} KiB per registration",
                )
            )
            report.add(
                Row(
                    "5 data path",
                    "OULAD peak memory projected for the full download "
                    f"({FULL['registrations']:,} registrations, {FULL['vle_rows']:,} rows)",
                    Stats.of([fit["projected_full_mib"]]),
                    "MiB",
                )
            )
    stages = scoring["stages"]
    report.add(
        Row(
            "5 data path",
            f"scoring {scoring['students']:,} students, end to end without loading",
            Stats.of([scoring["end_to_end_no_load"]]),
            "students/s",
            note=", ".join(f"{k} {v.median:,.0f}/s" for k, v in stages.items()),
        )
    )
    report.details = {
        "oulad": None
        if oulad is None
        else {
            "points": [
                {**p, "seconds": vars(p["seconds"]), "rows_per_s": vars(p["rows_per_s"])}
                for p in oulad["points"]
            ],
            "fit": oulad["fit"],
        },
        "scoring": {**scoring, "stages": {k: vars(v) for k, v in stages.items()}},
    }


def _tables(oulad: dict[str, Any] | None, scoring: dict[str, Any]) -> str:
    parts = []
    if oulad is not None:
        rows = [
            [
                f"x{p['students_factor']}",
                f"x{p['rows_factor']}",
                f"{p['registrations']:,}",
                f"{p['vle_rows']:,}",
                p["seconds"].cell(2),
                f"{p['rows_per_s'].median:,.0f}",
                f"{p['peak_delta'] / MIB:.0f}",
            ]
            for p in oulad["points"]
        ]
        header = ["students", "rows", "registrations", "log rows", "s", "rows/s", "peak MiB"]
        parts.append(markdown(header, rows))
        if oulad["fit"] is not None:
            fit = oulad["fit"]
            parts.append(
                f"At {fit['top_rows']:,} rows the peak grows "
                f"{fit['mib_per_million_rows_at_top']:.2f} MiB per million more rows; one more "
                f"registration costs {fit['bytes_per_registration'] / 1024:.1f} KiB; full OULAD "
                f"({FULL['registrations']:,} registrations, {FULL['vle_rows']:,} rows): "
                f"{fit['projected_full_mib']:.0f} MiB projected"
            )
    stages = scoring["stages"].items()
    rows = [[k, f"{v.median:,.0f}", f"{v.min:,.0f}-{v.max:,.0f}"] for k, v in stages]
    rows.append(["end to end (no load)", f"{scoring['end_to_end_no_load']:,.0f}", ""])
    parts.append(
        f"Scoring {scoring['students']:,} students:\n\n"
        + markdown(["stage", "students/s", "min-max"], rows)
    )
    return "\n\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
