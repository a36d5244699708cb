"""`edufl client watch`: keep scoring as the term goes on.

Each check digests the export's files (SHA-256; a file whose size and modification time are
unchanged keeps its digest, so a check reads only what changed) and notes which model it would
use (the latest adoption, or ``--model``). It re-scores when either differs from the last
attempt, or when the schedule is due (``every``, weekly by default), and otherwise does
nothing. A re-scoring writes one report folder and one run in the advisor store::

    REPORTS/20250101T120000Z/   report.html, students.csv, changes.csv
    REPORTS/LATEST              the folder name of the latest report
    REPORTS/watch-state.json    what the last attempt saw (digests, model, time, outcome)

Earlier report folders are kept (the newest ``keep``). ``changes.csv`` and the report's "Change
since the last report" section compare every student's tier with the previous report's:
students who moved up a tier first. The report is built under a hidden name and renamed into
place before LATEST moves, so a failed re-scoring (a corrupt export) leaves the previous report
as the latest; the same broken export is not retried until it changes or the schedule is due.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from client.early_warning.tiers import TIERS
from shared_models.atomic import write_text_atomic
from shared_models.data.contract import FeatureSpec, default_spec
from shared_models.errors import EduflError
from shared_models.user_files import loads_json, read_text

logger = logging.getLogger(__name__)

LATEST = "LATEST"
STATE_FILE = "watch-state.json"
CHANGES_CSV = "changes.csv"
DEFAULT_EVERY = "7d"
_FORMAT = 1
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_STAMP = re.compile(r"\d{8}T\d{6}Z(-\d+)?")
#: The order of ``changes.csv`` and the report section: what an advisor must see first.
CHANGE_ORDER = ("up", "new", "down", "left")


class WatchError(EduflError, ValueError):
    """A watch setting that cannot work (a bad duration, an export that is not a folder)."""


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``12h``, ``7d``, ``1w`` or a plain number of seconds.

    Raises:
        WatchError: anything else, or a duration that is not positive.
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text or "")
    seconds = float(found.group(1)) * _UNITS[found.group(2) or "s"] if found else 0.0
    if seconds <= 0:
        raise WatchError(
            f"duration {text!r}: give a positive number with a unit s, m, h, d or w (e.g. 7d)"
        )
    return seconds


@dataclass(frozen=True)
class WatchConfig:
    """What to watch and how to score it (the `edufl client report` options, plus timing).

    Attributes:
        every: seconds after the last attempt when a re-scoring is due even if nothing changed.
        poll: seconds between checks of the export's digests.
        keep: report folders kept (the newest); older ones are deleted.
    """

    data_dir: Path
    reports_dir: Path
    db_path: Path
    model: Path | None = None
    home: Path | None = None
    rules_path: Path | None = None
    thresholds: Any = None  # RiskThresholds; Any keeps this module free of torch imports
    spec: FeatureSpec | None = None
    observed_weeks: int | None = None
    every: float = 7 * 86400.0
    poll: float = 60.0
    keep: int = 20
    max_rows: int = 1000


@dataclass(frozen=True)
class CheckResult:
    """What one check did.

    Attributes:
        outcome: ``scored``, ``unchanged`` (nothing to do) or ``failed`` (the previous report
            stays the latest).
        reason: why it re-scored (or did not), in words.
        report_dir: the new report folder (``scored``), else the latest one, if any.
        changes: the change list of a new report (``scored``).
    """

    outcome: Literal["scored", "unchanged", "failed"]
    reason: str
    report_dir: Path | None = None
    changes: pd.DataFrame | None = None
    error: str | None = None


def check(config: WatchConfig, *, now: float | None = None) -> CheckResult:
    """Check the export and the model once; re-score if they changed or the schedule is due."""
    now = time.time() if now is None else now
    reports = Path(config.reports_dir)
    state = _read_state(reports)
    latest = latest_report(reports)
    try:
        files = export_digests(Path(config.data_dir), state.get("files", {}))
        model = str(_model_dir(config))
    except EduflError as exc:  # no export folder, no adopted model: nothing can be scored
        return _failed(reports, state, None, now, f"cannot score: {exc}", latest)
    inputs = {"files": {k: v[2] for k, v in files.items()}, "model": model}
    last = state.get("inputs")
    if last is None:
        reason = "first scoring"
    elif inputs != last:
        reason = _what_changed(last, inputs)
    elif now - float(state.get("attempted", 0.0)) >= config.every:
        reason = f"scheduled (every {_duration_text(config.every)})"
    else:
        why = "export and model unchanged"
        if state.get("error"):
            why += "; the last re-scoring of this export failed, fix the export"
        return CheckResult("unchanged", why, latest, error=state.get("error"))
    try:
        folder, changes = _rescore(config, latest, now)
    except EduflError as exc:
        message = f"re-scoring {config.data_dir} failed ({reason}): {exc}; " + (
            f"the previous report stays the latest ({latest})" if latest else "no report yet"
        )
        return _failed(reports, {**state, "files": files}, inputs, now, message, latest)
    _write_state(
        reports,
        {"files": files, "inputs": inputs, "attempted": now, "report": folder.name, "error": None},
    )
    _prune(reports, config.keep)
    return CheckResult("scored", reason, folder, changes)


def watch(
    config: WatchConfig,
    *,
    once: bool = False,
    max_runs: int | None = None,
    on_check: Callable[[CheckResult], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[CheckResult]:
    """Check now, then every ``config.poll`` seconds, until stopped.

    Args:
        once: one check, then return.
        max_runs: return after this many re-scorings (failed ones count).
        on_check: called with every check's result (the CLI prints it).

    Returns:
        Every check's result (only when ``once`` or ``max_runs`` ends the loop).
    """
    results: list[CheckResult] = []
    runs = 0
    while True:
        result = check(config)
        results.append(result)
        if on_check is not None:
            on_check(result)
        runs += result.outcome != "unchanged"
        if once or (max_runs is not None and runs >= max_runs):
            return results
        attempted = _read_state(Path(config.reports_dir)).get("attempted")
        # No attempt recorded (no model to score with yet): wait a poll, not a busy loop.
        due_in = config.poll if attempted is None else attempted + config.every - time.time()
        sleep(max(0.0, min(config.poll, due_in)))


def export_digests(
    data_dir: Path, known: dict[str, Any] | None = None
) -> dict[str, tuple[int, int, str]]:
    """``relative path -> (size, mtime_ns, sha256)`` of every regular file in the export.

    Hidden files (editors' swap files, a copy in progress) are left out. A file whose size
    and modification time match ``known`` keeps the digest recorded there.

    Raises:
        WatchError: ``data_dir`` is not a folder, or holds no file.
    """
    if not data_dir.is_dir():
        raise WatchError(f"{data_dir}: no such export folder; pass --data EXPORT_FOLDER")
    known = known or {}
    out: dict[str, tuple[int, int, str]] = {}
    for path in sorted(data_dir.rglob("*")):
        rel = path.relative_to(data_dir).as_posix()
        if any(part.startswith(".") for part in rel.split("/")) or not path.is_file():
            continue
        stat = path.stat()
        seen = known.get(rel)
        if seen and int(seen[0]) == stat.st_size and int(seen[1]) == stat.st_mtime_ns:
            out[rel] = (stat.st_size, stat.st_mtime_ns, str(seen[2]))
            continue
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        out[rel] = (stat.st_size, stat.st_mtime_ns, digest.hexdigest())
    if not out:
        raise WatchError(f"{data_dir}: the export folder holds no file")
    return out


def latest_report(reports_dir: Path) -> Path | None:
    """The latest report folder, or None before the first."""
    pointer = Path(reports_dir) / LATEST
    if not pointer.is_file():
        return None
    folder = Path(reports_dir) / read_text(pointer).strip()
    return folder if _STAMP.fullmatch(folder.name) and folder.is_dir() else None


def tier_changes(previous: pd.DataFrame | None, current: pd.DataFrame) -> pd.DataFrame:
    """Each student's tier now against the previous report; changed students only.

    Args:
        previous, current: ``students.csv`` frames (``student_id``, ``term``, ``tier``,
            ``probability``); ``previous`` None: everyone is new.

    Returns:
        ``student_id, term, change, previous_tier, tier, previous_probability, probability``,
        ordered as `CHANGE_ORDER` (up first; within a change, the largest jump and highest
        risk first).
    """
    key = ["student_id", "term"]
    cols = [*key, "tier", "probability"]
    now = current[cols].astype({"student_id": str, "term": str})
    before = (
        pd.DataFrame(columns=cols)
        if previous is None
        else previous[cols].astype({"student_id": str, "term": str})
    )
    both = now.merge(before, on=key, how="outer", suffixes=("", "_prev"), indicator=True)
    rank = {t: i for i, t in enumerate(TIERS)}
    step = both["tier"].map(rank) - both["tier_prev"].map(rank)
    change = pd.Series("same", index=both.index, dtype=object)
    change[step > 0], change[step < 0] = "up", "down"
    change[both["_merge"] == "left_only"] = "new"
    change[both["_merge"] == "right_only"] = "left"
    out = pd.DataFrame(
        {
            "student_id": both["student_id"],
            "term": both["term"],
            "change": change,
            "previous_tier": both["tier_prev"],
            "tier": both["tier"],
            "previous_probability": both["probability_prev"],
            "probability": both["probability"],
            "_order": change.map({c: i for i, c in enumerate(CHANGE_ORDER)}),
            "_step": step.abs().fillna(0),
        }
    )
    out = out[out["change"] != "same"].sort_values(
        ["_order", "_step", "probability", "student_id"],
        ascending=[True, False, False, True],
        kind="stable",
    )
    return out.drop(columns=["_order", "_step"]).reset_index(drop=True)


def _rescore(config: WatchConfig, latest: Path | None, now: float) -> tuple[Path, pd.DataFrame]:
    """Score, compare with the latest report, write a new report folder and the store run."""
    from client.early_warning.pipeline import run_early_warning, save_to_store
    from client.early_warning.report import CSV_NAME, students_frame, write_report
    from client.early_warning.store import Store

    warning = run_early_warning(
        Path(config.data_dir),
        config.model,
        home=config.home,
        observed_weeks=config.observed_weeks,
        thresholds=config.thresholds,
        rules_path=config.rules_path,
        spec=config.spec or default_spec(),
        with_trajectory=True,
    )
    previous = None
    if latest is not None:
        try:
            previous = pd.read_csv(latest / CSV_NAME, dtype={"student_id": str, "term": str})
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("%s: unreadable (%s); every student counts as new", latest, exc)
    changes = tier_changes(previous, students_frame(warning))
    warning = dataclasses.replace(
        warning, changes=changes, changes_since=latest.name if latest else None
    )
    reports = Path(config.reports_dir)
    reports.mkdir(parents=True, exist_ok=True)
    name = _free_name(reports, datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ"))
    stage = reports / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        with Store(config.db_path) as store:
            actions = store.latest_actions()
        write_report(warning, stage, actions=actions, max_rows=config.max_rows)
        write_text_atomic(stage / CHANGES_CSV, changes.to_csv(index=False, lineterminator="\n"))
        run_id = save_to_store(warning, config.db_path)
        os.replace(stage, reports / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    write_text_atomic(reports / LATEST, name + "\n")
    logger.info("re-scored %s: report %s, store run %d", config.data_dir, name, run_id)
    return reports / name, changes


def _model_dir(config: WatchConfig) -> Path:
    from client.early_warning.adopt import latest_adopted

    if config.model is None:
        return latest_adopted(config.home)
    return Path(config.model).resolve()


def _what_changed(last: dict[str, Any], now: dict[str, Any]) -> str:
    before, after = last.get("files", {}), now["files"]
    changed = sorted(k for k in after.keys() | before.keys() if before.get(k) != after.get(k))
    parts = []
    if changed:
        names = ", ".join(changed[:3]) + (
            f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        )
        parts.append(f"export changed ({names})")
    if last.get("model") != now["model"]:
        parts.append(f"model changed (now {Path(now['model']).name})")
    return "; ".join(parts)


def _failed(
    reports: Path,
    state: dict[str, Any],
    inputs: dict[str, Any] | None,
    now: float,
    message: str,
    latest: Path | None,
) -> CheckResult:
    logger.error("%s", message)
    if inputs is not None:  # not retried until the export changes or the schedule is due
        _write_state(reports, {**state, "inputs": inputs, "attempted": now, "error": message})
    return CheckResult("failed", message, latest, error=message)


def _free_name(reports: Path, stamp: str) -> str:
    name, k = stamp, 1
    while (reports / name).exists():  # two re-scorings within a second (a short --every)
        name, k = f"{stamp}-{k}", k + 1
    return name


def _prune(reports: Path, keep: int) -> None:
    folders = sorted(
        (p for p in reports.iterdir() if p.is_dir() and _STAMP.fullmatch(p.name)),
        key=lambda p: (p.name[:16], int(p.name[17:] or 0)),
    )
    for old in folders[: max(0, len(folders) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def _read_state(reports: Path) -> dict[str, Any]:
    path = reports / STATE_FILE
    if not path.is_file():
        return {}
    try:
        state = loads_json(read_text(path))
    except (OSError, ValueError) as exc:
        logger.warning("%s: unreadable (%s); the next check re-scores", path, exc)
        return {}
    return state if isinstance(state, dict) and state.get("format") == _FORMAT else {}


def _write_state(reports: Path, state: dict[str, Any]) -> None:
    reports.mkdir(parents=True, exist_ok=True)
    text = json.dumps({**state, "format": _FORMAT}, indent=1, sort_keys=True)
    write_text_atomic(reports / STATE_FILE, text + "\n")


def _duration_text(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"
