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
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from client.early_warning import fairness, plots
from client.early_warning.pipeline import EarlyWarning, run_early_warning, save_to_store
from client.early_warning.scoring import TIERS, RiskThresholds
from client.early_warning.store import ActionRecord, Store
from shared_models.atomic import write_atomic_many
from shared_models.data.contract import FeatureSpec

if TYPE_CHECKING:
    import torch

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
    """The page; ``rows`` are the record indices shown in the table, in order.

    The body is the list `sections` returns; a new section is one more function there.
    """
    scores, spec, esc = warning.scores, warning.spec, html.escape
    institution = str(warning.cohort.institution[0]) if len(warning.cohort.institution) else ""
    k, thresholds = scores.observed_weeks, scores.thresholds
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(s for s in sections(warning, rows, actions) if s)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width,initial-scale=1">
<link rel="icon" href="data:,"><title>Early-warning report: {esc(institution)}</title>
<style>{_CSS}</style></head><body>
<h1>Early-warning report: {esc(institution)}</h1>
<p class="meta">Scored after {spec.period} {k} of {spec.weeks} &middot;
model {esc(warning.info.model_name)}
&middot; tiers {esc(str(thresholds))} {_calibration_note(warning)} &middot; rules:
{esc(warning.info.rules)} &middot; {generated}. Pseudonymous IDs only; computed on this
institution's machine.</p>
{body}
<script>{_JS}</script>
</body></html>
"""


def sections(
    warning: EarlyWarning, rows: np.ndarray, actions: Mapping[str, ActionRecord]
) -> list[str]:
    """The page's sections in order, each an HTML fragment (empty ones are left out)."""
    return [
        overview_section(warning),
        calibration_section(warning),
        changes_section(warning),
        fairness.report_section(warning),
        students_section(warning, rows, actions),
    ]


def changes_section(warning: EarlyWarning, max_rows: int = 50) -> str:
    """Tier changes since the previous report (a watch's run): students who moved up first."""
    changes = warning.changes
    if changes is None:
        return ""
    esc = html.escape
    if warning.changes_since is None:
        return (
            '<h2 id="changes">Change since the last report</h2><p class="meta">The first '
            "report of this watch: the next one lists the students whose tier changed.</p>"
        )
    counts = changes["change"].value_counts()
    summary = ", ".join(
        f"{int(counts.get(c, 0))} {label}"
        for c, label in [
            ("up", "moved up a tier"),
            ("new", "new"),
            ("down", "moved down"),
            ("left", "no longer in the export"),
        ]
    )
    shown = changes[changes["change"].isin(["up", "new"])].head(max_rows)
    rows = "\n".join(
        f'<tr data-change="{esc(str(r.change))}"><td><code>{esc(str(r.student_id))}</code></td>'
        f"<td>{esc(str(r.change))}</td>"
        f"<td>{'' if pd.isna(r.previous_tier) else esc(str(r.previous_tier))}</td>"
        f"<td>{esc(str(r.tier))}</td>"
        f"<td>{'' if pd.isna(r.previous_probability) else f'{r.previous_probability:.2f}'}</td>"
        f"<td>{r.probability:.2f}</td></tr>"
        for r in shown.itertuples()
    )
    table = (
        '<table id="changes-table"><thead><tr><th>Student</th><th>Change</th><th>Was</th>'
        f"<th>Now</th><th>P before</th><th>P now</th></tr></thead><tbody>\n{rows}\n"
        "</tbody></table>"
        if rows
        else ""
    )
    return (
        f'<h2 id="changes">Change since the last report</h2><p class="meta">Since report '
        f"{esc(warning.changes_since)}: {summary}. Students who moved up a tier come first"
        f"{f' (the first {max_rows} shown)' if len(shown) == max_rows else ''}; changes.csv "
        f"beside this page lists every change.</p>{table}"
    )


def overview_section(warning: EarlyWarning) -> str:
    """Tier counts and the cohort's figures."""
    scores, esc = warning.scores, html.escape
    n, counts = len(scores), scores.tier_counts()
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
        figures.append(
            plots.tier_shares_by_week(
                warning.trajectory, scores.thresholds, period=warning.spec.period
            )
        )
    images = "".join(f'<img alt="figure {k + 1}" src="{uri}">' for k, uri in enumerate(figures))
    unscored = ""
    if warning.unscored_ids:
        ids = ", ".join(esc(s) for s in warning.unscored_ids)
        unscored = (
            f"<details><summary>{len(warning.unscored_ids)} record(s) not scored: too little "
            f"data so far (run <code>edufl client validate</code>)</summary>{ids}</details>"
        )
    return (
        f'<h2>Cohort overview</h2><div class="cards">{cards}</div>{unscored}\n'
        f'<div class="figs">{images}</div>'
    )


