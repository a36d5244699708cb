"""`edufl client pseudonymize`: a typer command function, registered by ``client/cli.py``."""

from __future__ import annotations

from pathlib import Path

import typer

from shared_models.cli_support import user_errors


@user_errors
def pseudonymize(
    in_dir: Path = typer.Argument(..., help="The institution's raw export folder (read only)."),
    out_dir: Path = typer.Argument(..., help="Empty folder for the pseudonymised export."),
    secret: Path = typer.Option(
        ...,
        "--secret",
        help="The institution's secret key file (created with mode 0600 if absent). Keep it "
        "and never share it: the same secret gives the same pseudonyms next term.",
    ),
    k: int = typer.Option(5, "--k", min=2, help="Report attribute groups smaller than k."),
    quasi: list[str] = typer.Option(
        [],
        "--quasi",
        help="Static column to judge k-anonymity on (repeat); categorical ones by default.",
    ),
    spec: Path | None = typer.Option(None, help="Feature spec TOML; the default if omitted."),
    mapping: Path | None = typer.Option(
        None, help="Column-mapping TOML; IN_DIR/mapping.toml is used when present."
    ),
) -> None:
    """Replace student numbers with keyed pseudonyms and keep only the contract's columns.

    Pseudonyms are HMAC-SHA256 of the local student number under the institution's secret:
    stable across tables and exports, and irreversible without the secret, which never leaves
    the institution. Direct identifiers (names, e-mails, ...) and other columns outside the
    data contract are dropped. Groups of fewer than k students sharing the same static
    attributes are reported.

    Example:

      edufl client pseudonymize exports/raw exports/pseudonymised --secret ~/.edufl/secret --k 5
    """
    from privacy.pseudonymize import load_or_create_secret, pseudonymize_export, render_report
    from shared_models.data.contract import load_spec

    feature_spec = load_spec(spec)
    key = load_or_create_secret(secret)
    report = pseudonymize_export(
        in_dir,
        out_dir,
        key,
        feature_spec,
        k=k,
        quasi_identifiers=quasi or None,
        mapping_path=mapping,
    )
    typer.echo(render_report(report))
