"""`edufl client mapping init`: a first mapping.toml drafted from an export's header and codes.

The draft names the file for every table when one file holds them all, declares a wide
activity table when the header has per-period column series, matches contract columns to
export columns by name (a guess to check), and lists the distinct codes of every column with
few values so that ``[values]`` entries can be filled in. It always loads with `load_mapping`.
"""

from __future__ import annotations

import difflib
import json
import re
import tempfile
from pathlib import Path

import pandas as pd

from shared_models.data.contract import STUDENT_ID, TERM, WEEK, FeatureSpec
from shared_models.data.export import SUFFIXES, is_missing, read_cells
from shared_models.data.mapping import PERIOD, load_mapping, period_patterns
from shared_models.errors import DataContractError

#: Columns with at most this many distinct values are listed as codes.
MAX_CODES = 12
#: Smallest name similarity (0-1) at which a contract column is matched to an export column.
MIN_SIMILARITY = 0.6


def draft_mapping(export: Path, spec: FeatureSpec) -> str:
    """A commented mapping for ``export`` (one table file, or a folder holding one)."""
    path = _single_file(export)
    frame = read_cells(path)
    columns = list(frame.columns)
    series = period_patterns(columns)
    periods = _periods(series)
    wide = {p: c for p, c in series.items() if list(c) == periods}
    per_period = {col for c in wide.values() for col in c.values()}
    plain = [c for c in columns if c not in per_period]
    lines = [
        f"# Drafted by `edufl client mapping init {path.name}` for contract {spec.name!r} "
        f"{spec.version}.",
        "# Matches are guesses by name: check every line, then run `edufl client validate`.",
        "# Format: docs/mapping.md.",
        "",
    ]
    if WEEK not in columns:  # one row per student: every table is this file
        lines += ["[files]"] + [f"{t} = {_q(path.name)}" for t in TABLES_IN_FILE] + [""]
    used: set[str] = set()
    keys = {k: _match(k, plain, used) for k in (STUDENT_ID, TERM)}
    defaults = []
    if keys[STUDENT_ID] is None:
        defaults.append(f"{STUDENT_ID} = {_q('s-{row}')}  # no ID column found: rows numbered")
    if keys[TERM] is None:
        defaults.append(f"{TERM} = {_q('TERM')}  # no term column found: name the term")
    if defaults:
        lines += ["[defaults]", *defaults, ""]
    if wide:
        lines += ["[wide]", f"periods = {json.dumps(periods)}  # values of {PERIOD}", ""]
    activity = []
    for feature in spec.dynamic:
        pattern = _match(feature.name, list(wide), used) if wide else None
        pattern = pattern or _match(feature.name, plain, used)
        activity.append(_entry(feature.name, pattern))
    lines += ["[columns.activity]", *activity, ""]
    students = [_entry(k, keys[k]) for k in (STUDENT_ID, TERM) if keys[k] is not None]
    students += [_entry(a.name, _match(a.name, plain, used)) for a in spec.static]
    lines += ["[columns.students]", *students, ""]
    target = spec.target
    outcome_columns = {
        target.result_column: _match(target.result_column, plain, used)
        or _match_codes(target.results, frame, plain, used),
        target.grade_column: _match(target.grade_column, plain, used),
    }
    lines += ["[columns.outcomes]", *(_entry(n, c) for n, c in outcome_columns.items()), ""]
    categories = {a.name: a.categories for a in spec.static if a.kind == "categorical"}
    categories[target.result_column] = target.results
    matched = dict(
        [(a.name, _match_done(a.name, students)) for a in spec.static]
        + [(n, c) for n, c in outcome_columns.items()]
    )
    for name, allowed in categories.items():
        column = matched.get(name)
        if column is None:
            continue
        codes = _codes(frame[column])
        lookup = {c.lower(): c for c in allowed}
        todo = [c for c in codes if c.lower() not in lookup]
        if not todo:
            lines += [f"# {column!r} codes: {', '.join(codes)} (all categories of {name})", ""]
            continue
        lines.append(f"[values.{name}]  # {column!r} codes -> {', '.join(allowed)}")
        lines += [f"# {_q(code)} = {_q(_guess(code, allowed))}" for code in todo]
        lines.append("")
    listed = [
        f"#   {c!r}: {', '.join(_codes(frame[c]))}"
        for c in plain
        if c not in used and 1 < len(_codes(frame[c])) <= MAX_CODES
    ]
    if listed:
        lines += ["# Other columns with few distinct codes (not mapped):", *listed, ""]
    text = "\n".join(lines).rstrip() + "\n"
    with tempfile.TemporaryDirectory() as tmp:  # a draft that does not load is a bug here
        check = Path(tmp) / "mapping.toml"
        check.write_text(text, encoding="utf-8")
        load_mapping(check)
    return text


