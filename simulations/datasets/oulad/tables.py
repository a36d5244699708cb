"""Reading OULAD's small tables: registrations with their attributes, and assessments.

Every value is checked as it is read; a bad one is reported with its file, line and column.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from shared_models.data.contract import FeatureSpec
from shared_models.errors import DataContractError
from simulations.datasets.sources import DatasetFiles, category, integers, numbers

log = logging.getLogger(__name__)

KEY = ["code_module", "code_presentation", "id_student"]
STATIC = (
    "gender", "region", "highest_education", "imd_band", "age_band", "num_of_prev_attempts",
    "studied_credits", "disability",
)  # fmt: skip


def read_registrations(
    files: DatasetFiles,
    contract: FeatureSpec,
    *,
    weeks: int,
    modules: tuple[str, ...] | None,
    last_day: float,
) -> pd.DataFrame:
    """studentInfo joined with studentRegistration and courses, one row per registration.

    ``weeks`` caps a presentation's length in weeks; registrations made after ``last_day`` (the
    cut-off) are left out: at the cut-off they do not exist yet.
    """
    info = files.read_text("studentInfo.csv", (*KEY, *STATIC, "final_result"))
    where = files.where("studentInfo.csv")
    info["id_student"] = integers(info["id_student"], "id_student", where).astype("int64")
    for col in ("num_of_prev_attempts", "studied_credits"):
        info[col] = pd.array(integers(info[col], col, where, allow_missing=True), dtype="Int64")
    # OULAD writes one band without its percent sign, and "?" for an unknown band.
    info["imd_band"] = info["imd_band"].replace({"10-20": "10-20%"})
    for attr in contract.static:
        if attr.kind == "categorical":
            info[attr.name] = category(info[attr.name], attr.categories, attr.name, where)
    results = contract.target.results
    info["final_result"] = info["final_result"].str.lower()
    bad = ~info["final_result"].isin(results)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataContractError(
            f"{where} line {row + 2}, column 'final_result': "
            f"'{info['final_result'].iat[row]}' is not one of {', '.join(results)}"
        )
    dupes = info.duplicated(KEY)
    if dupes.any():
        row = int(np.flatnonzero(dupes)[0])
        raise DataContractError(f"{where} line {row + 2}: registration repeated; keep one row")

    reg = files.read_text(
        "studentRegistration.csv", (*KEY, "date_registration", "date_unregistration")
    )
    rwhere = files.where("studentRegistration.csv")
    reg["id_student"] = integers(reg["id_student"], "id_student", rwhere).astype("int64")
    for col in ("date_registration", "date_unregistration"):
        reg[col] = integers(reg[col], col, rwhere, allow_missing=True)
    courses = files.read_text(
        "courses.csv", ("code_module", "code_presentation", "module_presentation_length")
    )
    length = integers(
        courses["module_presentation_length"],
        "module_presentation_length",
        files.where("courses.csv"),
    )
    repeated = courses.duplicated(["code_module", "code_presentation"])
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise DataContractError(
            f"{files.where('courses.csv')} line {row + 2}: {courses['code_module'].iat[row]} "
            f"{courses['code_presentation'].iat[row]} repeated; keep one row per presentation"
        )
    courses["length"] = length.astype(int)
    courses["weeks"] = np.minimum(weeks, courses["length"] // 7 + 1)

    if modules is not None:
        info = info[info["code_module"].isin(modules)]
        if info.empty:
            raise DataContractError(f"{where}: no registrations of module(s) {list(modules)}")
    regs = info.merge(reg.drop_duplicates(KEY), on=KEY, how="left", validate="one_to_one")
    regs = regs.merge(courses[["code_module", "code_presentation", "length", "weeks"]], how="left")
    if regs["weeks"].isna().any():
        row = regs[regs["weeks"].isna()].iloc[0]
        raise DataContractError(
            f"{files.where('courses.csv')}: no length for {row['code_module']} "
            f"{row['code_presentation']}; the download is incomplete"
        )
    regs[["length", "weeks"]] = regs[["length", "weeks"]].astype(int)
    regs["term"] = regs["code_module"] + "-" + regs["code_presentation"]
    late = regs["date_registration"] > last_day  # not yet registered at the cut-off
    return regs[~late.to_numpy()].reset_index(drop=True)


def read_timeline(files: DatasetFiles, regs: pd.DataFrame) -> pd.DataFrame:
    """Every (registration, assessment with a recorded result) of the registration's module."""
    cols = (
        "code_module",
        "code_presentation",
        "id_assessment",
        "assessment_type",
        "date",
        "weight",
    )
    tasks = files.read_text("assessments.csv", cols)
    where = files.where("assessments.csv")
    tasks["id_assessment"] = integers(tasks["id_assessment"], "id_assessment", where).astype(
        "int64"
    )
    tasks["due_day"] = integers(tasks["date"], "date", where, allow_missing=True)
    tasks["weight"] = numbers(tasks["weight"], "weight", where)
    sub = files.read_text(
        "studentAssessment.csv",
        ("id_assessment", "id_student", "date_submitted", "is_banked", "score"),
    )
    swhere = files.where("studentAssessment.csv")
    for col in ("id_assessment", "id_student", "is_banked"):
        sub[col] = integers(sub[col], col, swhere).astype("int64")
    sub["date_submitted"] = integers(
        sub["date_submitted"], "date_submitted", swhere, allow_missing=True
    )
    sub["score"] = numbers(sub["score"], "score", swhere)
    if sub.duplicated(["id_assessment", "id_student"]).any():
        log.warning("%s: repeated (assessment, student) rows; the first of each is used", swhere)
        sub = sub.drop_duplicates(["id_assessment", "id_student"])
    # OULAD leaves some exams out of studentAssessment.csv: an assessment nobody has a result
    # for would read as "nobody submitted", so it is left out of features and grade alike.
    tasks = tasks[tasks["id_assessment"].isin(sub["id_assessment"])]

    frame = regs[["code_module", "code_presentation", "id_student", "length", "weeks"]].copy()
    frame["reg"] = np.arange(len(regs))
    tl = frame.merge(tasks, on=["code_module", "code_presentation"])
    tl = tl.merge(sub, on=["id_assessment", "id_student"], how="left")
    # An exam without a date is held at the end of the presentation (OULAD documentation).
    tl["due_day"] = tl["due_day"].fillna(tl["length"].astype(float))
    tl["due_week"] = np.clip(tl["due_day"].to_numpy() // 7 + 1, 1, tl["weeks"].to_numpy()).astype(
        int
    )
    tl["is_banked"] = tl["is_banked"].fillna(0).astype(int)
    keep = ["reg", "id_assessment", "assessment_type", "due_day", "due_week", "weight"]
    tl = tl[[*keep, "date_submitted", "is_banked", "score"]].sort_values(["reg", "due_day"])
    return tl.reset_index(drop=True)
