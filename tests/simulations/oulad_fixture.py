"""A tiny OULAD download, written in OULAD's own CSV dialect, with every quirk the loader handles.

Every field is double-quoted, lines end in CRLF and a missing value is ``""``, as in the real
files. Registrations (``code_presentation`` length → weeks):

- AAA-2013J (268 days, 39 weeks): 101 passes, with clicks before the start (days -10 and -3 fold
  into week 1) and a late TMA; 102 withdraws on day 40 and has no activity after it; 103
  withdraws on day 50 but a stray click on day 60 is logged; 104 has imd_band "?" and no VLE
  activity at all; 105 registers late (day 30); 106 has imd_band "" and a missing score.
- AAA-2014J (234 days, 34 weeks): 101 again (a retake), with a banked TMA; 107 has imd_band
  "10-20" (OULAD's band without its percent sign).
- BBB-2014B (241 days, 35 weeks): 201 fails; 202 passes with distinction. BBB's exam has no date
  (held on the last day) but recorded results; AAA's exams have no results at all.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

FILES = {
    "courses.csv": [
        ["code_module", "code_presentation", "module_presentation_length"],
        ["AAA", "2013J", "268"],
        ["AAA", "2014J", "234"],
        ["BBB", "2014B", "241"],
    ],
    "assessments.csv": [
        ["code_module", "code_presentation", "id_assessment", "assessment_type", "date", "weight"],
        ["AAA", "2013J", "1", "TMA", "19", "40"],
        ["AAA", "2013J", "2", "TMA", "54", "60"],
        ["AAA", "2013J", "3", "Exam", "", "100"],
        ["AAA", "2014J", "4", "TMA", "19", "50"],
        ["AAA", "2014J", "5", "TMA", "54", "50"],
        ["AAA", "2014J", "6", "Exam", "", "100"],
        ["BBB", "2014B", "7", "CMA", "10", "0"],
        ["BBB", "2014B", "8", "Exam", "", "100"],
    ],
    "vle.csv": [
        ["id_site", "code_module", "code_presentation", "activity_type", "week_from", "week_to"],
        ["11", "AAA", "2013J", "resource", "", ""],
        ["12", "AAA", "2013J", "forumng", "1", "2"],
        ["13", "AAA", "2013J", "quiz", "", ""],
        ["21", "AAA", "2014J", "oucontent", "", ""],
        ["31", "BBB", "2014B", "url", "", ""],
        ["32", "BBB", "2014B", "repeatactivity", "", ""],
    ],
    "studentInfo.csv": [
        [
            "code_module", "code_presentation", "id_student", "gender", "region",
            "highest_education", "imd_band", "age_band", "num_of_prev_attempts",
            "studied_credits", "disability", "final_result",
        ],
        ["AAA", "2013J", "101", "M", "Scotland", "HE Qualification", "90-100%", "55<=", "0", "240", "N", "Pass"],  # noqa: E501
        ["AAA", "2013J", "102", "F", "Wales", "A Level or Equivalent", "20-30%", "35-55", "0", "60", "Y", "Withdrawn"],  # noqa: E501
        ["AAA", "2013J", "103", "F", "Ireland", "Lower Than A Level", "0-10%", "0-35", "1", "120", "N", "Withdrawn"],  # noqa: E501
        ["AAA", "2013J", "104", "M", "London Region", "No Formal quals", "?", "0-35", "0", "60", "N", "Fail"],  # noqa: E501
        ["AAA", "2013J", "105", "F", "North Region", "HE Qualification", "50-60%", "35-55", "0", "60", "N", "Pass"],  # noqa: E501
        ["AAA", "2013J", "106", "M", "Wales", "Post Graduate Qualification", "", "0-35", "0", "90", "N", "Pass"],  # noqa: E501
        ["AAA", "2014J", "101", "M", "Scotland", "HE Qualification", "90-100%", "55<=", "1", "240", "N", "Distinction"],  # noqa: E501
        ["AAA", "2014J", "107", "F", "Yorkshire Region", "A Level or Equivalent", "10-20", "0-35", "0", "60", "N", "Pass"],  # noqa: E501
        ["BBB", "2014B", "201", "F", "South Region", "Lower Than A Level", "30-40%", "0-35", "2", "30", "N", "Fail"],  # noqa: E501
        ["BBB", "2014B", "202", "M", "Wales", "HE Qualification", "60-70%", "35-55", "0", "60", "N", "Distinction"],  # noqa: E501
    ],
    "studentRegistration.csv": [
        ["code_module", "code_presentation", "id_student", "date_registration", "date_unregistration"],  # noqa: E501
        ["AAA", "2013J", "101", "-159", ""],
        ["AAA", "2013J", "102", "-53", "40"],
        ["AAA", "2013J", "103", "-92", "50"],
        ["AAA", "2013J", "104", "-52", ""],
        ["AAA", "2013J", "105", "30", ""],
        ["AAA", "2013J", "106", "-10", ""],
        ["AAA", "2014J", "101", "-20", ""],
        ["AAA", "2014J", "107", "-30", ""],
        ["BBB", "2014B", "201", "-40", ""],
        ["BBB", "2014B", "202", "-25", ""],
    ],
    "studentAssessment.csv": [
        ["id_assessment", "id_student", "date_submitted", "is_banked", "score"],
        ["1", "101", "25", "0", "80"],  # due day 19, submitted 6 days late (week 4)
        ["2", "101", "50", "0", "70"],
        ["1", "102", "18", "0", "40"],
        ["1", "103", "19", "0", "55"],
        ["2", "103", "53", "0", "90"],  # after unregistering on day 50: not an input
        ["1", "105", "33", "0", "60"],
        ["2", "105", "54", "0", "65"],
        ["1", "106", "19", "0", ""],  # submitted, score missing
        ["2", "106", "52", "0", "75"],
        ["4", "101", "-1", "1", "77"],  # banked from the 2013J attempt
        ["5", "101", "52", "0", "90"],
        ["4", "107", "20", "0", "66"],
        ["7", "201", "9", "0", "30"],
        ["8", "201", "241", "0", "20"],
        ["7", "202", "10", "0", "95"],
        ["8", "202", "240", "0", "91"],
    ],
    "studentVle.csv": [
        ["code_module", "code_presentation", "id_student", "id_site", "date", "sum_click"],
        ["AAA", "2013J", "101", "11", "-10", "4"],
        ["AAA", "2013J", "101", "11", "-3", "1"],
        ["AAA", "2013J", "101", "11", "3", "2"],
        ["AAA", "2013J", "101", "12", "3", "5"],
        ["AAA", "2013J", "101", "13", "8", "7"],
        ["AAA", "2013J", "101", "11", "267", "1"],
        ["AAA", "2013J", "102", "11", "-5", "2"],
        ["AAA", "2013J", "102", "12", "38", "3"],
        ["AAA", "2013J", "103", "12", "49", "1"],
        ["AAA", "2013J", "103", "12", "60", "9"],  # after unregistering on day 50: dropped
        ["AAA", "2013J", "105", "13", "31", "2"],
        ["AAA", "2013J", "106", "11", "0", "1"],
        ["AAA", "2014J", "101", "21", "-24", "3"],
        ["AAA", "2014J", "101", "21", "233", "2"],
        ["AAA", "2014J", "107", "21", "14", "6"],
        ["BBB", "2014B", "201", "31", "1", "1"],
        ["BBB", "2014B", "202", "31", "1", "2"],
        ["BBB", "2014B", "202", "32", "240", "4"],
    ],
}  # fmt: skip


def _encode(rows: list[list[str]]) -> bytes:
    return "".join(",".join(f'"{v}"' for v in row) + "\r\n" for row in rows).encode()


def write_oulad(folder: Path, changes: dict[str, list[list[str]]] | None = None) -> Path:
    """The seven CSVs in ``folder`` (``changes`` replaces whole tables); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in {**FILES, **(changes or {})}.items():
        (folder / name).write_bytes(_encode(rows))
    return folder


def zip_oulad(folder: Path, archive: Path, prefix: str = "anonymisedData/") -> Path:
    """The CSVs of ``folder`` in a zip, under ``prefix`` as a downloaded archive may have them."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in FILES:
            zf.write(folder / name, prefix + name)
    return archive