def calibration_section(warning: EarlyWarning) -> str:
    """Reliability diagram and expected calibration error (ECE) of the model's probabilities."""
    found = warning.calibration
    if not found:
        return (
            '<h2 id="calibration">Calibration</h2><p class="meta">This model is not calibrated '
            "for this institution: its probabilities are the raw model's and the tiers may not "
            "match observed rates. Adopt it with <code>edufl client adopt RUN_DIR --data "
            "EXPORT</code> to calibrate it on your own validation students.</p>"
        )
    fit, test = found.get("fitted_on", {}), found.get("test")
    method = str(found.get("calibrator", {}).get("method", "?"))
    chosen = found.get("selection") or {}
    how = (
        "chosen by cross-validated Brier score ("
        + ", ".join(f"{html.escape(m)} {v:.4f}" for m, v in chosen.items())
        + ")"
        if chosen
        else "as asked"
    )
    method_line = (
        f"Method: {html.escape(method)} calibration ({how}), fitted on this institution's own "
        f"validation split ({fit.get('n', '?')} students, {fit.get('at_risk', '?')} at risk) "
        "on this machine; nothing left the institution, so it costs no privacy. Tiers use the "
        "calibrated probabilities."
    )
    if not test:
        return f'<h2 id="calibration">Calibration</h2><p class="meta">{method_line}</p>'
    raw, cal = test["raw"], test["calibrated"]
    floor = found.get("ece_noise_floor")
    noise = (
        f" A perfectly calibrated model would still show an ECE of about {floor:.3f} on "
        f"{cal['n']} students (sampling noise)."
        if floor is not None
        else ""
    )
    return f"""<h2 id="calibration">Calibration</h2>
<p class="meta">{method_line}</p>
<p id="ece">Expected calibration error on the test split ({cal["n"]} held-out students,
{cal["n_bins"]} equal-width bins): <b>{cal["ece"]:.3f}</b> calibrated, {raw["ece"]:.3f}
raw.{noise}</p>
<div class="figs"><img id="reliability" alt="reliability diagram"
src="{plots.reliability_diagram(raw, cal)}"></div>"""


def students_section(
    warning: EarlyWarning, rows: np.ndarray, actions: Mapping[str, ActionRecord]
) -> str:
    """The sortable, filterable student table."""
    scores, esc = warning.scores, html.escape
    n = len(scores)
    groups = group_labels(warning)
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
    return f"""<h2>Students</h2><p class="meta">{shown}. Click a column to sort. Record what you
did with <code>edufl client actions record STUDENT_ID --action contacted</code>.</p>
<div class="controls"><input id="q" type="search" placeholder="filter (ID, reason, owner...)">
<select id="tier"><option value="">all tiers</option>
{"".join(f'<option value="{t}">{t}</option>' for t in TIERS)}</select></div>
<table id="students"><thead><tr>{header}</tr></thead>
<tbody>
{body}
</tbody></table>"""


def _calibration_note(warning: EarlyWarning) -> str:
    found = warning.calibration
    if not found:
        return "(uncalibrated probabilities)"
    method = html.escape(str(found.get("calibrator", {}).get("method", "?")))
    return f"on probabilities calibrated locally ({method})"


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
            risk,
            colour=colour,
            marks=(cut.moderate, cut.high),
            title=f"P(at risk) by {warning.spec.period}",
        )
    if "attendance_rate" in warning.cohort.dynamic_names:
        j = warning.cohort.dynamic_names.index("attendance_rate")
        k, cohort = scores.observed_weeks, warning.cohort
        seen = np.where(cohort.week_mask[i, :k] > 0, cohort.dynamic[i, :k, j], np.nan)
        trend += plots.sparkline(seen, colour="#555", title=f"attendance by {warning.spec.period}")
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
    model_dir: Path | None,
    out_dir: Path,
    *,
    home: Path | None = None,
    observed_weeks: int | None = None,
    db_path: Path | None = None,
    rules_path: Path | None = None,
    thresholds: RiskThresholds | None = None,
    spec: FeatureSpec | None = None,
    max_rows: int = 1000,
    device: torch.device | str | None = None,
) -> ReportResult:
    """Score an export and write the advisor report (``report.html`` + ``students.csv``).

    ``model_dir`` and ``home``: as in `run_early_warning` (None: the latest adopted model).
    With ``db_path`` the run is also saved to the store, and advisors' latest recorded actions
    appear in the report's table. The model scores on ``device`` (None: the CPU).
    """
    warning = run_early_warning(
        data_dir,
        model_dir,
        home=home,
        observed_weeks=observed_weeks,
        thresholds=thresholds,
        rules_path=rules_path,
        spec=spec,
        with_trajectory=True,
        device=device,
    )
    run_id, actions = None, {}
    if db_path is not None:
        run_id = save_to_store(warning, db_path)
        with Store(db_path) as store:
            actions = store.latest_actions()
    html, csv = write_report(warning, Path(out_dir), actions=actions, max_rows=max_rows)
    logger.info("report written to %s", html)
    return ReportResult(html, csv, run_id, warning)
