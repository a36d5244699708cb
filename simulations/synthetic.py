"""The synthetic consortium: the embedded default data set, generated, never downloaded.

A small generative model of a term at several universities. Latent *ability* and *engagement*
drive weekly attendance, LMS activity and quiz scores; some students disengage part-way through
the term (the at-risk pattern the seed papers look for); institutions differ in size, grading,
program mix, engagement and data quality (non-IID). About 5 % of cells are missing and a few
records are incomplete. The same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tomli_w

from shared_models.atomic import write_atomic, write_text_atomic
from shared_models.data.contract import FeatureSpec, default_spec

TERM_LABEL = "2025-autumn"
MANIFEST = "consortium.toml"


@dataclass(frozen=True)
class InstitutionProfile:
    """How one synthetic institution differs from the others (written to the manifest)."""

    name: str
    n_students: int
    grading_offset: float  # added to every final grade (GPA points): harsh or lenient grading
    engagement_level: float  # shift of latent engagement: campus culture, course design
    part_time_share: float
    missing_rate: float  # share of weekly cells left empty
    program_mix: tuple[float, ...]  # shares of the spec's programs


def make_profiles(
    n_institutions: int,
    n_students: int,
    seed: int,
    sizes: tuple[int, ...] | None = None,
) -> list[InstitutionProfile]:
    """Heterogeneous institutions whose sizes add up to ``n_students``.

    Args:
        sizes: each institution's number of students instead of random shares of
            ``n_students`` (which is then ignored); the other traits are drawn as usual.
    """
    if n_institutions < 1:
        raise ValueError("need at least one institution")
    if n_students < 20 * n_institutions:
        raise ValueError(f"need at least 20 students per institution ({20 * n_institutions})")
    if sizes is not None and (len(sizes) != n_institutions or min(sizes) < 20):
        raise ValueError(f"sizes must be {n_institutions} numbers of at least 20, got {sizes}")
    rng = np.random.default_rng([seed, 0])
    shares = rng.dirichlet(np.full(n_institutions, 3.0))
    if sizes is None:
        drawn = np.maximum(20, np.floor(shares * n_students)).astype(int)
        drawn[np.argmax(drawn)] += n_students - drawn.sum()
    else:  # the shares are still drawn, so every other trait is the same for a given seed
        drawn = np.asarray(sizes, dtype=int)
    sizes = tuple(int(v) for v in drawn)
    profiles = []
    for k in range(n_institutions):
        mix = rng.dirichlet(np.full(5, 1.5))
        profiles.append(
            InstitutionProfile(
                name=f"institution_{k + 1:02d}",
                n_students=int(sizes[k]),
                grading_offset=round(float(rng.normal(0.0, 0.25)), 3),
                engagement_level=round(float(rng.normal(0.0, 0.35)), 3),
                part_time_share=round(float(rng.uniform(0.08, 0.4)), 3),
                missing_rate=round(float(rng.uniform(0.03, 0.07)), 4),
                program_mix=tuple(round(float(m), 4) for m in mix),
            )
        )
    return profiles


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate_institution(
    profile: InstitutionProfile, spec: FeatureSpec, seed: int, index: int
) -> dict[str, pd.DataFrame]:
    """The students, activity and outcomes tables of one institution."""
    rng = np.random.default_rng([seed, 1, index])
    n, weeks = profile.n_students, spec.weeks
    cats = {a.name: a.categories for a in spec.static if a.kind == "categorical"}

    ability = rng.normal(0.0, 1.0, n)
    part_time = rng.random(n) < profile.part_time_share
    first_gen = rng.random(n) < 0.3
    mix = np.asarray(profile.program_mix)
    program = rng.choice(len(cats["program"]), n, p=mix / mix.sum())
    program_effect = np.array([-0.15, 0.05, 0.05, -0.05, 0.1])[program]
    age = np.where(
        part_time,
        rng.choice(4, n, p=[0.1, 0.25, 0.4, 0.25]),
        rng.choice(4, n, p=[0.55, 0.35, 0.08, 0.02]),
    )
    gender = rng.choice(4, n, p=[0.52, 0.44, 0.02, 0.02])

    engagement = (
        0.4 * ability
        + rng.normal(0.0, 0.85, n)
        + profile.engagement_level
        - 0.45 * part_time
        - 0.15 * first_gen
    )
    prior_gpa = np.clip(2.85 + 0.45 * ability + rng.normal(0.0, 0.5, n), 0.0, 4.0)

    # Disengagement: weaker, less engaged students are likelier to fade out from an onset week.
    fades = rng.random(n) < _sigmoid(-1.7 - 1.0 * engagement - 0.6 * ability)
    onset = rng.integers(3, weeks - 1, n)
    slope = rng.uniform(0.15, 0.5, n)
    t = np.arange(1, weeks + 1)[None, :]
    decline = np.where(fades[:, None], slope[:, None] * np.maximum(0, t - onset[:, None]), 0.0)
    noise = np.zeros((n, weeks))
    for w in range(weeks):  # AR(1) week-to-week wobble
        noise[:, w] = (0.6 * noise[:, w - 1] if w else 0.0) + rng.normal(0.0, 0.3, n)
    midterm_dip = np.where(t == weeks // 2 + 1, -0.3, 0.0)
    z = engagement[:, None] - decline + noise + midterm_dip

    withdrawn = fades & (onset < weeks * 0.6) & (z[:, -4:].mean(axis=1) < -2.0)
    withdrawn &= rng.random(n) < 0.7
    gone = withdrawn[:, None] & (t > onset[:, None] + 3)  # no activity after withdrawing
    active = np.where(gone, 0.0, 1.0)

    attendance = np.round(
        _sigmoid(1.1 + 1.1 * z - 0.5 * part_time[:, None] + rng.normal(0, 0.3, z.shape)) * active, 2
    )
    logins = rng.poisson(np.exp(1.6 + 0.5 * z)) * active
    lectures = rng.poisson(np.exp(0.9 + 0.45 * z)) * active
    resources = rng.poisson(np.exp(1.3 + 0.55 * z)) * active
    posts = rng.poisson(np.exp(-0.7 + 0.7 * z)) * active
    submitted = (rng.random(z.shape) < _sigmoid(1.6 + 1.5 * z)) * active
    quiz = np.round(
        100
        * _sigmoid(0.4 + 0.8 * ability[:, None] + 0.3 * z + rng.normal(0, 0.8, z.shape))
        * submitted,
        1,
    )

    late = z[:, -6:].mean(axis=1)
    # Missing three quizzes in a row costs more than the same misses spread out: a sequential
    # pattern that flattened linear baselines cannot express but recurrent models can.
    streak = _longest_run(submitted == 0) >= 3
    grade = (
        2.8
        + 0.5 * ability
        + 0.3 * late
        - 0.45 * streak
        + profile.grading_offset
        + program_effect
        + rng.normal(0.0, 0.6, n)
    )
    grade = np.round(np.clip(grade, 0.0, 4.0), 2)
    result = np.where(grade < 1.0, "fail", np.where(grade >= 3.6, "distinction", "pass"))
    result = np.where(withdrawn, "withdrawn", result).astype(object)
    final_grade = np.where(withdrawn, np.nan, grade)

    ids = np.array([_pseudonym(seed, index, i) for i in range(n)], dtype=object)
    students = pd.DataFrame(
        {
            "student_id": ids,
            "term": TERM_LABEL,
            "gender": np.asarray(cats["gender"], dtype=object)[gender],
            "age_band": np.asarray(cats["age_band"], dtype=object)[age],
            "program": np.asarray(cats["program"], dtype=object)[program],
            "enrolment": np.where(part_time, "part_time", "full_time").astype(object),
            "first_generation": np.where(first_gen, "yes", "no").astype(object),
            "prior_gpa": np.round(prior_gpa, 2),
        }
    )
    students.loc[rng.random(n) < 0.03, "prior_gpa"] = np.nan
    students.loc[rng.random(n) < 0.01, "age_band"] = None

    features = {
        "attendance_rate": attendance,
        "lms_logins": logins,
        "lectures_viewed": lectures,
        "resources_accessed": resources,
        "forum_posts": posts,
        "quiz_submitted": submitted.astype(float),
        "quiz_score": quiz,
    }
    activity = pd.DataFrame(
        {
            "student_id": np.repeat(ids, weeks),
            "term": TERM_LABEL,
            "week": np.tile(np.arange(1, weeks + 1), n),
        }
    )
    for name in spec.dynamic_names:
        values = features[name].reshape(-1).astype(float)
        values[rng.random(values.size) < profile.missing_rate] = np.nan
        counts = name not in ("attendance_rate", "quiz_score")
        activity[name] = pd.array(values, dtype="Int64") if counts else values
    # A few incomplete records (late registration, a broken LMS sync): most weeks absent.
    broken = np.flatnonzero(rng.random(n) < 0.02)
    lost_weeks = {
        int(i): set(rng.choice(weeks, int(weeks * 0.55), replace=False) + 1) for i in broken
    }
    drop = np.zeros(len(activity), dtype=bool)
    for i, lost in lost_weeks.items():
        rows = slice(i * weeks, (i + 1) * weeks)
        drop[rows] = np.isin(activity["week"].to_numpy()[rows], list(lost))
    activity = activity[~drop].reset_index(drop=True)

    outcomes = pd.DataFrame(
        {"student_id": ids, "term": TERM_LABEL, "final_grade": final_grade, "final_result": result}
    )
    return {"students": students, "activity": activity, "outcomes": outcomes}


def _longest_run(flags: np.ndarray) -> np.ndarray:
    """Length of the longest run of True along the last axis, per row."""
    best = np.zeros(flags.shape[0], dtype=int)
    run = np.zeros(flags.shape[0], dtype=int)
    for w in range(flags.shape[1]):
        run = np.where(flags[:, w], run + 1, 0)
        best = np.maximum(best, run)
    return best


def _pseudonym(seed: int, institution: int, i: int) -> str:
    return "s" + hashlib.sha256(f"edufl-synth:{seed}:{institution}:{i}".encode()).hexdigest()[:12]


def write_consortium(
    out_dir: Path,
    *,
    institutions: int = 4,
    students: int = 1200,
    weeks: int | None = None,
    seed: int = 0,
    spec: FeatureSpec | None = None,
    file_format: str = "csv",
    sizes: tuple[int, ...] | None = None,
) -> list[Path]:
    """Write one export per institution under ``out_dir`` and a manifest; returns the folders.

    Args:
        sizes: each institution's number of students (``students`` is then their sum);
            None: random shares of ``students``.
    """
    spec = spec or default_spec()
    if weeks is not None and weeks != spec.weeks:
        spec = spec.model_copy(update={"weeks": weeks})
    if file_format not in ("csv", "parquet"):
        raise ValueError("file_format must be 'csv' or 'parquet'")
    if sizes is not None:
        students = sum(sizes)
    profiles = make_profiles(institutions, students, seed, sizes)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for k, profile in enumerate(profiles):
        tables = generate_institution(profile, spec, seed, k)
        folder = out_dir / profile.name
        folder.mkdir(exist_ok=True)
        for name, frame in tables.items():
            _write_atomic(frame, folder / f"{name}.{file_format}")
        written.append(folder)
    manifest = {
        "generator": "edufl synthetic consortium",
        "seed": seed,
        "weeks": spec.weeks,
        "spec_fingerprint": spec.fingerprint,
        "institutions": [asdict(p) for p in profiles],
    }
    write_text_atomic(out_dir / MANIFEST, tomli_w.dumps(manifest))
    return written


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    if path.suffix == ".parquet":
        write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
    else:
        write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))
