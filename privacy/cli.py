"""`edufl audit ...`: what an auditor runs on a ledger or a trained model.

`verify` and `budget` run without torch: commands import what they run in their bodies.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from shared_models.cli_support import new_app, user_errors

if TYPE_CHECKING:
    from privacy.audit.verify import VerifyReport

app = new_app(
    "Auditor's tools: verify the privacy ledger, recompute every epsilon, attack a model.\n\n"
    "Example:\n\n  edufl audit verify runs/fed/ledger.jsonl --keys server-state/institutions.toml"
)


@app.command()
@user_errors
def verify(
    ledger: Path = typer.Argument(..., help="A ledger.jsonl (consortium or institution copy)."),
    keys: Path | None = typer.Option(
        None,
        "--keys",
        help="Registered public keys: the server's institutions.toml, or a folder of NAME.pub.",
    ),
    heads: list[Path] = typer.Option(
        [],
        "--heads",
        help="Chain ends to expect (an institution's own ledger.jsonl or a heads JSON); "
        "repeat. Without them, entries cut from the end of a chain cannot be noticed.",
    ),
    absent: list[str] = typer.Option(
        [], "--absent", help="A registered institution that took no part in this run; repeat."
    ),
    unauthenticated: bool = typer.Option(
        False,
        "--unauthenticated",
        help="Without a key registry, check only that each chain is consistent with its own key.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check every signature against the registered keys, every chain, and every chain's end.

    Keys and chain ends are found next to a simulation's run folder (privacy/NAME/keys and
    privacy/NAME/ledger.jsonl) or the server's institutions.toml; give them otherwise. Exit 0
    when intact, 1 naming the first bad entry and why, 2 for unusable input (or no key registry
    without --unauthenticated), 3 when nothing wrong was found but the check was incomplete
    (UNAUTHENTICATED, or TAIL UNCHECKED without heads).

    Example:

      edufl audit verify runs/fed/ledger.jsonl --keys server-state/institutions.toml
    """
    from privacy.audit.verify import audit_ledger, exit_code, render_report, report_json

    report, evidence = audit_ledger(
        ledger, keys, heads, absent=absent, unauthenticated=unauthenticated
    )
    if as_json:
        typer.echo(json.dumps(report_json(report), indent=2))
    else:
        typer.echo(render_report(report, evidence))
    raise typer.Exit(exit_code(report))


@app.command()
@user_errors
def budget(
    ledger: Path = typer.Argument(..., help="A ledger.jsonl (consortium or institution copy)."),
    out: Path | None = typer.Option(
        None, "--out", help="Write budget.md, budget.json and epsilon.png into this folder."
    ),
    keys: Path | None = typer.Option(
        None, "--keys", help="Registered public keys, as for `edufl audit verify`."
    ),
    heads: list[Path] = typer.Option(
        [], "--heads", help="Chain ends to expect, as for `edufl audit verify`; repeat."
    ),
    absent: list[str] = typer.Option(
        [], "--absent", help="A registered institution that took no part in this run; repeat."
    ),
    unauthenticated: bool = typer.Option(
        False, "--unauthenticated", help="Recompute without a key registry (says so)."
    ),
) -> None:
    """Verify the ledger, then recompute every claimed epsilon with dp-accounting.

    The ledger is verified first, as `edufl audit verify` does (keys and chain ends found
    next to a run folder's ledger, or given); a ledger that fails is not recomputed (exit 1).
    Per institution and round: claimed vs recomputed epsilon, budget and what remains. Exit 1
    if a claim is understated by more than 1 %, any epsilon is above its budget, delta is not
    below 1/n, or a sample rate does not fit n students.

    Example:

      edufl audit budget runs/fed/ledger.jsonl --out runs/fed/audit
    """
    from privacy.audit.budget import recompute_budget
    from privacy.audit.report import budget_markdown, write_budget_report
    from privacy.audit.verify import audit_ledger
    from privacy.ledger.entries import parse_entries

    verified, _ = audit_ledger(ledger, keys, heads, absent=absent, unauthenticated=unauthenticated)
    if not verified.ok:
        typer.echo(
            f"{ledger}: not recomputed: the ledger fails verification; first bad entry: "
            f"{verified.problems[0]} (details: edufl audit verify {ledger})"
        )
        raise typer.Exit(1)
    if not verified.intact:
        typer.echo(f"{verified.verdict}: see edufl audit verify {ledger}")
    report = recompute_budget(parse_entries(ledger))
    if not report.rows:
        typer.echo(f"{ledger}: no entries")
        raise typer.Exit(0)
    typer.echo(budget_markdown(report))
    if out is not None:
        written = write_budget_report(report, out)
        typer.echo(f"wrote {', '.join(str(p) for p in written.values())}")
    raise typer.Exit(0 if report.ok else 1)


