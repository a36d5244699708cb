"""`edufl client ...`: what a university runs next to its own data.

Commands import what they run in their bodies: `client validate` and `client spec` need pandas
and the contract, never torch or Flower (tests/test_startup.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from shared_models.cli_support import new_app, user_errors

if TYPE_CHECKING:
    from shared_models.data.validate import ValidationReport

app = new_app(
    "University side: check exports against the consortium contract, train, score.\n\n"
    "Example:\n\n  edufl client validate exports/2025-autumn --spec consortium.toml"
)
spec_app = new_app(
    "Inspect the consortium data contract (the feature spec).\n\n"
    "Example:\n\n  edufl client spec show --fingerprint"
)
app.add_typer(spec_app, name="spec")
mapping_app = new_app(
    "Column-mapping files (mapping.toml): how an export's columns, shape and codes meet the "
    "contract (docs/mapping.md).\n\n"
    "Example:\n\n  edufl client mapping init sis_export.csv --spec consortium.toml"
)
app.add_typer(mapping_app, name="mapping")

SPEC_OPTION = typer.Option(None, "--spec", help="Feature spec TOML; the default spec if omitted.")


@app.command()
@user_errors
def validate(
    data_dir: Path = typer.Argument(
        ..., help="Institution export folder (students, activity, outcomes as .csv or .parquet)."
    ),
    spec: Path | None = SPEC_OPTION,
    mapping: Path | None = typer.Option(
        None, help="Column-mapping TOML; DATA_DIR/mapping.toml is used when present."
    ),
    max_problems: int = typer.Option(100, help="Problems to list; 0 lists every one."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check an export against the data contract; exit 0 when usable, 1 when not.

    Reads only; nothing is modified. Lists rows, students, weeks covered, completeness per
    feature, records below the completeness threshold (dropped at load) and every problem with
    file, row and column. Columns that look like direct identifiers are refused.

    Example:

      edufl client validate demo/consortium/institution_01
    """
    from shared_models.data.contract import load_spec
    from shared_models.data.validate import validate_export

    feature_spec = load_spec(spec)
    report, _ = validate_export(data_dir, feature_spec, mapping)
    if as_json:
        typer.echo(json.dumps(_report_json(report), indent=2))
    else:
        typer.echo(render_report(report, max_problems))
    raise typer.Exit(0 if report.usable else 1)


@spec_app.command("show")
@user_errors
def spec_show(
    spec: Path | None = SPEC_OPTION,
    fingerprint_only: bool = typer.Option(False, "--fingerprint", help="Print the hash only."),
) -> None:
    """Print a spec (validated) and its fingerprint.

    Two parties hold the same contract when their fingerprints are equal.

    Example:

      edufl client spec show --fingerprint
    """
    from shared_models.data.contract import load_spec

    feature_spec = load_spec(spec)
    if fingerprint_only:
        typer.echo(feature_spec.fingerprint)
        return
    typer.echo(f"# fingerprint: {feature_spec.fingerprint}")
    typer.echo(feature_spec.to_toml())


@spec_app.command("init")
@user_errors
def spec_init(path: Path = typer.Argument(..., help="Where to write the editable copy.")) -> None:
    """Write a copy of the default spec to edit (refuses to overwrite).

    Example:

      edufl client spec init consortium.toml
    """
    from shared_models.atomic import write_text_atomic
    from shared_models.data.contract import load_spec
    from shared_models.errors import DataContractError

    if path.exists():
        raise DataContractError(f"{path} exists; choose another path or delete it first")
    text = load_spec(None).to_toml()
    write_text_atomic(path, text)
    typer.echo(f"wrote {path}")


