"""The benchmarks' shared machinery: figures, interleaving, memory, the runner's table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench import run_all
from bench.bench_data import _fit, make_variant
from bench.common import PeakRSS, Row, Stats, interleave, ratio_stats


def test_stats_give_median_min_max_and_a_compact_cell() -> None:
    stats = Stats.of([3.0, 1.0, 2.0, 10.0])

    assert (stats.median, stats.min, stats.max, stats.runs) == (2.5, 1.0, 10.0, 4)
    assert stats.cell(1) == "2.5 [1.0-10.0]"
    assert Stats.of([4.0]).cell(1) == "4.0"


def test_ratios_pair_runs_measured_side_by_side() -> None:
    assert ratio_stats([2.0, 9.0, 4.0], [1.0, 3.0, 4.0]) == Stats(2.0, 1.0, 3.0, 3)


def test_interleave_rotates_the_order_and_drops_warmup_runs() -> None:
    calls: list[str] = []

    def variant(name: str) -> float:
        calls.append(name)
        return float(len(calls))

    results = interleave({"a": lambda: variant("a"), "b": lambda: variant("b")}, reps=2)

    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert results == {"a": [4.0, 5.0], "b": [3.0, 6.0]}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc/self/clear_refs")
def test_peak_rss_sees_a_block_allocating_memory() -> None:
    with PeakRSS().measure() as peak:
        block = bytearray(64 * 1024 * 1024)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        del block

    assert peak.delta is not None and peak.delta >= 60 * 1024 * 1024


def test_runner_orders_scripts_as_the_issue_numbers_its_questions() -> None:
    names = run_all.scripts(None, set())

    known = [n for n in names if n in run_all.ORDER]
    assert known == [n for n in run_all.ORDER if n in names]
    assert "dp" in names and "federation" in names
    assert run_all.scripts({"dp"}, set()) == ["dp"]


def test_combined_table_marks_targets_and_scripts_without_summary() -> None:
    row = Row("2 DP overhead", "lstm ratio", Stats.of([2.0, 2.5]), "x", "<= 3x", True)
    results = [
        {"name": "dp", "rc": 0, "json": {"summary": [row.as_dict()]}},
        {"name": "deploy", "rc": 0, "json": {"modes": {}}},
    ]

    table = run_all.combined_table(results)

    assert "| 2 DP overhead | lstm ratio | 2.25 [2.00-2.50] x | <= 3x | yes |" in table
    assert "| bench_deploy | no summary rows: see its own table |" in table


def test_update_docs_replaces_only_the_marked_block(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"intro\n{run_all.BEGIN}\nold\n{run_all.END}\noutro\n")

    run_all.update_docs("new table\n", docs)

    assert docs.read_text() == f"intro\n{run_all.BEGIN}\nnew table\n{run_all.END}\noutro\n"


def _tiny_oulad(folder: Path) -> None:
    folder.mkdir()
    tables = {
        "courses.csv": "code_module,code_presentation,module_presentation_length\nAAA,2013J,268\n",
        "assessments.csv": "code_module,code_presentation,id_assessment,assessment_type,date,"
        "weight\nAAA,2013J,1,TMA,19,10\n",
        "vle.csv": "id_site,code_module,code_presentation,activity_type,week_from,week_to\n"
        "7,AAA,2013J,resource,,\n",
        "studentInfo.csv": "code_module,code_presentation,id_student,final_result\n"
        "AAA,2013J,11,Pass\nAAA,2013J,12,Fail\n",
        "studentRegistration.csv": "code_module,code_presentation,id_student,"
        "date_registration,date_unregistration\nAAA,2013J,11,-5,\nAAA,2013J,12,-3,40\n",
        "studentAssessment.csv": "id_assessment,id_student,date_submitted,is_banked,score\n"
        "1,11,18,0,78\n",
        "studentVle.csv": "code_module,code_presentation,id_student,id_site,date,sum_click\n"
        "AAA,2013J,11,7,1,4\nAAA,2013J,12,7,2,1\nAAA,2013J,11,7,9,2\n",
    }
    for name, text in tables.items():
        (folder / name).write_text(text)


def test_oulad_variant_replicates_students_under_new_ids_and_repeats_log_rows(
    tmp_path: Path,
) -> None:
    _tiny_oulad(tmp_path / "sample")

    shape = make_variant(tmp_path / "sample", tmp_path / "big", students=2, repeat=3)

    assert shape == {"registrations": 4, "vle_rows": 18}
    info = (tmp_path / "big" / "studentInfo.csv").read_text().splitlines()
    assert [line.split(",")[2] for line in info[1:]] == ["11", "12", "10000011", "10000012"]
    assert len((tmp_path / "big" / "studentVle.csv").read_text().splitlines()) == 1 + 18


def test_projection_adds_the_cost_per_registration_to_the_peak_at_full_row_count() -> None:
    mib = 1024 * 1024
    points = [
        {"students_factor": 1, "registrations": 100, "vle_rows": 1_000, "peak_delta": 50 * mib},
        {"students_factor": 1, "registrations": 100, "vle_rows": 4_000, "peak_delta": 60 * mib},
        {"students_factor": 1, "registrations": 100, "vle_rows": 9_000, "peak_delta": 60 * mib},
        {"students_factor": 4, "registrations": 400, "vle_rows": 4_000, "peak_delta": 90 * mib},
    ]

    fit = _fit(points)

    assert fit is not None
    assert fit["mib_per_million_rows_at_top"] == 0.0
    assert fit["bytes_per_registration"] == pytest.approx(0.1 * mib)
    assert fit["projected_full_mib"] == pytest.approx(60 + 0.1 * (32_593 - 100))
