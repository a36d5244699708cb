"""`edufl client adopt | score | report | watch | actions | rules`: early warning for advisors.

`actions` and `rules` run without torch: commands import what they run in their bodies.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import typer

from client.early_warning.store import ACTIONS
from shared_models.cli_support import USER_ERROR, new_app, user_errors
from shared_models.devices import DEVICE_HELP

DEFAULT_DB = Path("edufl-client.sqlite")

actions_app = new_app(
    "What advisors did about flagged students (stored locally, pseudonymous IDs only).\n\n"
    "Example:\n\n\b\n  edufl client actions record s1a2b3c4d5e6 --action contacted --note 'met'"
)
rules_app = new_app(
    "Intervention rule files: draft one for a contract, check one, list the indicators rules "
    "may use.\n\n"
    "Example:\n\n\b\n  edufl client rules check my_rules.toml"
)

DATA = typer.Option(..., "--data", help="The institution's export folder.")
MODEL = typer.Option(
    None,
    "--model",
    help="A model folder, its model.pt, a federated run folder or one checkpoint (adopted "
    "first); default: the latest model adopted into --home.",
)
HOME = typer.Option(
    None,
    "--home",
    envvar="EDUFL_HOME",
    help="This institution's edufl home; adopted models live in HOME/models "
    "(default ~/.edufl/client).",
)
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
DEVICE = typer.Option("auto", "--device", help=DEVICE_HELP)


@user_errors
def adopt(
    source: Path = typer.Argument(
        ...,
        help="Federated run folder (its final global model) or one checkpoint "
        "(checkpoints/round-NNNN.json).",
    ),
    data: Path = typer.Option(
        ...,
        "--data",
        help="This institution's labelled export (a past term): fixes normalisation and "
        "calibration with its own train and validation students.",
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write the model folder here instead of HOME/models/."
    ),
    home: Path | None = HOME,
    run_id: str | None = typer.Option(
        None, "--run-id", help="Refuse a checkpoint of any other run (the id your node logged)."
    ),
    calibration: str = typer.Option(
        "auto",
        "--calibration",
        help="auto (lowest cross-validated Brier score on the validation split) | isotonic | "
        "sigmoid | identity.",
    ),
    spec: Path | None = SPEC,
) -> None:
    """Adopt the federation's model: verify it, calibrate it locally, keep it as the latest.

    Checks the weights' checksum, the data contract against this institution's spec and the
    run id; pairs the weights with this institution's normalisation; calibrates P(at risk) on
    its own validation split and reports the calibration error on its test split. Nothing
    leaves this machine. `edufl client score` and `report` then use it without --model.

    Example:

    \b
      edufl client adopt runs/demo/federated --data demo/consortium/institution_01
    """
    from client.early_warning.adopt import LATEST, adopt
    from shared_models.data.contract import load_spec

    done = adopt(
        source,
        data,
        load_spec(spec),
        home=home,
        out=out,
        run_id=run_id,
        calibration=calibration,
    )
    typer.echo(f"adopted round {done.round} of run {done.run_id or '(no id)'} -> {done.model_dir}")
    report = done.calibration
    if report is not None:
        typer.echo(
            f"calibration: {report.calibrator.method}, fitted on {report.fitted_on['n']} "
            "validation students"
        )
        if report.raw is not None and report.calibrated is not None:
            typer.echo(
                f"test split ({report.calibrated.n} students): ECE {report.raw.ece:.3f} raw, "
                f"{report.calibrated.ece:.3f} calibrated"
            )
    if out is None:
        typer.echo(f"now the latest ({done.model_dir.parent / LATEST}): score without --model")


@user_errors
def score(
    data: Path = DATA,
    model: Path | None = MODEL,
    home: Path | None = HOME,
    week: int | None = WEEK,
    db: Path = DB,
    rules: Path | None = RULES,
    thresholds: str = THRESHOLDS,
    spec: Path | None = SPEC,
    show: int = typer.Option(10, help="Highest-risk students to print."),
    device: str = DEVICE,
) -> None:
    """Score students: risk probability, predicted grade, tier, reasons and recommendations.

    Everything is saved as one run in the local store (--db). Works part-way through a term:
    --week K uses weeks 1..K only.

    Example:

    \b
      edufl client score --data demo/consortium/institution_01 --week 6
    """
    from client.early_warning.pipeline import run_early_warning, save_to_store
    from client.early_warning.scoring import RiskThresholds, tier_outcomes
    from shared_models.data.contract import load_spec
    from shared_models.devices import resolve_device

    cut = RiskThresholds.parse(thresholds)
    warning = run_early_warning(
        data,
        model,
        home=home,
        observed_weeks=week,
        thresholds=cut,
        rules_path=rules,
        spec=load_spec(spec),
        device=resolve_device(device),
    )
    run_id = save_to_store(warning, db)
    scores = warning.scores
    counts = scores.tier_counts()
    calibrated = "calibrated" if warning.calibration else "uncalibrated"
    typer.echo(f"model: {warning.info.model_dir} ({calibrated} probabilities)")
    typer.echo(
        f"scored {len(scores)} students after {warning.spec.period} {scores.observed_weeks} "
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
    model: Path | None = MODEL,
    home: Path | None = HOME,
    out: Path = typer.Option(..., "--out", help="Folder for report.html and students.csv."),
    week: int | None = WEEK,
    db: Path | None = typer.Option(
        None, "--db", envvar="EDUFL_CLIENT_DB", help="Also save the run here and show actions."
    ),
    rules: Path | None = RULES,
    thresholds: str = THRESHOLDS,
    spec: Path | None = SPEC,
    max_rows: int = typer.Option(1000, min=1, help="Students in the HTML table (CSV: all)."),
    device: str = DEVICE,
) -> None:
    """Write the advisor report: a self-contained HTML page and a CSV.

    Cohort overview (tier counts, risk distribution, risk by program and by week), the
    calibration (reliability diagram, expected calibration error on the test split), a sortable
    student table with tier, probability, top reasons, recommendations and trend sparklines.
    The page loads nothing from the network; only pseudonymous IDs appear.

    Example:

    \b
      edufl client report --data demo/consortium/institution_01 --out runs/report --week 6
    """
    from client.early_warning.report import score_and_report
    from client.early_warning.scoring import RiskThresholds
    from shared_models.data.contract import load_spec
    from shared_models.devices import resolve_device

    result = score_and_report(
        data,
        model,
        out,
        home=home,
        observed_weeks=week,
        db_path=db,
        rules_path=rules,
        thresholds=RiskThresholds.parse(thresholds),
        spec=load_spec(spec),
        max_rows=max_rows,
        device=resolve_device(device),
    )
    counts = result.warning.scores.tier_counts()
    typer.echo("tiers: " + ", ".join(f"{counts[t]} {t}" for t in counts))
    typer.echo(f"report: {result.html}\ncsv:    {result.csv}")


@user_errors
def watch(
    data: Path = DATA,
    reports: Path = typer.Option(
        ...,
        "--reports",
        help="Folder for the reports: one subfolder per re-scoring, LATEST names the newest.",
    ),
    model: Path | None = MODEL,
    home: Path | None = HOME,
    db: Path = DB,
    rules: Path | None = RULES,
    thresholds: str = THRESHOLDS,
    spec: Path | None = SPEC,
    every: str = typer.Option(
        "7d", "--every", help="Re-score this long after the last time even if nothing changed."
    ),
    poll: str = typer.Option(
        "1m", "--poll", help="How often to check the export's files for a change."
    ),
    keep: int = typer.Option(20, min=1, help="Report folders kept (the newest)."),
    once: bool = typer.Option(False, "--once", help="Check once, then exit (for cron)."),
    max_runs: int | None = typer.Option(
        None, "--max-runs", min=1, help="Exit after this many re-scorings."
    ),
) -> None:
    """Keep scoring as the term goes on: re-score when the export or the model changes.

    Checks the export's files (SHA-256) every --poll; re-scores when they or the adopted
    model changed, or --every after the last re-scoring. Each re-scoring writes a new report
    folder (report.html, students.csv, changes.csv: students who moved up a tier first) and a
    run in the store; earlier reports are kept. A corrupt export is reported and the previous
    report stays the latest. Stop with Ctrl-C.

    Example:

    \b
      edufl client watch --data /srv/sis/export --reports /srv/edufl/reports --every 7d
    """
    from client.early_warning.scoring import RiskThresholds
    from client.early_warning.watch import WatchConfig, parse_duration
    from client.early_warning.watch import watch as run_watch
    from shared_models.data.contract import load_spec

    config = WatchConfig(
        data_dir=data,
        reports_dir=reports,
        db_path=db,
        model=model,
        home=home,
        rules_path=rules,
        thresholds=RiskThresholds.parse(thresholds),
        spec=load_spec(spec),
        every=parse_duration(every),
        poll=parse_duration(poll),
        keep=keep,
    )
    failed = False

    def show(result: Any) -> None:
        nonlocal failed
        stamp = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S")
        if result.outcome == "scored":
            counts = result.changes["change"].value_counts()
            typer.echo(
                f"{stamp} re-scored ({result.reason}) -> {result.report_dir}: "
                f"{int(counts.get('up', 0))} moved up a tier, {int(counts.get('new', 0))} new, "
                f"{int(counts.get('down', 0))} moved down"
            )
        elif result.outcome == "failed":
            typer.secho(f"{stamp} error: {result.error}", fg=typer.colors.RED, err=True)
        else:
            typer.echo(f"{stamp} no re-scoring: {result.reason}")
        failed = result.outcome == "failed"

    if not once and max_runs is None:
        typer.echo(f"watching {data} (checks every {poll}, re-scores every {every}); Ctrl-C stops")
    try:
        run_watch(config, once=once, max_runs=max_runs, on_check=show)
    except KeyboardInterrupt:
        typer.echo("stopped")
        return
    if failed and (once or max_runs is not None):
        raise typer.Exit(USER_ERROR)


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


@rules_app.command("init")
@user_errors
def rules_init(
    spec: Path = typer.Option(..., "--spec", help="The contract the rules are for (TOML)."),
    out: Path | None = typer.Option(
        None, "--out", help="Write the rule file here (refuses to overwrite); stdout if omitted."
    ),
) -> None:
    """Draft a commented rule file for a contract: its indicators listed, a few example rules.

    Example:

    \b
      edufl client rules init --spec my_spec.toml --out my_rules.toml
    """
    from client.early_warning.rules import draft_rules
    from shared_models.data.contract import load_spec

    text = draft_rules(load_spec(spec), str(spec))
    if out is None:
        typer.echo(text, nl=False)
        return
    if out.exists():
        raise typer.BadParameter(
            f"{out} exists; choose another --out or remove it", param_hint="--out"
        )
    out.write_text(text, "utf-8")
    typer.echo(f"{out}: drafted {text.count('[[rule]]')} rule(s); edit, then check with "
               f"`edufl client rules check {out} --spec {spec}`")  # fmt: skip


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
