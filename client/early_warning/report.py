"""The advisor report: one self-contained HTML page and a CSV of every scored student.

The page has no network assets (CSS and JS inline, figures as data URIs, a Content Security
Policy that forbids fetching anything), so it opens offline and leaks nothing when opened.
Only pseudonymous IDs appear. The HTML table lists the ``max_rows`` highest-risk students;
the CSV lists everyone, with every indicator.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from client.early_warning import plots
from client.early_warning.pipeline import EarlyWarning, run_early_warning, save_to_store
from client.early_warning.scoring import TIERS, RiskThresholds
from client.early_warning.store import ActionRecord, Store
from shared_models.atomic import write_atomic_many
from shared_models.data.contract import FeatureSpec

logger = logging.getLogger(__name__)

HTML_NAME = "report.html"
CSV_NAME = "students.csv"
_GROUP = "program"  # the static attribute the overview breaks risk down by
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222;max-width:1400px}
h1{font-size:1.4rem;margin:0 0 .2rem}h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
.meta{color:#555}.cards{display:flex;gap:1rem;margin:1rem 0}
.card{border-radius:6px;padding:.6rem 1rem;color:#fff;min-width:8rem}
.card b{font-size:1.6rem;display:block}.figs{display:flex;flex-wrap:wrap;gap:1rem}
.figs img{border:1px solid #ddd;border-radius:4px;max-width:100%;height:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e5e5e5;padding:.35rem .4rem;text-align:left;vertical-align:top}
th{background:#f4f4f4;position:sticky;top:0;cursor:pointer;user-select:none}
th[data-dir=asc]::after{content:" \\25B2"}th[data-dir=desc]::after{content:" \\25BC"}
td ol,td ul{margin:0;padding-left:1.1rem}.tier{font-weight:600;color:#fff;border-radius:4px;
padding:0 .4rem}.owner{color:#555;font-size:12px}.spark{display:block;margin:1px 0}
.controls{margin:.5rem 0}.controls input,.controls select{margin-right:.6rem;padding:.2rem}
"""
_JS = """
const table=document.getElementById('students');const body=table.tBodies[0];
table.querySelectorAll('th').forEach(th=>th.addEventListener('click',()=>{
 const col=th.cellIndex,num=th.dataset.type==='num',asc=th.dataset.dir!=='asc';
 table.querySelectorAll('th').forEach(h=>delete h.dataset.dir);th.dataset.dir=asc?'asc':'desc';
 const key=r=>r.cells[col].dataset.sort??r.cells[col].textContent;
 const rows=Array.from(body.rows).sort((a,b)=>{const x=key(a),y=key(b);
  const d=num?parseFloat(x)-parseFloat(y):x.localeCompare(y);return asc?d:-d;});
 rows.forEach(r=>body.appendChild(r));}));
function filterRows(){const q=document.getElementById('q').value.toLowerCase();
 const t=document.getElementById('tier').value;
 Array.from(body.rows).forEach(r=>{r.hidden=!((!t||r.dataset.tier===t)&&
  r.textContent.toLowerCase().includes(q));});}
document.getElementById('q').addEventListener('input',filterRows);
document.getElementById('tier').addEventListener('change',filterRows);
"""


