"""`edufl demo`: the README's main job on the embedded default, the synthetic consortium.

Synthetic consortium → validation → federated training (differentially private when the
privacy wiring is available) → each institution adopts the global model (`edufl client adopt`:
verified, calibrated on its own validation split), scores its own students and writes its
advisor report → where to look.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from privacy.budget import DEFAULT_EPSILON
from shared_models.cli_support import user_errors

if TYPE_CHECKING:
    from server.config import FederationConfig

#: What the tiers must mean on each institution's students (issue 18's "done when").
TARGETS = {"low_rate_max": 0.20, "high_rate_min": 0.70, "high_share_min": 0.05, "ece_max": 0.05}

#: Students per institution. An ECE of 0.05 is only measurable on a test split of several
#: hundred students: at 26-56 (institutions of 161-464) a perfectly calibrated model already
#: shows 0.09-0.12 from sampling noise alone; each 15 % test split here holds 900-1,350.
#: DP-SGD also needs the numbers: noise is added per batch, so more students per institution
#: means less noise per student for the same epsilon. Sizes still differ (non-IID).
INSTITUTION_SIZES = (6000, 7000, 8000, 9000)

#: The model the demo trains by default (issue 19: the better private model on the demo's
#: consortium, docs/results.md "DP-aware defaults").
DEMO_MODEL = "logistic"


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
    model: str = typer.Option(
        DEMO_MODEL,
        help="The at-risk model the consortium trains (edufl simulate run --help lists them); "
        "'logistic' is the DP logistic regression on engineered weekly features.",
    ),
) -> None:
    """Run the main job end to end on the synthetic consortium and print the results.

    Generates 4 institutions (6,000 to 9,000 students each, 15 weeks), validates every export
    against the data contract, trains the at-risk model (``--model``, by default the DP logistic
    regression on engineered weekly features, the better private model on this consortium)
    federated across the institutions with Opacus DP-SGD (epsilon 8 per institution for the
    whole run by default; the DP defaults: batches of 256, one local epoch per round), then
    lets each institution adopt the global model, calibrate it on its own validation split,
    score its own students and write an advisor report, and finally audits the signed privacy
    ledger with an independent accountant.
    A previous demo in the same folder is replaced.

    Example:

      edufl demo --out runs/demo
    """
    from client.early_warning.adopt import adopt
    from client.early_warning.report import score_and_report
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
    folders = write_consortium(
        consortium,
        institutions=len(INSTITUTION_SIZES),
        sizes=INSTITUTION_SIZES,
        seed=seed,
        spec=spec,
    )

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
    typer.echo(f"[3/5] federated {model}, FedAvg, {rounds} rounds on Ray, {dp} -> {run_dir}")
    federation = federation_config(rounds, seed, dp_epsilon, len(folders), run_dir, model)
    started = time.monotonic()
    result = simulate(
        federation, folders, on_round=lambda r: typer.echo("      " + progress_line(r, rounds))
    )
    auc = result.evaluate.get(RISK_ROC_AUC)
    released = result.released.get(RISK_ROC_AUC) if result.noised else None
    how = (
        f" (from the institutions' noised histograms, noise std {released['noise_std']:.3g} "
        "per count)"
        if isinstance(released, dict)
        else ""
    )
    typer.echo(
        f"      done in {time.monotonic() - started:.0f} s; federated test ROC-AUC "
        + ("n/a" if auc is None else f"{auc:.3f}{how}")
    )

    typer.echo(
        "[4/5] each institution adopts the global model (calibrated on its own validation "
        "split), scores its own students"
    )
    reports, missed = [], []
    for folder in folders:
        local = out / "institutions" / folder.name
        adopted = adopt(run_dir, folder, spec, home=local)  # as `edufl client adopt` does
        result_report = score_and_report(
            folder, None, local / "report", home=local, db_path=local / "edufl-client.sqlite"
        )
        typer.echo(f"      {folder.name}: -> {result_report.html}")
        lines = tier_summary(result_report.warning, adopted.calibration)
        for line in lines:
            typer.echo("        " + line)
        if "MISSED" in lines[-1]:
            missed.append(folder.name)
        reports.append(result_report.html)
    typer.echo(
        f"      tier and calibration targets met by {len(folders) - len(missed)} of "
        f"{len(folders)} institutions" + (f" (missed: {', '.join(missed)})" if missed else "")
    )

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


def federation_config(
    rounds: int, seed: int, dp_epsilon: float, nodes: int, run_dir: Path, model: str = DEMO_MODEL
) -> FederationConfig:
    """The demo's federation: ``model``, FedAvg, every institution in every round.

    Under DP (``dp_epsilon`` > 0) local training takes the shipped DP defaults
    (`server.config.DP_DEFAULTS`), as `edufl simulate run` and `edufl server start` do.
    """
    from server.config import FederationConfig

    settings = {
        "model": model,
        "strategy": "fedavg",
        "rounds": rounds,
        "seed": seed,
        "min_nodes": nodes,
        "out_dir": run_dir,
        "dp_epsilon": dp_epsilon if dp_epsilon > 0 else None,
    }
    return FederationConfig.from_options(None, settings, source="demo")


def tier_summary(warning: Any, calibration: Any) -> list[str]:
    """Tier counts, observed at-risk rate per tier, share in high, test-split ECE vs targets.

    Args:
        warning: the institution's `EarlyWarning` (all its students, scored at term's end).
        calibration: its adoption's `CalibrationReport`.
    """
    from client.early_warning.scoring import tier_outcomes

    scores = warning.scores
    counts, outcomes = scores.tier_counts(), tier_outcomes(scores, warning.cohort.at_risk)
    n = max(len(scores), 1)
    high_share = counts["high"] / n
    low_rate, high_rate = outcomes["low"][1], outcomes["high"][1]
    lines = [
        "tiers "
        + ", ".join(f"{counts[t]} {t}" for t in counts)
        + f"; high {100 * high_share:.0f} % of students",
        "observed at-risk rate "
        + ", ".join(
            f"{t} {'n/a' if r != r else f'{100 * r:.0f} %'} (n={k})"
            for t, (k, r) in outcomes.items()
        ),
    ]
    checks = {
        f"low <= {100 * TARGETS['low_rate_max']:.0f} %": low_rate <= TARGETS["low_rate_max"],
        f"high >= {100 * TARGETS['high_rate_min']:.0f} %": high_rate >= TARGETS["high_rate_min"],
        f"high share >= {100 * TARGETS['high_share_min']:.0f} %": (
            high_share >= TARGETS["high_share_min"]
        ),
    }
    if calibration is not None and calibration.calibrated is not None:
        raw, cal = calibration.raw.ece, calibration.calibrated.ece
        lines.append(
            f"ECE on its test split (n={calibration.calibrated.n}): {raw:.3f} raw, {cal:.3f} "
            f"calibrated ({calibration.calibrator.method}); a perfectly calibrated model would "
            f"show about {calibration.ece_noise_floor:.3f} at this n"
        )
        checks[f"ECE <= {TARGETS['ece_max']:g}"] = cal <= TARGETS["ece_max"]
    lines.append(
        "targets: " + ", ".join(f"{k} {'ok' if ok else 'MISSED'}" for k, ok in checks.items())
    )
    return lines


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
