"""The local store (SQLite, stdlib ``sqlite3``): scoring runs, scores, reasons, recommendations
and what advisors did about them.

Everything stays on the institution's machine and holds pseudonymous IDs only. Each write is
one transaction, so a crash leaves either a whole scoring run or none of it. The schema version
lives in ``PRAGMA user_version``; a database written by a newer edufl is refused rather than
misread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared_models.errors import EduflError

if TYPE_CHECKING:  # annotations only: `edufl client actions` runs without torch
    from client.early_warning.reasons import Reason
    from client.early_warning.rules import Recommendation
    from client.early_warning.scoring import Scores

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: What an advisor can record about a flagged student.
ACTIONS: tuple[str, ...] = ("contacted", "referred", "dismissed-not-useful", "dismissed-incorrect")

_SCHEMA = """
CREATE TABLE runs (
    run_id INTEGER PRIMARY KEY,
    created_at TEXT NOT NULL,
    data_dir TEXT NOT NULL,
    model_dir TEXT NOT NULL,
    model_name TEXT NOT NULL,
    observed_weeks INTEGER NOT NULL,
    threshold_moderate REAL NOT NULL,
    threshold_high REAL NOT NULL,
    rules TEXT NOT NULL,
    n_scored INTEGER NOT NULL,
    n_unscored INTEGER NOT NULL
);
CREATE TABLE scores (
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    student_id TEXT NOT NULL,
    term TEXT NOT NULL,
    probability REAL NOT NULL,
    grade REAL,
    tier TEXT NOT NULL CHECK (tier IN ('low', 'moderate', 'high')),
    PRIMARY KEY (run_id, student_id, term)
);
CREATE INDEX scores_by_student ON scores(student_id, run_id);
CREATE TABLE reasons (
    run_id INTEGER NOT NULL,
    student_id TEXT NOT NULL,
    term TEXT NOT NULL,
    rank INTEGER NOT NULL,
    feature TEXT NOT NULL,
    window TEXT NOT NULL,
    contribution REAL NOT NULL,
    text TEXT NOT NULL,
    PRIMARY KEY (run_id, student_id, term, rank),
    FOREIGN KEY (run_id, student_id, term) REFERENCES scores(run_id, student_id, term)
);
CREATE TABLE recommendations (
    run_id INTEGER NOT NULL,
    student_id TEXT NOT NULL,
    term TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    priority INTEGER NOT NULL,
    owner TEXT NOT NULL,
    action TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (run_id, student_id, term, rule_id),
    FOREIGN KEY (run_id, student_id, term) REFERENCES scores(run_id, student_id, term)
);
CREATE TABLE actions (
    action_id INTEGER PRIMARY KEY,
    student_id TEXT NOT NULL,
    term TEXT NOT NULL,
    run_id INTEGER NOT NULL REFERENCES runs(run_id),
    action TEXT NOT NULL CHECK (action IN
        ('contacted', 'referred', 'dismissed-not-useful', 'dismissed-incorrect')),
    note TEXT NOT NULL DEFAULT '',
    recorded_at TEXT NOT NULL
);
CREATE INDEX actions_by_student ON actions(student_id);
"""


class StoreError(EduflError, RuntimeError):
    """The store cannot be used as asked (newer schema, unknown student, bad action)."""


@dataclass(frozen=True)
class RunInfo:
    """Where a scoring run came from (the ``runs`` row apart from counts and time)."""

    data_dir: str
    model_dir: str
    model_name: str
    rules: str  # the rule file's path, or "default rules"


@dataclass(frozen=True)
class ActionRecord:
    """One advisor action and the score that prompted it."""

    action_id: int
    student_id: str
    term: str
    action: str
    note: str
    recorded_at: str  # ISO 8601, UTC
    run_id: int
    tier: str
    probability: float


class Store:
    """A connection to one store file; use as a context manager or call `close`.

    Args:
        path: the SQLite file.
        create: create the file when missing; when False, a missing file is a `StoreError`
            (recording an action in a store no run was ever saved to is a wrong path).
    """

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(
                f"{self.path}: no store here; score students first (`edufl client score`) "
                "or pass the store's --db"
            )
        try:
            # Students' risk scores: a new folder and file are the owner's only (0700/0600);
            # SQLite gives its journal files the database's mode.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the store's folder ({exc})") from None
        try:
            self._db = sqlite3.connect(self.path)
        except sqlite3.Error as exc:
            raise StoreError(
                f"{self.path}: cannot open the store ({exc}); use another --db"
            ) from None
        try:
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate(create)
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"{self.path}: not an edufl store ({exc}); use another --db") from None
        except BaseException:
            self._db.close()
            raise

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def _migrate(self, create: bool) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by a newer edufl (schema {version}, this one reads "
                f"{SCHEMA_VERSION}); upgrade edufl"
            )
        if version == 0:
            tables = self._db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
            ).fetchone()[0]
            if tables:  # another program's database: never add tables to it
                raise StoreError(
                    f"{self.path}: an SQLite database, but not an edufl store (it holds "
                    f"{tables} other table(s)); pass a new file or an existing store as --db"
                )
            if not create:  # an empty file: nothing was ever scored into it
                raise StoreError(
                    f"{self.path}: an empty file, not an edufl store; score students first "
                    "(`edufl client score`) or pass the store's --db"
                )
            with self._db:  # executescript commits first; the explicit BEGIN keeps it atomic
                self._db.executescript(
                    f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
                )
            logger.info("%s: created store schema %d", self.path, SCHEMA_VERSION)

    def save_run(
        self,
        info: RunInfo,
        scores: Scores,
        reasons: Sequence[Sequence[Reason]],
        recommendations: Sequence[Sequence[Recommendation]],
        unscored: int = 0,
    ) -> int:
        """Write a whole scoring run in one transaction; returns its ``run_id``."""
        if not len(reasons) == len(recommendations) == len(scores):
            raise ValueError("scores, reasons and recommendations must have one entry per student")
        ids = [str(s) for s in scores.student_ids]
        terms = [str(t) for t in scores.terms]
        with self._errors(), self._db:
            cursor = self._db.execute(
                "INSERT INTO runs (created_at, data_dir, model_dir, model_name, observed_weeks,"
                " threshold_moderate, threshold_high, rules, n_scored, n_unscored)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    _now(),
                    info.data_dir,
                    info.model_dir,
                    info.model_name,
                    scores.observed_weeks,
                    scores.thresholds.moderate,
                    scores.thresholds.high,
                    info.rules,
                    len(scores),
                    unscored,
                ),
            )
            run_id = int(cursor.lastrowid or 0)
            self._db.executemany(
                "INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?)",
                (
                    (run_id, s, t, float(p), None if g != g else float(g), str(tier))
                    for s, t, p, g, tier in zip(
                        ids, terms, scores.probability, scores.grade, scores.tier, strict=True
                    )
                ),
            )
            self._db.executemany(
                "INSERT INTO reasons VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (run_id, s, t, rank, r.feature, r.window, r.contribution, r.text)
                    for s, t, mine in zip(ids, terms, reasons, strict=True)
                    for rank, r in enumerate(mine, start=1)
                ),
            )
            self._db.executemany(
                "INSERT INTO recommendations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (run_id, s, t, r.rule_id, r.priority, r.owner, r.action, r.message)
                    for s, t, mine in zip(ids, terms, recommendations, strict=True)
                    for r in mine
                ),
            )
        logger.info("%s: saved run %d (%d students)", self.path, run_id, len(scores))
        return run_id

    def runs(self) -> list[dict[str, Any]]:
        """Every scoring run, newest first."""
        with self._errors():
            return list(self._rows("SELECT * FROM runs ORDER BY run_id DESC"))

    def record_action(
        self, student_id: str, action: str, note: str = "", term: str | None = None
    ) -> ActionRecord:
        """Record what an advisor did about a student's latest score.

        Raises:
            StoreError: an unknown action, or a student no run has scored (a mistyped ID).
        """
        if action not in ACTIONS:
            raise StoreError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
        latest = self._latest_score(student_id, term)
        if latest is None:
            raise StoreError(
                f"{self.path}: no scoring run has scored student {student_id!r}"
                + (f" in term {term!r}" if term else "")
                + "; copy the ID from the report or `edufl client actions list`"
            )
        with self._errors(), self._db:
            cursor = self._db.execute(
                "INSERT INTO actions (student_id, term, run_id, action, note, recorded_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (student_id, latest["term"], latest["run_id"], action, note, _now()),
            )
        return self.actions(action_id=int(cursor.lastrowid or 0))[0]

    def actions(
        self, student_id: str | None = None, *, action_id: int | None = None
    ) -> list[ActionRecord]:
        """Recorded actions, oldest first, with the score each one answered."""
        sql = (
            "SELECT a.action_id, a.student_id, a.term, a.action, a.note, a.recorded_at,"
            " a.run_id, s.tier, s.probability FROM actions a JOIN scores s"
            " ON s.run_id = a.run_id AND s.student_id = a.student_id AND s.term = a.term"
        )
        where, args = [], []
        if student_id is not None:
            where.append("a.student_id = ?")
            args.append(student_id)
        if action_id is not None:
            where.append("a.action_id = ?")
            args.append(str(action_id))
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._errors():
            rows = list(self._rows(sql + " ORDER BY a.action_id", args))
        return [ActionRecord(**row) for row in rows]

    def latest_actions(self) -> dict[str, ActionRecord]:
        """The most recent action per student ID (for the report's table)."""
        return {a.student_id: a for a in self.actions()}

    def _latest_score(self, student_id: str, term: str | None) -> dict[str, Any] | None:
        sql = "SELECT run_id, term FROM scores WHERE student_id = ?"
        args = [student_id]
        if term is not None:
            sql += " AND term = ?"
            args.append(term)
        with self._errors():
            rows = list(self._rows(sql + " ORDER BY run_id DESC LIMIT 1", args))
        return rows[0] if rows else None

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """A damaged or foreign database file as a `StoreError` naming it (the transaction of
        a write is rolled back by ``with self._db`` first, so nothing is half-written)."""
        try:
            yield
        except sqlite3.IntegrityError:
            raise  # a constraint broken by edufl's own rows: a bug, not the user's file
        except (sqlite3.Error, UnicodeDecodeError) as exc:  # a damaged TEXT cell: not UTF-8
            raise StoreError(
                f"{self.path}: the store is damaged or not an edufl store ({exc}); restore it "
                "from a backup or pass another --db"
            ) from None

    def _rows(self, sql: str, args: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
        cursor = self._db.execute(sql, args)
        names = [d[0] for d in cursor.description]
        for row in cursor:
            yield dict(zip(names, row, strict=True))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