TABLES_IN_FILE = ("students", "activity", "outcomes")


def _single_file(export: Path) -> Path:
    if export.is_file():
        return export
    if not export.is_dir():
        raise DataContractError(f"{export}: no such file or folder; pass the export file")
    found = sorted(p for p in export.iterdir() if p.suffix in SUFFIXES)
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise DataContractError(
            f"{export}: found {len(found)} table files ({names}); pass the one file to map"
        )
    return found[0]


def _periods(series: dict[str, dict[str, str]]) -> list[str]:
    """The period labels most series share (the export's periods)."""
    counts: dict[tuple[str, ...], int] = {}
    for members in series.values():
        counts[tuple(members)] = counts.get(tuple(members), 0) + 1
    return list(max(counts, key=lambda k: (counts[k], len(k)))) if counts else []


def _norm(text: str) -> str:
    text = text.replace(PERIOD, " ")
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _similarity(contract: str, column: str) -> float:
    a, b = _norm(contract.replace("_", " ")), _norm(column)
    if a == b:
        return 1.0
    words_a, words_b = set(a.split()), set(b.split())
    covered = len(words_a & words_b) / max(len(words_a), 1)  # "units approved" in "... (approved)"
    return max(difflib.SequenceMatcher(None, a, b).ratio(), 0.9 * covered if covered == 1 else 0)


def _match(contract: str, candidates: list[str], used: set[str]) -> str | None:
    scored = [(_similarity(contract, c), c) for c in candidates if c not in used]
    if not scored:
        return None
    score, best = max(scored, key=lambda sc: sc[0])
    if score < MIN_SIMILARITY:
        return None
    used.add(best)
    return best


def _match_codes(
    allowed: tuple[str, ...], frame: pd.DataFrame, candidates: list[str], used: set[str]
) -> str | None:
    """The column whose codes are (case aside) the most of ``allowed``, if at least half."""
    wanted = {a.lower() for a in allowed}
    scored = [
        (len(wanted & {v.lower() for v in _codes(frame[c])}), c)
        for c in candidates
        if c not in used
    ]
    hits, best = max(scored, default=(0, ""))
    if 2 * hits < len(wanted) or not hits:
        return None
    used.add(best)
    return best


def _match_done(name: str, entries: list[str]) -> str | None:
    for entry in entries:
        if entry.startswith(f"{name} = "):
            return str(json.loads(entry.split(" = ", 1)[1].split("  #")[0]))
    return None


def _entry(contract: str, column: str | None) -> str:
    if column is None:
        return f"# {contract} = {_q('?')}  # no similar column found"
    return f"{contract} = {_q(column)}"


def _codes(values: pd.Series) -> list[str]:
    distinct = sorted({v.strip() for v in values if not is_missing(v)})
    return distinct if len(distinct) <= MAX_CODES else distinct[: MAX_CODES + 1]


def _guess(code: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(code.lower(), [a.lower() for a in allowed], n=1)
    return next((a for a in allowed if close and a.lower() == close[0]), "?")


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)
