"""`edufl client score | report | actions | rules`: local early warning for advisors.

`actions` and `rules` run without torch: commands import what they run in their bodies.
"""

from __future__ import annotations

from pathlib import Path

import typer

from client.early_warning.store import ACTIONS
from shared_models.cli_support import new_app, user_errors

DEFAULT_DB = Path("edufl-client.sqlite")

actions_app = new_app(
    "What advisors did about flagged students (stored locally, pseudonymous IDs only).\n\n"
    "Example:\n\n\b\n  edufl client actions record s1a2b3c4d5e6 --action contacted --note 'met'"
)
rules_app = new_app(
    "Intervention rule files: check one, list the indicators rules may use.\n\n"
    "Example:\n\n\b\n  edufl client rules check my_rules.toml"
)

DATA = typer.Option(..., "--data", help="The institution's export folder.")
MODEL = typer.Option(..., "--model", help="Trained model folder (model.json + model.pt).")
WEEK = typer.Option(
    None, "--week", min=1, help="Score as after week K (default: the latest week in the export)."
)
DB = typer.Option(
    DEFAULT_DB, "--db", envvar="EDUFL_CLIENT_DB", help="The local store (SQLite; created if new)."
)
RULES = typer.Option(None, "--rules", help="Rule file TOML; the default rules if omitted.")
THRESHOLDS = typer.Option(
    "0.4,0.7", "--thresholds", help="MODERATE,HIGH: low < MODERATE <= moderate < HIGH <= high."
)
SPEC = typer.Option(None, "--spec", help="Feature spec TOML; the default spec if omitted.")


@user_errors
def score(
    data: Path = DATA,
    model: Path = MODEL,
    week: int | None = WEEK,
    db: Path = DB,
    rules: Path | None = RULES,
    thresholds: str = THRESHOLDS,
    spec: Path | None = SPEC,
    show: int = typer.Option(10, help="Highest-risk students to print."),
) -> None:
    """Score students: risk probability, predicted grade, tier, reasons and recommendations.

    Everything is saved as one run in the local store (--db). Works part-way through a term:
    --week K uses weeks 1..K only.

    Example:

    \b
      edufl client score --data demo/consortium/institution_01 \\
          --model runs/demo/centralized --week 6
    """
    from client.early_warning.pipeline import run_early_warning, save_to_store
    from client.early_warning.scoring import RiskThresholds, tier_outcomes
    from shared_models.data.contract import load_spec

    cut = RiskThresholds.parse(thresholds)
    warning = run_early_warning(
        data, model, observed_weeks=week, thresholds=cut, rules_path=rules, spec=load_spec(spec)
    )
    run_id = save_to_store(warning, db)
    scores = warning.scores
    counts = scores.tier_counts()
    typer.echo(
        f"scored {len(scores)} students after week {scores.observed_weeks} "
        f"({cut}): " + ", ".join(f"{counts[t]} {t}" for t in counts)
    )
    if warning.unscored_ids:
        typer.echo(f"not scored (too little data so far): {len(warning.unscored_ids)} record(s)")
    outcomes = tier_outcomes(scores, warning.cohort.at_risk)
    if any(n for n, _ in outcomes.values()):
        typer.echo(
            "observed at-risk rate by tier: "
            + ", ".join(f"{t} {100 * r:.0f} % (n={n})" for t, (n, r) in outcomes.items() if n)
        )
    for i in scores.probability.argsort()[::-1][:show]:
        recs = warning.recommendations[i]
        reason = warning.reasons[i][0].text if warning.reasons[i] else "-"
        todo = f"{recs[0].action} ({recs[0].owner})" if recs else "-"
        typer.echo(
            f"  {scores.student_ids[i]}  {scores.tier[i]:<8} {scores.probability[i]:.2f}  "
            f"{todo}  | {reason}"
        )
    typer.echo(f"saved as run {run_id} in {db}")