@app.command()
@user_errors
def attack(
    model_dir: Path = typer.Argument(
        ...,
        help="A trained model folder (model.pt + model.json, e.g. `edufl train --out`) or a "
        "federated run folder (its last global model, e.g. `edufl simulate run --out`).",
    ),
    data: list[Path] = typer.Option(
        ..., "--data", help="The export folder(s) the model was trained on; repeat."
    ),
    split: str | None = typer.Option(
        None, help="Split rule used in training (random/stratified); the card's or random."
    ),
    seed: int | None = typer.Option(None, help="Split seed used in training; the card's or 0."),
    claimed_epsilon: float | None = typer.Option(
        None, "--claimed-epsilon", help="Epsilon to compare with; the model card's if recorded."
    ),
    delta: float | None = typer.Option(None, help="Delta of the claim; the card's or 1e-5."),
    spec: Path | None = typer.Option(None, help="Feature spec TOML; the default if omitted."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Membership inference: can the model tell its training students from held-out ones?

    Reports attack AUC, advantage and a 95 % lower bound on epsilon next to the claimed
    epsilon. Exit 1 if the lower bound exceeds the claim (the claim is refuted). For a
    federated run folder the members are every institution's train split and the claim is the
    largest epsilon in the run's ledger.jsonl; give each institution's export with --data.

    Examples:

      edufl audit attack runs/central --data demo/consortium/institution_01 --seed 0

      edufl audit attack runs/demo/federated --data runs/demo/consortium/institution_01 \
        --data runs/demo/consortium/institution_02
    """
    from privacy.audit.attack import attack_trained_model, render_attack
    from shared_models.data.cohort import CohortArrays
    from shared_models.data.contract import load_spec
    from shared_models.data.loader import load_cohort
    from shared_models.errors import DataContractError
    from shared_models.models.artifact import CARD_FILE

    feature_spec = load_spec(spec)
    if (model_dir / "checkpoints").is_dir() and not (model_dir / CARD_FILE).is_file():
        from privacy.audit.federated import attack_federated_run

        result = attack_federated_run(
            model_dir, data, feature_spec, claimed_epsilon=claimed_epsilon, delta=delta
        )
    elif (model_dir / CARD_FILE).is_file():
        cohort = CohortArrays.concatenate([load_cohort(d, feature_spec) for d in data])
        result = attack_trained_model(
            model_dir,
            cohort,
            feature_spec,
            split=split,
            seed=seed,
            delta=delta,
            claimed_epsilon=claimed_epsilon,
        )
    else:
        raise DataContractError(
            f"{model_dir}: neither a trained model folder (model.json) nor a federated run "
            "folder (checkpoints/)"
        )
    if as_json:
        typer.echo(json.dumps(asdict(result) | {"advantage_bound": result.advantage_bound}))
    else:
        typer.echo(render_attack(result))
    refuted = (
        result.claimed_epsilon is not None and result.epsilon_lower_bound > result.claimed_epsilon
    )
    raise typer.Exit(1 if refuted else 0)


def _render(report: VerifyReport) -> str:
    keys = (
        "registered keys"
        if report.keys_from_registry
        else "each chain's own first key (pass --keys to check who signed)"
    )
    lines = [f"{report.path}: {report.entries} entries; signatures checked against {keys}"]
    for name, count in sorted(report.chains.items()):
        head = report.heads.get(name, {})
        lines.append(
            f"  {name:<24} {count:>5} valid entries, head seq {head.get('seq')} "
            f"{str(head.get('hash', ''))[:16]}"
        )
    if report.ok:
        lines.append("=> INTACT")
        return "\n".join(lines)
    lines.append(f"=> TAMPERED OR DAMAGED: first bad entry: {report.problems[0]}")
    lines += [f"  {p}" for p in report.problems[1:20]]
    if len(report.problems) > 20:
        lines.append(f"  ... and {len(report.problems) - 20} more")
    return "\n".join(lines)


def _verify_json(report: VerifyReport) -> dict[str, object]:
    return {
        "path": str(report.path),
        "ok": report.ok,
        "entries": report.entries,
        "chains": report.chains,
        "heads": report.heads,
        "keys_from_registry": report.keys_from_registry,
        "problems": [asdict(p) for p in report.problems],
    }