def write_report(
    warning: EarlyWarning,
    out_dir: Path,
    *,
    actions: Mapping[str, ActionRecord] | None = None,
    max_rows: int = 1000,
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``students.csv`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    actions = actions or {}
    order = np.argsort(-warning.scores.probability, kind="stable")
    frame = students_frame(warning, actions).iloc[order]
    csv_path, html_path = out_dir / CSV_NAME, out_dir / HTML_NAME
    csv_text = frame.to_csv(index=False, lineterminator="\n")
    html_text = render_html(warning, order[:max_rows], actions)
    write_atomic_many(  # both or neither: a report never lists other students than its table
        {
            csv_path: lambda tmp: tmp.write_text(csv_text, "utf-8"),
            html_path: lambda tmp: tmp.write_text(html_text, "utf-8"),
        }
    )
    return html_path, csv_path


def group_labels(warning: EarlyWarning, attribute: str = _GROUP) -> np.ndarray | None:
    """Each record's category of a categorical static attribute ("unknown" when missing)."""
    names = warning.cohort.static_names
    columns = [j for j, n in enumerate(names) if n.startswith(f"{attribute}=")]
    if not columns:
        return None
    onehot = np.nan_to_num(warning.cohort.static[:, columns])
    categories = np.array([names[j].split("=", 1)[1] for j in columns], dtype=object)
    return np.where(onehot.max(axis=1) > 0, categories[onehot.argmax(axis=1)], "unknown")


def students_frame(
    warning: EarlyWarning, actions: Mapping[str, ActionRecord] | None = None
) -> pd.DataFrame:
    """One row per scored student: score, tier, reasons, recommendations, indicators."""
    scores, actions = warning.scores, actions or {}
    groups = group_labels(warning)
    frame = pd.DataFrame(
        {
            "student_id": scores.student_ids.astype(str),
            "term": scores.terms.astype(str),
            _GROUP: groups if groups is not None else "",
            "tier": scores.tier.astype(str),
            "probability": np.round(scores.probability.astype(float), 4),
            "predicted_grade": np.round(scores.grade.astype(float), 2),
            "observed_weeks": scores.observed_weeks,
            "reasons": [" | ".join(r.text for r in mine) for mine in warning.reasons],
            "recommendations": [
                " | ".join(f"[P{r.priority} {r.owner}] {r.action}: {r.message}" for r in mine)
                for mine in warning.recommendations
            ],
            "last_action": [_action_text(actions.get(str(s))) for s in scores.student_ids],
        }
    )
    indicators = pd.DataFrame(
        {k: np.round(v, 4) for k, v in warning.indicators.items() if k not in frame}
    )
    return pd.concat([frame, indicators], axis=1)


def render_html(
    warning: EarlyWarning, rows: np.ndarray, actions: Mapping[str, ActionRecord]
) -> str:
    """The page; ``rows`` are the record indices shown in the table, in order."""
    scores, spec, esc = warning.scores, warning.spec, html.escape
    n, counts = len(scores), scores.tier_counts()
    institution = str(warning.cohort.institution[0]) if len(warning.cohort.institution) else ""
    cards = "".join(
        f'<div class="card" style="background:{plots.TIER_COLOURS[t]}"><b>{counts[t]}</b>'
        f"{t} ({100 * counts[t] / max(n, 1):.0f} %)</div>"
        for t in TIERS
    )
    figures = [plots.probability_histogram(scores.probability, scores.thresholds)]
    groups = group_labels(warning)
    if groups is not None:
        by_group = {
            str(g): {t: int(((groups == g) & (scores.tier == t)).sum()) for t in TIERS}
            for g in sorted(set(groups.tolist()))
        }
        figures.append(plots.tier_shares_by_group(by_group))
    if warning.trajectory is not None and warning.trajectory.shape[1]:
        figures.append(plots.tier_shares_by_week(warning.trajectory, scores.thresholds))
    images = "".join(f'<img alt="figure {k + 1}" src="{uri}">' for k, uri in enumerate(figures))
    unscored = ""
    if warning.unscored_ids:
        ids = ", ".join(esc(s) for s in warning.unscored_ids)
        unscored = (
            f"<details><summary>{len(warning.unscored_ids)} record(s) not scored: too little "
            f"data so far (run <code>edufl client validate</code>)</summary>{ids}</details>"
        )
    shown = (
        f"{len(rows)} highest-risk of {n} students; students.csv lists everyone"
        if len(rows) < n
        else f"all {n} students; also in students.csv"
    )
    has_grade = bool(np.isfinite(scores.grade).any())
    header = "".join(
        f'<th data-type="{kind}">{esc(label)}</th>'
        for label, kind in [
            ("Student", "txt"),
            ("Program", "txt"),
            ("Tier", "num"),
            ("P(at risk)", "num"),
            *([("Predicted grade", "num")] if has_grade else []),
            ("Trend: risk / attendance", "num"),
            ("Top reasons", "txt"),
            ("Recommendations", "txt"),
            ("Last action", "txt"),
        ]
    )
    body = "\n".join(_row(warning, int(i), groups, has_grade, actions) for i in rows)
    k, thresholds = scores.observed_weeks, scores.thresholds
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<link rel="icon" href="data:,"><title>Early-warning report: {esc(institution)}</title>
<style>{_CSS}</style></head><body>
<h1>Early-warning report: {esc(institution)}</h1>
<p class="meta">Scored after week {k} of {spec.weeks} &middot; model {esc(warning.info.model_name)}
&middot; tiers {esc(str(thresholds))} &middot; rules: {esc(warning.info.rules)} &middot;
{generated}. Pseudonymous IDs only; computed on this institution's machine.</p>
<h2>Cohort overview</h2><div class="cards">{cards}</div>{unscored}
<div class="figs">{images}</div>
<h2>Students</h2><p class="meta">{shown}. Click a column to sort. Record what you did with
<code>edufl client actions record STUDENT_ID --action contacted</code>.</p>
<div class="controls"><input id="q" type="search" placeholder="filter (ID, reason, owner...)">
<select id="tier"><option value="">all tiers</option>
{"".join(f'<option value="{t}">{t}</option>' for t in TIERS)}</select></div>
<table id="students"><thead><tr>{header}</tr></thead>
<tbody>
{body}
</tbody></table>
<script>{_JS}</script>
</body></html>
"""


def _row(
    warning: EarlyWarning,
    i: int,
    groups: np.ndarray | None,
    has_grade: bool,
    actions: Mapping[str, ActionRecord],
) -> str:
    esc, scores = html.escape, warning.scores
    sid, tier, p = str(scores.student_ids[i]), str(scores.tier[i]), float(scores.probability[i])
    colour = plots.TIER_COLOURS[tier]
    cut = scores.thresholds
    trend = ""
    if warning.trajectory is not None:
        risk = warning.trajectory[i]
        trend += plots.sparkline(
            risk, colour=colour, marks=(cut.moderate, cut.high), title="P(at risk) by week"
        )
    if "attendance_rate" in warning.cohort.dynamic_names:
        j = warning.cohort.dynamic_names.index("attendance_rate")
        k, cohort = scores.observed_weeks, warning.cohort
        seen = np.where(cohort.week_mask[i, :k] > 0, cohort.dynamic[i, :k, j], np.nan)
        trend += plots.sparkline(seen, colour="#555", title="attendance by week")
    slope = float(warning.indicators.get("attendance_trend", np.full(i + 1, np.nan))[i])
    reasons = "".join(f"<li>{esc(r.text)}</li>" for r in warning.reasons[i])
    recs = "".join(
        f"<li><b>{esc(r.action)}</b> <span class=owner>(P{r.priority}, {esc(r.owner)})</span>"
        f"<br>{esc(r.message)}</li>"
        for r in warning.recommendations[i]
    )
    grade = float(scores.grade[i])
    grade_cell = f'<td data-sort="{grade:.3f}">{grade:.2f}</td>' if has_grade else ""
    group = esc(str(groups[i])) if groups is not None else ""
    action = esc(_action_text(actions.get(sid)))
    return (
        f'<tr data-tier="{tier}"><td><code>{esc(sid)}</code></td><td>{group}</td>'
        f'<td data-sort="{TIERS.index(tier)}"><span class="tier" style="background:{colour}">'
        f'{tier}</span></td><td data-sort="{p:.5f}">{p:.2f}</td>{grade_cell}'
        f'<td data-sort="{0.0 if np.isnan(slope) else slope:.4f}">{trend}</td>'
        f"<td>{f'<ol>{reasons}</ol>' if reasons else ''}</td>"
        f"<td>{f'<ul>{recs}</ul>' if recs else ''}</td><td>{action}</td></tr>"
    )


def _action_text(action: ActionRecord | None) -> str:
    if action is None:
        return ""
    note = f": {action.note}" if action.note else ""
    return f"{action.action} ({action.recorded_at[:10]}){note}"


@dataclass(frozen=True)
class ReportResult:
    """Where `score_and_report` wrote, and what it found."""

    html: Path
    csv: Path
    run_id: int | None  # the store's run, when a store was given
    warning: EarlyWarning


def score_and_report(
    data_dir: Path,
    model_dir: Path,
    out_dir: Path,
    *,
    observed_weeks: int | None = None,
    db_path: Path | None = None,
    rules_path: Path | None = None,
    thresholds: RiskThresholds | None = None,
    spec: FeatureSpec | None = None,
    max_rows: int = 1000,
) -> ReportResult:
    """Score an export and write the advisor report (``report.html`` + ``students.csv``).

    With ``db_path`` the run is also saved to the store, and advisors' latest recorded actions
    appear in the report's table.
    """
    warning = run_early_warning(
        data_dir,
        model_dir,
        observed_weeks=observed_weeks,
        thresholds=thresholds,
        rules_path=rules_path,
        spec=spec,
        with_trajectory=True,
    )
    run_id, actions = None, {}
    if db_path is not None:
        run_id = save_to_store(warning, db_path)
        with Store(db_path) as store:
            actions = store.latest_actions()
    html, csv = write_report(warning, Path(out_dir), actions=actions, max_rows=max_rows)
    logger.info("report written to %s", html)
    return ReportResult(html, csv, run_id, warning)
