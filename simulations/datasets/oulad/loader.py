"""OULAD, the Open University Learning Analytics Dataset, as institution exports.

Kuzilek, Hlosta, Zdrahal (2017), Scientific Data 4:170171, CC BY 4.0. Reads the official download
(a folder of its seven CSVs, or the zip) and streams ``studentVle.csv`` (10.6 M rows in full) in
chunks into one (weeks x activity types) click map per registration, so memory grows with the
number of registrations, not of log rows. A record is one registration: (student, module
presentation); ``term`` is ``"AAA-2013J"``. How weeks, withdrawals, banked assessments and the
grade are built is documented in ``spec.toml`` beside this file; in short:

- day d (from the presentation start) falls in week ``d // 7 + 1``; earlier days fold into week 1;
- after unregistering a student has zero clicks; events recorded after that day are dropped;
- a banked assessment (``is_banked``, carried over from an earlier attempt) counts as submitted
  with its score from the start, and has no submission delay;
- ``week=K`` builds the data as known at the end of week K: later clicks, submissions and
  registrations are left out, and the contract has K weeks. Labels are always the final ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared_models.data.contract import FeatureSpec, load_spec
from shared_models.errors import DataContractError
from simulations.datasets.oulad.tables import STATIC, read_registrations, read_timeline
from simulations.datasets.sources import DatasetFiles, integers
from simulations.partition import PooledTables, export_partitions

log = logging.getLogger(__name__)

NAME = "oulad"
SPEC_PATH = Path(__file__).resolve().parent / "spec.toml"
CITATION = "Kuzilek, Hlosta, Zdrahal (2017), Scientific Data 4:170171; CC BY 4.0"
NATURAL_PARTITIONS = {
    "natural-module": "one institution per module (AAA-GGG: 7 in the full dataset)",
    "natural-presentation": "one per module presentation (AAA-2013J ...: 22 in the full dataset)",
}
DEFAULT_PARTITION = "natural-presentation"
FILES = (
    "courses.csv",
    "assessments.csv",
    "vle.csv",
    "studentInfo.csv",
    "studentRegistration.csv",
    "studentAssessment.csv",
    "studentVle.csv",
)
WEEKS = 39
ACTIVITY_TYPES = (
    "dataplus", "dualpane", "externalquiz", "folder", "forumng", "glossary", "homepage",
    "htmlactivity", "oucollaborate", "oucontent", "ouelluminate", "ouwiki", "page",
    "questionnaire", "quiz", "repeatactivity", "resource", "sharedsubpage", "subpage", "url",
)  # fmt: skip
ASSESSMENT_FEATURES = ("assessments_submitted", "assessment_score", "submission_delay")
_STUDENT_BASE = 10**9  # registration key = presentation index * base + id_student


@dataclass(frozen=True)
class OuladCohort:
    """One row per registration, with its weekly maps and assessment timeline.

    Attributes:
        registrations: code_module, code_presentation, id_student, term, length (days) and
            weeks of the presentation, date_registration, date_unregistration, the static
            attributes, final_result (lower-case), final_grade; in studentInfo.csv's order.
        clicks: (n, WEEKS, len(ACTIVITY_TYPES)) clicks per week and VLE activity type.
        assessment: (n, WEEKS, len(ASSESSMENT_FEATURES)) weekly assessment features, NaN where
            nothing is due (or nothing submitted, for score and delay).
        timeline: one row per registration (``reg``: row of ``registrations``) and assessment
            due: id_assessment, assessment_type, due_day, due_week, weight, date_submitted,
            is_banked, score.
        week: the cut-off week, or None for the whole presentation.
    """

    registrations: pd.DataFrame
    clicks: np.ndarray
    assessment: np.ndarray
    timeline: pd.DataFrame
    week: int | None

    @property
    def horizon(self) -> np.ndarray:
        """Observed weeks of each registration: its presentation's, capped at the cut-off."""
        weeks = self.registrations["weeks"].to_numpy()
        return np.minimum(weeks, self.week) if self.week else weeks


def spec(week: int | None = None) -> FeatureSpec:
    """The OULAD contract; with ``week`` the "as of week K" variant (K weeks)."""
    base = load_spec(SPEC_PATH)
    if week is None:
        return base
    _check_week(week)
    return base.model_copy(
        update={"weeks": week, "description": f"{base.description} As of week {week}."}
    )


