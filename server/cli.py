"""`edufl server ...`: what the consortium operator runs — keys, enrolment, the server.

Commands import what they run in their bodies, so `edufl --help` starts without Flower.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import typer

from privacy.budget import DEFAULT_EPSILON
from shared_models.cli_support import new_app, user_errors

app = new_app(
    "Consortium operator: TLS keys, institution enrolment, the federation server.\n\n"
    "Example:\n\n\b\n  edufl server start --keys consortium/keys --state consortium/state"
)
keys_app = new_app(
    "The consortium CA and the server's TLS certificate.\n\n"
    "Example:\n\n\b\n  edufl server keys init --dir consortium/keys --address 127.0.0.1"
)
app.add_typer(keys_app, name="keys")

# Defaults shown in --help, spelled here so that help needs neither `privacy.keys` nor the
# launcher; tests/test_startup.py checks they equal `privacy.keys.DEFAULT_ADDRESSES` and
# `server.superlink.launcher.DEFAULT_ADDRESS`.
DEFAULT_CERT_ADDRESSES = ("127.0.0.1", "localhost")
DEFAULT_ADDRESS = "127.0.0.1:8000"

#: What `edufl server start` proposes to every institution when neither the config nor
#: --dp-epsilon sets it (the demo's and the seed papers' usual budget).
DEFAULT_DEPLOY_EPSILON = DEFAULT_EPSILON

KEYS_DIR = Path("consortium/keys")
STATE_DIR = Path("consortium/state")
STATE_OPTION = typer.Option(
    STATE_DIR, "--state", help="Server state folder: registry, SuperLink database, logs."
)


#: ``--dp-evaluate-every``, shared with ``edufl simulate run``.
DP_EVALUATE_EVERY: int | None = typer.Option(
    None,
    "--dp-evaluate-every",
    min=0,
    help="Under DP, evaluate every N rounds and after the last (default: after the last "
    "only; 0: never). Each evaluation is a noised release the nodes pay for.",
)


#: ``--init-from``, shared with ``edufl simulate run``.
INIT_FROM: Path | None = typer.Option(
    None,
    "--init-from",
    help="Start from this public prior's weights instead of seeded random ones: a model "
    "folder (edufl train), its model.pt, a federated run folder or one checkpoint "
    "(round-NNNN.json), of the same model and contract. The prior must have seen no "
    "private record (e.g. trained on the synthetic consortium or on other public modules): "
    "then the DP guarantee is unchanged; edufl cannot check where a prior's data came from.",
)


@keys_app.command("init")
@user_errors
def keys_init(
    keys_dir: Path = typer.Option(KEYS_DIR, "--dir", help="Folder to write the key files into."),
    addresses: list[str] = typer.Option(
        list(DEFAULT_CERT_ADDRESSES),
        "--address",
        help="Host name or IP address nodes reach the server at (repeat for several).",
    ),
    valid_days: int = typer.Option(825, min=1, help="Validity of the server certificate in days."),
    ca_valid_days: int = typer.Option(
        3650, min=1, help="Validity of the CA in days (at least --valid-days)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace existing key files."),
) -> None:
    """Create the consortium CA and a server certificate for the given addresses.

    Writes ca.pem (give it to every institution), ca.key (keep offline), server.pem and
    server.key (mode 0600). The CA is valid for --ca-valid-days (ten years), longer than the
    server certificate: `edufl server keys renew` makes the next one from the same CA.
    Every --address becomes a subject alternative name: a node must
    reach the server by one of them or TLS refuses the connection. Refuses to overwrite
    existing files unless --force.

    Example:

    \b
      edufl server keys init --dir consortium/keys --address 127.0.0.1 --address localhost
    """
    from privacy.keys import init_consortium_keys

    paths = init_consortium_keys(
        keys_dir, addresses, valid_days=valid_days, ca_valid_days=ca_valid_days, force=force
    )
    typer.echo(f"wrote {paths.ca_cert}  (consortium CA: give it to every institution)")
    typer.echo(f"wrote {paths.ca_key}  (CA private key, 0600: keep it offline)")
    typer.echo(f"wrote {paths.server_cert}  (server certificate for {', '.join(addresses)})")
    typer.echo(f"wrote {paths.server_key}  (server private key, 0600)")


@keys_app.command("renew")
@user_errors
def keys_renew(
    keys_dir: Path = typer.Option(KEYS_DIR, "--dir", help="Folder from `edufl server keys init`."),
    addresses: list[str] | None = typer.Option(
        None,
        "--address",
        help="Host name or IP address nodes reach the server at (repeat for several; "
        "default: those of the current certificate).",
    ),
    valid_days: int = typer.Option(825, min=1, help="Validity of the new certificate in days."),
) -> None:
    """Issue a new server certificate and key from the existing consortium CA.

    Institutions keep their ca.pem: the new certificate is signed by the same CA. Needs
    ca.key (bring it back from where it is kept offline). Restart `edufl server start`
    afterwards; nodes reconnect by themselves.

    Example:

    \b
      edufl server keys renew --dir consortium/keys
    """
    from privacy.keys import load_certificate, renew_server_certificate

    paths = renew_server_certificate(keys_dir, addresses or None, valid_days=valid_days)
    until = load_certificate(paths.server_cert).not_valid_after_utc
    typer.echo(f"wrote {paths.server_cert}  (new server certificate, valid until {until:%Y-%m-%d})")
    typer.echo(f"wrote {paths.server_key}  (new server private key, 0600)")
    typer.echo(f"{paths.ca_cert} is unchanged: institutions keep theirs")


@app.command()
@user_errors
def enrol(
    public_key: Path = typer.Argument(..., help="The institution's NAME.pub (OpenSSH EC key)."),
    name: str = typer.Option(..., "--name", help="The institution's name in the consortium."),
    state: Path = STATE_OPTION,
    replace: bool = typer.Option(
        False,
        "--replace",
        help="The name is enrolled with another key: revoke that key (its node is "
        "unregistered) and enrol this one.",
    ),
) -> None:
    """Enrol an institution: record its public key and let its node into the federation.

    The key must be an EC key on a NIST curve in OpenSSH format, as written by
    `edufl client keys init`. It is recorded in STATE/institutions.toml and registered with
    the SuperLink at once if a server runs from STATE, otherwise at the next
    `edufl server start`. With --replace (key rotation, or a lost key) the name's old key is
    recorded as revoked and can never be enrolled again; ledger entries it signed while it was
    valid still verify.

    Example:

    \b
      edufl server enrol uni-a.pub --name uni-a --state consortium/state
      edufl server enrol uni-a-2026.pub --name uni-a --replace --state consortium/state
    """
    from privacy.keys import load_node_public_key, public_key_line
    from server.institutions import load_registry, save_registry
    from server.superlink import launcher as deploy

    line = public_key_line(load_node_public_key(public_key))
    layout = deploy.ServerLayout(state)
    before = load_registry(state)
    registry = before.with_institution(name, line, replace=replace)
    save_registry(state, registry)
    old = before.institutions.get(name)
    replaced = old is not None and old.public_key != line
    if replaced:
        typer.echo(f"revoked the old key of {name} (recorded in {state / 'institutions.toml'})")
    running = deploy.running_server(layout)
    if running is None:
        typer.echo(f"enrolled {name}; it is registered when `edufl server start` runs")
    elif not running.get("tls"):
        typer.echo(f"enrolled {name}; the running server is --insecure, so keys are not checked")
    else:
        if replaced and old is not None and old.node_id is not None:
            layout.control().unregister_node(old.node_id)
            typer.echo(f"unregistered node {old.node_id} (the old key of {name})")
        registry = deploy.register_institutions(layout, registry)
        node_id = registry.institutions[name].node_id
        typer.echo(f"enrolled {name}; registered with the running SuperLink as node {node_id}")


@app.command()
@user_errors
def revoke(
    name: str = typer.Argument(..., help="The institution's name, as enrolled."),
    state: Path = STATE_OPTION,
) -> None:
    """Remove an institution from the consortium: its node key is refused from now on.

    The institution leaves STATE/institutions.toml and its key is recorded as revoked (it
    cannot be enrolled again; the institution would need a new key pair). A SuperLink running
    from STATE unregisters its node at once; otherwise the next `edufl server start` does.
    Its ledger entries stay in the runs' ledgers: what it spent remains auditable.

    Example:

    \b
      edufl server revoke uni-c --state consortium/state
    """
    from server.superlink import launcher as deploy

    layout = deploy.ServerLayout(state)
    registry, at_once = deploy.revoke_institution(layout, name)
    node_id = registry.revoked[name].node_id
    when = "unregistered from the running SuperLink" if at_once else "refused from the next start"
    node = f"node {node_id}" if node_id else "its node"
    typer.echo(
        f"revoked {name}: key recorded as revoked in {state / 'institutions.toml'}; {node} {when}"
    )


@app.command()
@user_errors
def start(
    keys: Path = typer.Option(KEYS_DIR, "--keys", help="Folder from `edufl server keys init`."),
    state: Path = STATE_OPTION,
    address: str = typer.Option(
        DEFAULT_ADDRESS,
        "--address",
        help="HOST:PORT the SuperLink listens on; HOST must be in the certificate.",
    ),
    config: Path | None = typer.Option(
        None, "--config", help="Federation config TOML (strategy, model, rounds, ...)."
    ),
    rounds: int | None = typer.Option(None, min=1, help="Rounds (overrides the config)."),
    min_nodes: int | None = typer.Option(
        None, min=1, help="Nodes a round waits for (overrides the config)."
    ),
    strategy: str | None = typer.Option(None, help="Strategy name (overrides the config)."),
    model: str | None = typer.Option(None, help="Model name (overrides the config)."),
    out: Path | None = typer.Option(
        None, "--out", help="Run folder: checkpoints and metrics (default STATE/run)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    timeout: float | None = typer.Option(
        None, min=1, help="Stop the run if it has not finished after this many seconds."
    ),
    control_port: int | None = typer.Option(
        None,
        "--control-port",
        min=1,
        max=65535,
        help="Port of the control plane (Flower's Control and Runtime APIs) on 127.0.0.1 "
        "only; default: a free one. Never open it to the network.",
    ),
    keep_running: bool = typer.Option(
        False, "--keep-running", help="Keep the SuperLink up after the run (Ctrl-C stops it)."
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="Plaintext, no node authentication: local tests only."
    ),
    dp_epsilon: float | None = typer.Option(
        None,
        "--dp-epsilon",
        min=0.01,
        help=f"Epsilon proposed to every institution for the run (default "
        f"{DEFAULT_DEPLOY_EPSILON:g}; each node may set its own).",
    ),
    no_dp: bool = typer.Option(
        False,
        "--no-dp",
        help="Propose training without DP (nodes still use DP unless started with --no-dp).",
    ),
    dp_evaluate_every: int | None = DP_EVALUATE_EVERY,
    init_from: Path | None = INIT_FROM,
) -> None:
    """Start the SuperLink with TLS and node authentication, then run the federation.

    The SuperLink keeps its state in STATE/superlink.db, lets in only the nodes of enrolled
    institutions and never installs packages at run time. Training is differentially private
    by default: every institution is asked for DP-SGD at --dp-epsilon (8 unless the config or
    the option says otherwise; each node may hold its own budget), and every round's spend
    arrives in the signed ledger STATE/run/ledger.jsonl. Under DP, the local epochs, batch size
    and learning rate the config does not set take the DP defaults (server.config.DP_DEFAULTS:
    1, 256, 0.03; 0.05 for logistic). The ServerApp run starts at once
    and waits until --min-nodes nodes are connected; its log is shown here. The command ends
    when the run finishes (exit code 0 when it completed), stopping the SuperLink unless
    --keep-running. With --init-from the run starts from a public prior's weights, checked
    here before the SuperLink starts, and recorded (path, SHA-256) in the run's checkpoints
    and summary.md.

    Example:

    \b
      edufl server start --keys consortium/keys --state consortium/state \\
        --address 127.0.0.1:8000 --rounds 3 --min-nodes 3
    """
    from server.config import FederationConfig
    from server.superlink import launcher as deploy
    from server.superlink.control import FINISHED
    from shared_models.deployment import check_flower_version, check_insecure_address
    from shared_models.processes import DeploymentError, split_address, terminate_on_sigterm

    check_flower_version()
    if no_dp and dp_epsilon is not None:
        raise typer.BadParameter(
            "--no-dp and --dp-epsilon exclude each other", param_hint="--no-dp"
        )
    options = {
        "dp_epsilon": dp_epsilon,
        "rounds": rounds,
        "min_nodes": min_nodes,
        "strategy": strategy,
        "model": model,
        "resume": resume or None,
        "dp_evaluate_every": dp_evaluate_every,
        "init_from": init_from,
    }
    federation = FederationConfig.from_options(config, options)
    if no_dp:
        federation = federation.with_dp_epsilon(None)  # non-DP defaults, if not set
        typer.secho(
            "WARNING: --no-dp: the server proposes training without differential privacy; "
            "nodes started with their own --no-dp train without it, and every such round is "
            "recorded as non-private in the signed ledger.",
            fg=typer.colors.YELLOW,
            err=True,
        )
    elif federation.dp_epsilon is None:  # DP is the deployment default
        federation = federation.with_dp_epsilon(DEFAULT_DEPLOY_EPSILON)  # + DP_DEFAULTS
    if out is None and "out_dir" not in federation.model_fields_set:
        out = state / "run"
    # The ServerApp runs in a process the SuperLink starts elsewhere: paths must be absolute.
    federation = federation.model_copy(
        update={
            "out_dir": (out or federation.out_dir).resolve(),
            "spec_path": federation.spec_path.resolve() if federation.spec_path else None,
            "init_from": federation.init_from.resolve() if federation.init_from else None,
        }
    )
    if federation.init_from is not None:  # here, not in the ServerApp's log after the start
        from server.checkpoints import CheckpointStore
        from server.federation import check_prior

        check_prior(federation, CheckpointStore(federation.out_dir).latest())
    host, _ = split_address(address)
    layout = deploy.ServerLayout(state)
    if insecure:
        check_insecure_address(host, "--address")
        typer.secho(
            "WARNING: --insecure: plaintext transport and no node authentication; anyone who "
            f"can reach {address} can join the federation and read the model. Local tests only.",
            fg=typer.colors.YELLOW,
            err=True,
        )
        consortium_keys = None
    else:
        consortium_keys = deploy.check_keys(keys)
        from privacy.keys import check_server_certificate

        if expiring := check_server_certificate(keys):
            typer.secho(f"WARNING: {expiring}", fg=typer.colors.YELLOW, err=True)

    run_id, status = None, "not started"
    with terminate_on_sigterm():
        superlink = deploy.start_superlink(
            layout, address, consortium_keys, control_port=control_port
        )
        try:
            mode = "plaintext, no node authentication" if insecure else "TLS, node authentication"
            typer.echo(f"SuperLink listening on {address} ({mode}); state in {state}")
            typer.echo(
                f"control plane on {deploy.control_address(layout)} (loopback only); "
                f"{address} answers the Fleet API alone"
            )
            stale = deploy.stop_unfinished_runs(layout)
            if stale:
                typer.echo(f"stopped {len(stale)} run(s) an earlier server left unfinished")
            if not insecure:
                registry = deploy.load_and_register(layout)
                names = ", ".join(registry.institutions) or "none yet (edufl server enrol)"
                typer.echo(f"enrolled institutions: {names}")
            run_id = deploy.submit_run(layout, federation.to_run_config())
            privacy = (
                f"DP-SGD, epsilon {federation.dp_epsilon:g} per institution"
                if federation.dp_epsilon is not None
                else "no DP proposed"
            )
            typer.echo(
                f"run {run_id}: {federation.model}, {federation.strategy}, "
                f"{federation.rounds} round(s), {privacy}; waiting for "
                f"{federation.min_nodes} node(s)",
            )
            status = deploy.wait_for_run(layout, superlink, run_id, timeout=timeout)
            typer.echo(f"run {run_id} {status}; results in {federation.out_dir}")
            from server.delivery import delivery_summary  # here: it imports Flower

            for line in delivery_summary(federation.out_dir):
                typer.echo(line)
            if keep_running:
                typer.echo("SuperLink still running; Ctrl-C stops it")
                superlink.process.wait()
        except KeyboardInterrupt:
            typer.echo("stopping")
            status = "interrupted"
        finally:
            if run_id is not None and not status.startswith(FINISHED):
                # Or the SuperLink would start this run again at its next start.
                with contextlib.suppress(DeploymentError):
                    layout.control(timeout=60).stop_run(run_id)
            deploy.stop_superlink(layout, superlink)
    if status != "finished:completed":
        raise typer.Exit(1)
