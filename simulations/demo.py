"""`edufl demo`: the README's main job on the embedded default, the synthetic consortium.

Synthetic consortium → validation → federated training (differentially private when the
privacy wiring is available) → each institution adopts the global model, scores its own
students and writes its advisor report → where to look.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer

from privacy.budget import DEFAULT_EPSILON
from shared_models.cli_support import user_errors


@user_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for everything the demo writes."),
    rounds: int = typer.Option(5, min=1, help="Federated rounds."),
    dp_epsilon: float = typer.Option(
        DEFAULT_EPSILON,
        min=0.0,
        help="Each institution's privacy budget for the run; 0 turns DP off.",
    ),
    seed: int = typer.Option(0, help="Seed of the synthetic consortium and of training."),
) -> None:
    """Run the main job end to end on the synthetic consortium and print the results.

    Generates 4 institutions (1,200 students, 15 weeks), validates every export against the
    data contract, trains the at-risk LSTM federated across the institutions with Opacus DP-SGD
    (epsilon 8 per institution for the whole run by default), then lets each institution score
    its own students with the global model and write an advisor report, and finally audits the
    signed privacy ledger with an independent accountant.
    A previous demo in the same folder is replaced.

    Example:

      edufl demo --out runs/demo
    """
    from client.early_warning.report import score_and_report
    from client.global_model import adopt_global_model
    from server.config import FederationConfig
    from server.federation import progress_line
    from shared_models.data.contract import default_spec
    from shared_models.data.validate import validate_export
    from shared_models.errors import DataContractError
    from shared_models.protocol import RISK_ROC_AUC
    from simulations.runner import simulate
    from simulations.synthetic import write_consortium

    spec = default_spec()
    if out.exists():
        shutil.rmtree(out)  # the demo owns its folder; a rerun starts clean
    consortium = out / "consortium"
    typer.echo(f"[1/5] synthetic consortium -> {consortium}")
    folders = write_consortium(consortium, institutions=4, students=1200, seed=seed, spec=spec)

    typer.echo("[2/5] validating each institution's export against the data contract")
    for folder in folders:
        report, _ = validate_export(folder, spec)
        if not report.usable:
            raise DataContractError(f"{folder}: generated export failed: {report.errors[0]}")
        typer.echo(
            f"      {folder.name}: {report.n_students} students, "
            f"{100 * (report.at_risk_rate or 0):.0f} % at risk, "
            f"{len(report.low_completeness)} incomplete record(s) dropped, usable"
        )

    run_dir = out / "federated"
    dp = f"DP-SGD at epsilon {dp_epsilon:g} per institution" if dp_epsilon > 0 else "no DP"
    typer.echo(f"[3/5] federated LSTM, FedAvg, {rounds} rounds on Ray, {dp} -> {run_dir}")
    settings = {
        "model": "lstm",
        "strategy": "fedavg",
        "rounds": rounds,
        "seed": seed,
        "min_nodes": len(folders),
        "out_dir": run_dir,
        "dp_epsilon": dp_epsilon if dp_epsilon > 0 else None,
    }
    federation = FederationConfig.from_options(None, settings, source="demo")
    started = time.monotonic()
    result = simulate(
        federation, folders, on_round=lambda r: typer.echo("      " + progress_line(r, rounds))
    )
    auc = result.evaluate.get(RISK_ROC_AUC)
    typer.echo(
        f"      done in {time.monotonic() - started:.0f} s; federated test ROC-AUC "
        + ("n/a" if auc is None else f"{auc:.3f}")
    )

    typer.echo("[4/5] each institution scores its own students with the global model")
    reports = []
    for folder in folders:
        local = out / "institutions" / folder.name
        model_dir = adopt_global_model(run_dir, folder, spec, local / "model")
        result_report = score_and_report(
            folder, model_dir, local / "report", db_path=local / "edufl-client.sqlite"
        )
        counts = result_report.warning.scores.tier_counts()
        typer.echo(
            f"      {folder.name}: "
            + ", ".join(f"{n} {t}" for t, n in counts.items())
            + f" -> {result_report.html}"
        )
        reports.append(result_report.html)

    ledger = run_dir / "ledger.jsonl"
    if dp_epsilon > 0:
        typer.echo(f"[5/5] auditing the signed privacy ledger -> {ledger}")
        _audit(ledger, run_dir)
    typer.echo("")
    typer.echo((run_dir / "summary.md").read_text("utf-8"))
    typer.echo("Where to look:")
    typer.echo(f"  federated run     {run_dir / 'summary.md'}, {run_dir / 'rounds.png'}")
    typer.echo(f"  advisor reports   {reports[0].parent.parent.parent}/*/report/report.html")
    typer.echo(f"  checkpoints       {run_dir / 'checkpoints'}")
    if dp_epsilon > 0:
        typer.echo(f"  privacy ledger    {ledger} (audit: {run_dir / 'privacy_audit.md'})")


def _audit(ledger: Path, run_dir: Path) -> None:
    """Verify signatures and chain, recompute every epsilon independently, print a summary."""
    from privacy.audit.budget import recompute_budget
    from privacy.audit.report import budget_markdown, plot_epsilon
    from privacy.audit.verify import audit_ledger
    from privacy.ledger.entries import parse_entries
    from shared_models.atomic import write_text_atomic
    from shared_models.errors import EduflError

    # The run folder keeps every institution's key and own ledger: the full check applies.
    verified, _ = audit_ledger(ledger)
    typer.echo(f"      chain and signatures: {verified.verdict.lower()}")
    report = recompute_budget(parse_entries(ledger))
    write_text_atomic(run_dir / "privacy_audit.md", budget_markdown(report))
    plot_epsilon(report, run_dir / "privacy_epsilon.png")
    for s in report.summaries:
        typer.echo(
            f"      {s.institution}: epsilon {s.claimed or 0:.3f} claimed, "
            f"{s.recomputed:.3f} recomputed, budget {s.budget:g}, "
            f"{'ok' if s.ok else 'MISMATCH'}"
        )
    if not verified.intact or not report.ok:
        raise EduflError(f"{ledger}: the privacy audit failed; see privacy_audit.md")