@mapping_app.command("init")
@user_errors
def mapping_init(
    export: Path = typer.Argument(..., help="The export file (or a folder holding one file)."),
    spec: Path | None = SPEC_OPTION,
    out: Path | None = typer.Option(
        None, "--out", help="Write here (refuses to overwrite); printed when omitted."
    ),
) -> None:
    """Draft a mapping.toml from an export's header and codes: column matches, a wide table's
    per-period patterns, and the distinct codes of each category column.

    The matches are guesses by name; check them, then run `edufl client validate`.

    Example:

      edufl client mapping init sis/data.csv --spec consortium.toml --out sis/mapping.toml
    """
    from shared_models.atomic import write_text_atomic
    from shared_models.data.contract import load_spec
    from shared_models.data.mapping_draft import draft_mapping
    from shared_models.errors import DataContractError

    text = draft_mapping(export, load_spec(spec))
    if out is None:
        typer.echo(text, nl=False)
        return
    if out.exists():
        raise DataContractError(f"{out} exists; choose another path or delete it first")
    write_text_atomic(out, text)
    typer.echo(f"wrote {out}; check the matches, then `edufl client validate`")


def render_report(report: ValidationReport, max_problems: int = 100) -> str:
    """The human-readable validation report."""
    verdict = "USABLE" if report.usable else "NOT USABLE"
    lines = [
        f"Export {report.data_dir}",
        f"  contract   {report.spec_name} {report.spec_version} "
        f"(fingerprint {report.spec_fingerprint[:12]})",
    ]
    for table, n in report.rows.items():
        lines.append(f"  {table:<10} {n:>8} rows  ({report.files[table]})")
    if report.n_students:
        lines.append(f"  records    {report.n_students:>8} students (one per student and term)")
    if report.weeks_covered:
        lo, hi = report.weeks_covered
        lines.append(
            f"  {report.period + 's':<10} {lo}-{hi}; {report.students_with_all_weeks} "
            f"student(s) have every {report.period}"
        )
    if report.at_risk_rate is not None:
        lines.append(f"  at risk    {100 * report.at_risk_rate:7.1f} % of students with an outcome")
    if report.feature_completeness:
        lines.append("  completeness per feature (observed cells / students x weeks):")
        for name, share in report.feature_completeness.items():
            lines.append(f"    {name:<22} {100 * share:6.1f} %")
    if report.low_completeness:
        lines.append(
            f"  {len(report.low_completeness)} record(s) below the completeness threshold "
            "(dropped when loading):"
        )
        for sid, term, share in report.low_completeness[:10]:
            lines.append(f"    {sid} ({term}): {100 * share:.0f} %")
        if len(report.low_completeness) > 10:
            lines.append(f"    ... and {len(report.low_completeness) - 10} more")
    problems = report.errors + report.warnings
    if problems:
        lines.append(f"  {len(report.errors)} error(s), {len(report.warnings)} warning(s):")
        shown = problems if max_problems <= 0 else problems[:max_problems]
        lines.extend(f"    {p}" for p in shown)
        if len(shown) < len(problems):
            lines.append(
                f"    ... and {len(problems) - len(shown)} more (--max-problems 0 lists all)"
            )
    lines.append(f"=> {verdict}")
    return "\n".join(lines)


def _report_json(report: ValidationReport) -> dict[str, object]:
    data = asdict(report)
    data["data_dir"] = str(report.data_dir)
    data["usable"] = report.usable
    data["problems"] = [asdict(p) for p in report.problems]
    return data


# Deployment: the node's keys and the SuperNode (client/node/cli.py).
from client.node.cli import keys_app, start  # noqa: E402

app.add_typer(keys_app, name="keys")
app.command("start")(start)

# Local early warning: scoring, advisor reports, actions, rules (client/early_warning/cli.py).
from client.early_warning.cli import (  # noqa: E402
    actions_app,
    adopt,
    report,
    rules_app,
    score,
    watch,
)

app.command("adopt")(adopt)
app.command("score")(score)
app.command("report")(report)
app.command("watch")(watch)
app.add_typer(actions_app, name="actions")
app.add_typer(rules_app, name="rules")

from privacy.pseudonymize_cli import pseudonymize  # noqa: E402

app.command("pseudonymize")(pseudonymize)