def read(
    path: Path | str,
    *,
    week: int | None = None,
    modules: tuple[str, ...] | None = None,
    chunksize: int = 250_000,
) -> OuladCohort:
    """Read the download at ``path`` (folder or zip), optionally only some ``modules``."""
    if week is not None:
        _check_week(week)
    last_day = 7 * week - 1 if week else np.inf
    files = DatasetFiles(path, FILES, "OULAD")
    contract = load_spec(SPEC_PATH)
    regs = read_registrations(files, contract, weeks=WEEKS, modules=modules, last_day=last_day)
    n = len(regs)
    pres = pd.Index(regs["term"].unique())
    reg_key = pd.Index(pres.get_indexer(regs["term"]) * _STUDENT_BASE + regs["id_student"])
    sites = files.read_text(
        "vle.csv", ("id_site", "code_module", "code_presentation", "activity_type")
    )
    site_ids = integers(sites["id_site"], "id_site", files.where("vle.csv"))
    if pd.Index(site_ids).has_duplicates:
        raise DataContractError(f"{files.where('vle.csv')}: id_site values repeat; expected unique")
    site_type = pd.Index(ACTIVITY_TYPES).get_indexer(sites["activity_type"])
    if (site_type < 0).any():
        row = int(np.flatnonzero(site_type < 0)[0])
        raise DataContractError(
            f"{files.where('vle.csv')} line {row + 2}, column 'activity_type': "
            f"'{sites['activity_type'].iat[row]}' is not one of the {len(ACTIVITY_TYPES)} known "
            "OULAD activity types; add it to simulations/datasets/oulad/loader.py and the spec"
        )
    site_pres = pres.get_indexer(sites["code_module"] + "-" + sites["code_presentation"])

    clicks = np.zeros((n, WEEKS, len(ACTIVITY_TYPES)), dtype=np.int32)
    flat = clicks.reshape(-1)
    site_index = pd.Index(site_ids.astype(np.int64))
    weeks = regs["weeks"].to_numpy()
    until = np.fmin(regs["date_unregistration"].to_numpy(), last_day)
    until = np.where(np.isnan(until), np.inf, until)
    offset = 0
    for chunk in files.chunks(
        "studentVle.csv", ("id_student", "id_site", "date", "sum_click"), chunksize
    ):
        site = site_index.get_indexer(chunk["id_site"].to_numpy())
        if (site < 0).any():
            row = offset + int(np.flatnonzero(site < 0)[0])
            raise DataContractError(
                f"{files.where('studentVle.csv')} line {row + 2}, column 'id_site': "
                f"{chunk['id_site'].iat[row - offset]} is not in vle.csv"
            )
        reg = reg_key.get_indexer(site_pres[site] * _STUDENT_BASE + chunk["id_student"].to_numpy())
        day = chunk["date"].to_numpy()
        keep = reg >= 0
        keep[keep] &= day[keep] <= until[reg[keep]]
        reg, day = reg[keep], day[keep]
        wk = np.clip(day // 7, 0, weeks[reg] - 1)
        cell = (reg * WEEKS + wk) * len(ACTIVITY_TYPES) + site_type[site[keep]]
        sums = pd.Series(chunk["sum_click"].to_numpy()[keep]).groupby(cell).sum()
        flat[sums.index.to_numpy()] += sums.to_numpy()
        offset += len(chunk)
    log.info("studentVle.csv: %d rows streamed into %d registrations", offset, n)

    timeline = read_timeline(files, regs)
    assessment = _assessment_features(timeline, regs, last_day, n)
    regs["final_grade"] = _grade(timeline, n)
    return OuladCohort(regs, clicks, assessment, timeline, week)


def load(
    path: Path | str,
    *,
    week: int | None = None,
    modules: tuple[str, ...] | None = None,
    chunksize: int = 250_000,
) -> PooledTables:
    """The download as pooled export tables (see `read` for the arguments)."""
    return to_tables(read(path, week=week, modules=modules, chunksize=chunksize))


def to_tables(cohort: OuladCohort) -> PooledTables:
    """Export tables of a cohort: one activity row per registration and observed week."""
    regs = cohort.registrations
    ids = regs["id_student"].astype("int64").astype(str).to_numpy()
    students = pd.DataFrame({"student_id": ids, "term": regs["term"].to_numpy()})
    for attr in STATIC:
        students[attr] = regs[attr].to_numpy()
    horizon = cohort.horizon
    rec = np.repeat(np.arange(len(regs)), horizon)
    wk = np.concatenate([np.arange(h) for h in horizon]) if len(regs) else np.zeros(0, int)
    activity = pd.DataFrame({"student_id": ids[rec], "term": regs["term"].to_numpy()[rec]})
    activity["week"] = wk + 1
    maps = cohort.clicks[rec, wk]
    for j, kind in enumerate(ACTIVITY_TYPES):
        activity[f"clicks_{kind}"] = maps[:, j]
    feats = cohort.assessment[rec, wk]
    for j, name in enumerate(ASSESSMENT_FEATURES):
        activity[name] = np.round(feats[:, j], 2)
    outcomes = pd.DataFrame(
        {
            "student_id": ids,
            "term": regs["term"].to_numpy(),
            "final_grade": regs["final_grade"].round(2).to_numpy(),
            "final_result": regs["final_result"].to_numpy(),
        }
    )
    groups = {
        "natural-module": regs["code_module"].to_numpy(dtype=object),
        "natural-presentation": regs["term"].to_numpy(dtype=object),
    }
    return PooledTables(students, activity, outcomes, groups)


def to_exports(
    path: Path | str,
    out_dir: Path,
    *,
    partition: str = DEFAULT_PARTITION,
    week: int | None = None,
    seed: int = 0,
    alpha: float = 0.5,
    clients: int | None = None,
    modules: tuple[str, ...] | None = None,
) -> list[Path]:
    """Write one institution export per part of ``partition`` into ``out_dir``."""
    contract = spec(week)
    tables = load(path, week=week, modules=modules)
    about = {"dataset": NAME, "source": str(path), "citation": CITATION}
    return export_partitions(
        tables, contract, out_dir, partition, seed=seed, alpha=alpha, clients=clients, about=about
    )


def _check_week(week: int) -> None:
    if not 1 <= week <= WEEKS:
        raise DataContractError(f"the cut-off week must be between 1 and {WEEKS}, got {week}")


def _assessment_features(
    tl: pd.DataFrame, regs: pd.DataFrame, last_day: float, n: int
) -> np.ndarray:
    until = regs["date_unregistration"].to_numpy()[tl["reg"].to_numpy()]
    day = tl["date_submitted"].to_numpy()
    banked = tl["is_banked"].to_numpy() == 1
    on_time = (day <= last_day) & ~(day > until)  # NaN until: never unregistered
    known = tl["date_submitted"].notna().to_numpy() & (banked | on_time)
    due = tl["due_week"].to_numpy()
    frame = pd.DataFrame(
        {
            "reg": tl["reg"].to_numpy(),
            "week": due,
            "submitted": known.astype(float),
            "score": np.where(known, tl["score"].to_numpy(), np.nan),
            "delay": np.where(known & ~banked, day - tl["due_day"].to_numpy(), np.nan),
        }
    )[due <= (last_day + 1) / 7]
    out = np.full((n, WEEKS, len(ASSESSMENT_FEATURES)), np.nan)
    agg = frame.groupby(["reg", "week"])[["submitted", "score", "delay"]].mean()
    r, w = (agg.index.get_level_values(k).to_numpy() for k in ("reg", "week"))
    out[r, w - 1] = agg.to_numpy()
    return out


def _grade(tl: pd.DataFrame, n: int) -> np.ndarray:
    """Weighted assessment score 0-100; a missing submission scores 0, a missing score is skipped.

    All assessments of the registration's presentation count, whatever the cut-off: the grade is
    a label. Where every weight is 0 (some modules weigh only an unrecorded exam) all weigh 1.
    """
    submitted = tl["date_submitted"].notna() | (tl["is_banked"] == 1)
    score = tl["score"].where(submitted, 0.0)
    weight = tl["weight"].where(score.notna(), np.nan)
    total = weight.groupby(tl["reg"]).transform("sum")
    weight = weight.where(total > 0, score.notna().astype(float))
    num = (weight * score.fillna(0.0)).groupby(tl["reg"]).sum(min_count=1)
    den = weight.groupby(tl["reg"]).sum(min_count=1)
    grade = np.full(n, np.nan)
    ratio = num / den
    grade[ratio.index.to_numpy()] = ratio.to_numpy()
    return grade