@user_errors
def report(
    data: Path = DATA,
    model: Path = MODEL,
    out: Path = typer.Option(..., "--out", help="Folder for report.html and students.csv."),
    week: int | None = WEEK,
    db: Path | None = typer.Option(
        None, "--db", envvar="EDUFL_CLIENT_DB", help="Also save the run here and show actions."
    ),
    rules: Path | None = RULES,
    thresholds: str = THRESHOLDS,
    spec: Path | None = SPEC,
    max_rows: int = typer.Option(1000, min=1, help="Students in the HTML table (CSV: all)."),
) -> None:
    """Write the advisor report: a self-contained HTML page and a CSV.

    Cohort overview (tier counts, risk distribution, risk by program and by week), a sortable
    student table with tier, probability, top reasons, recommendations and trend sparklines.
    The page loads nothing from the network; only pseudonymous IDs appear.

    Example:

    \b
      edufl client report --data demo/consortium/institution_01 \\
          --model runs/demo/centralized --out runs/report --week 6
    """
    from client.early_warning.report import score_and_report
    from client.early_warning.scoring import RiskThresholds
    from shared_models.data.contract import load_spec

    result = score_and_report(
        data,
        model,
        out,
        observed_weeks=week,
        db_path=db,
        rules_path=rules,
        thresholds=RiskThresholds.parse(thresholds),
        spec=load_spec(spec),
        max_rows=max_rows,
    )
    counts = result.warning.scores.tier_counts()
    typer.echo("tiers: " + ", ".join(f"{counts[t]} {t}" for t in counts))
    typer.echo(f"report: {result.html}\ncsv:    {result.csv}")


@actions_app.command("record")
@user_errors
def actions_record(
    student_id: str = typer.Argument(..., help="Pseudonymous ID, as in the report."),
    action: str = typer.Option(..., "--action", help=" | ".join(ACTIONS)),
    note: str = typer.Option("", "--note", help="Free text; keep names out of it."),
    term: str | None = typer.Option(None, help="Term, when the student has several."),
    db: Path = DB,
) -> None:
    """Record what an advisor did about a student's latest score.

    Example:

    \b
      edufl client actions record s1a2b3c4d5e6 --action dismissed-incorrect --note 'on leave'
    """
    from client.early_warning.store import Store

    with Store(db, create=False) as store:
        record = store.record_action(student_id, action, note, term)
    typer.echo(
        f"recorded #{record.action_id}: {record.student_id} {record.action} "
        f"(was {record.tier}, P={record.probability:.2f}, run {record.run_id})"
    )


@actions_app.command("list")
@user_errors
def actions_list(
    student: str | None = typer.Option(None, "--student", help="Only this student."),
    db: Path = DB,
) -> None:
    """List recorded actions, oldest first, with the score each one answered.

    Example:

    \b
      edufl client actions list --db edufl-client.sqlite
    """
    from client.early_warning.store import Store

    with Store(db, create=False) as store:
        records = store.actions(student)
    if not records:
        typer.echo("no actions recorded")
        return
    for a in records:
        note = f"  {a.note}" if a.note else ""
        typer.echo(
            f"#{a.action_id} {a.recorded_at}  {a.student_id}  {a.action:<20} "
            f"{a.tier} P={a.probability:.2f} (run {a.run_id}){note}"
        )


@rules_app.command("check")
@user_errors
def rules_check(
    path: Path = typer.Argument(..., help="Rule file to check."), spec: Path | None = SPEC
) -> None:
    """Validate a rule file against the contract's indicators; exit 2 with every problem.

    Example:

    \b
      edufl client rules check my_rules.toml
    """
    from client.early_warning.rules import load_rules
    from shared_models.data.contract import load_spec

    ruleset = load_rules(path, load_spec(spec))
    typer.echo(f"{path}: {len(ruleset.rules)} rule(s), valid")


@rules_app.command("indicators")
@user_errors
def rules_indicators(spec: Path | None = SPEC) -> None:
    """List the indicators a rule may name, with meaning and range.

    Example:

    \b
      edufl client rules indicators
    """
    from client.early_warning.indicators import vocabulary
    from shared_models.data.contract import load_spec

    for info in vocabulary(load_spec(spec)).values():
        typer.echo(f"{info.name:<26} [{info.low:g}, {info.high:g}]  {info.description}")
