"""`edufl client keys init` and `edufl client start`: joining a federation as an institution."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from shared_models.cli_support import new_app, user_errors
from shared_models.devices import DEVICE_HELP

#: `client.node.launcher.DEFAULT_MAX_MODEL_PARAMS`, spelled here so `--help` does not import the
#: launcher (tests/test_startup.py checks the two agree).
DEFAULT_MAX_MODEL_PARAMS = 10_000_000
#: `client.node.launcher.NodeOptions.pull_interval`'s default, spelled here for the same reason.
PULL_INTERVAL_S = 0.25

#: Pause between activation attempts; Flower 1.41 frees a crashed session's key after missing
#: two 30-second heartbeats.
ACTIVATION_RETRY_S = 10.0

keys_app = new_app(
    "The institution's node-authentication key pair.\n\n"
    "Example:\n\n\b\n  edufl client keys init --dir uni-a/keys --name uni-a"
)


@keys_app.command("init")
@user_errors
def keys_init(
    keys_dir: Path = typer.Option(..., "--dir", help="Folder to write NAME and NAME.pub into."),
    name: str = typer.Option(..., "--name", help="The institution's name in the consortium."),
    force: bool = typer.Option(False, "--force", help="Replace an existing key pair."),
) -> None:
    """Create this institution's key pair for node authentication (EC P-384, OpenSSH format).

    KEYS/NAME is the private key (mode 0600): it never leaves the institution. Send
    KEYS/NAME.pub to the consortium operator, who enrols it with `edufl server enrol`.
    Refuses to overwrite an existing pair unless --force.

    Example:

    \b
      edufl client keys init --dir uni-a/keys --name uni-a
    """
    from privacy.keys import init_institution_keys

    paths = init_institution_keys(keys_dir, name, force=force)
    typer.echo(f"wrote {paths.private_key}  (private key, 0600: keep it here)")
    typer.echo(f"wrote {paths.public_key}  (send it to the consortium operator)")


@user_errors
def start(
    data: Path = typer.Option(..., "--data", help="This institution's export folder."),
    superlink: str = typer.Option(..., "--superlink", help="HOST:PORT of the consortium server."),
    root_cert: Path | None = typer.Option(
        None, "--root-cert", help="The consortium's CA certificate (ca.pem)."
    ),
    key: Path | None = typer.Option(
        None, "--key", help="Private key from `edufl client keys init` (KEYS/NAME)."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Institution name in logs; default: the key file's name."
    ),
    spec: Path | None = typer.Option(None, "--spec", help="Feature spec TOML; default spec."),
    home: Path | None = typer.Option(
        None,
        "--home",
        help="Node working folder (log, privacy state, the final models the server delivers, "
        "in HOME/models: `edufl client report --home HOME`); default ~/.edufl/NAME.",
    ),
    runtime_port: int = typer.Option(
        0, "--runtime-port", min=0, max=65535, help="Local Runtime API port; 0 picks a free one."
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="Plaintext, no node authentication: local tests only."
    ),
    dp_epsilon: float | None = typer.Option(
        None,
        "--dp-epsilon",
        min=0.01,
        help="This institution's epsilon for a whole run (default: the server's, else 8).",
    ),
    dp_delta: float | None = typer.Option(
        None,
        "--dp-delta",
        min=0.0,
        max=1.0,
        help="This institution's delta; must be below 1/n (default: the server's, 1e-5).",
    ),
    no_dp: bool = typer.Option(
        False,
        "--no-dp",
        help="Allow training without DP when the server asks for none; each such round is "
        "recorded as non-private in the signed ledger.",
    ),
    activation_wait: float = typer.Option(
        90.0,
        "--activation-wait",
        min=0,
        help="Seconds to keep retrying when the SuperLink refuses to activate the node (a "
        "restart right after a crash); 0 gives up at the first refusal.",
    ),
    pull_interval: float = typer.Option(
        PULL_INTERVAL_S,
        "--pull-interval",
        min=0.0,
        max=3.0,
        help="Ask for the next message this many seconds after one, backing off to Flower's "
        "3 s (saves about 1.5 s a round); 0 keeps Flower's own fixed 3 s.",
    ),
    max_model_params: int = typer.Option(
        DEFAULT_MAX_MODEL_PARAMS,
        "--max-model-params",
        min=1,
        help="Refuse a model with more parameters than this from the server, before building "
        "anything from it.",
    ),
    privacy_state: Path | None = typer.Option(
        None,
        "--privacy-state",
        help="Folder of the accountant state and this institution's ledger (default "
        "HOME/privacy); keep it across restarts so spent epsilon keeps counting.",
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    threads: int | None = typer.Option(
        None,
        "--threads",
        min=1,
        help="Torch threads for a round's training and scoring (default: torch's own, one per "
        "core). Give 1 where several nodes or other jobs share the cores: a thread waiting for "
        "a busy core slows the round.",
    ),
) -> None:
    """Join the federation: run a SuperNode that trains on this institution's export.

    Validates the export first (with DATA/mapping.toml, if present, as training will) and
    refuses an unusable one. The node connects to the server
    over TLS, checked against the consortium CA, and authenticates with the institution's key;
    it trains only when the server asks and sends back weights and aggregate metrics, never
    records. Every round trains with DP-SGD (Opacus) under this institution's budget, whatever
    the server proposes, unless --no-dp; the accountant's state and the signed ledger live in
    --privacy-state, so a restarted node keeps counting, and a round that would exceed the
    budget is refused. A node restarted right after a crash may be refused until the server
    notices the old session is gone (up to 60 s): it retries for --activation-wait seconds.
    Runs until Ctrl-C; its log is shown here.

    Example:

    \b
      edufl client start --data demo/consortium/institution_01 --superlink 127.0.0.1:8000 \\
        --root-cert ca.pem --key uni-a/keys/uni-a
    """
    from client.node.launcher import (
        NodeOptions,
        NodeRefused,
        check_credentials,
        check_export,
        follow,
        start_supernode,
    )
    from privacy.keys import check_name
    from shared_models import processes
    from shared_models.devices import parse_device, resolve_device

    device = parse_device(device)
    if device.startswith("cuda"):  # fail here, not at the first round; torch only when needed
        resolve_device(device)  # (this process lives as long as the node: no torch for auto)
    root_cert, key = check_credentials(root_cert, key, insecure, superlink)
    name = check_name(name or (key.name if key is not None else data.resolve().name))
    report = check_export(data, spec)
    typer.echo(f"export {data}: {report.n_students} students, usable")
    if insecure:
        typer.secho(
            "WARNING: --insecure: plaintext transport and no node authentication; the model "
            "and metrics travel unencrypted. Local tests only.",
            fg=typer.colors.YELLOW,
            err=True,
        )
    if no_dp:
        if dp_epsilon is not None or dp_delta is not None:
            raise typer.BadParameter(
                "--no-dp excludes --dp-epsilon and --dp-delta", param_hint="--no-dp"
            )
        typer.secho(
            "WARNING: --no-dp: rounds the server asks without DP train without it; each is "
            "recorded as non-private in the signed ledger, and no epsilon can be claimed for "
            "this institution afterwards.",
            fg=typer.colors.YELLOW,
            err=True,
        )
    elif dp_delta is not None and not 0 < dp_delta < 1:
        raise typer.BadParameter(
            f"delta must be in (0, 1), got {dp_delta:g}", param_hint="--dp-delta"
        )
    elif dp_delta is not None and dp_delta * report.n_students >= 1:
        raise typer.BadParameter(
            f"delta {dp_delta:g} is not below 1/n = {1 / report.n_students:.3g} for this "
            f"export's {report.n_students} students",
            param_hint="--dp-delta",
        )
    home = (home or Path.home() / ".edufl" / name).resolve()
    if not no_dp:
        _check_recorded_budget(privacy_state or home / "privacy", dp_epsilon, dp_delta)
    options = NodeOptions(
        data_dir=data,
        superlink=superlink,
        root_cert=root_cert,
        private_key=key,
        name=name,
        home=home,
        runtime_port=runtime_port or processes.free_port(),
        spec=spec,
        insecure=insecure,
        dp_epsilon=dp_epsilon,
        dp_delta=dp_delta,
        no_dp=no_dp,
        pull_interval=pull_interval or None,  # 0: Flower's own pace
        privacy_state=privacy_state,
        max_model_params=max_model_params,
        device=device,
        threads=threads,
    )
    privacy = "WITHOUT DP when the server asks none" if no_dp else "DP-SGD required"
    deadline = time.monotonic() + activation_wait
    with processes.terminate_on_sigterm():
        while True:
            child = start_supernode(options)
            try:
                typer.echo(
                    f"node {name} started (pid {child.pid}); connecting to {superlink}; {privacy}"
                )
                code = follow(child)
                break
            except NodeRefused as refused:
                if time.monotonic() + ACTIVATION_RETRY_S > deadline:
                    raise
                typer.echo(
                    f"{refused}\n(a crashed earlier session of this key stays marked online "
                    f"for up to 60 s: retrying in {ACTIVATION_RETRY_S:.0f} s, for up to "
                    f"{deadline - time.monotonic():.0f} s more)"
                )
                time.sleep(ACTIVATION_RETRY_S)
            except KeyboardInterrupt:
                typer.echo("stopping")
                code = 0
                break
            finally:
                processes.stop(child)
    if code:
        raise typer.Exit(1)


def _check_recorded_budget(
    state_dir: Path, dp_epsilon: float | None, dp_delta: float | None
) -> None:
    """Refuse --dp-epsilon/--dp-delta that differ from the budget this node's state records.

    A state folder accounts for one budget: a round under another one would fail when it
    arrives (`privacy.accountant_store.reconcile_state`), after the node had started.
    Unset flags are not compared: the server's proposal may lower the default budget.
    """
    from privacy.accountant_store import AccountantStore

    state = AccountantStore(state_dir).load()
    if state is None:
        return
    given = {"--dp-epsilon": dp_epsilon, "--dp-delta": dp_delta}
    recorded = {"--dp-epsilon": state.epsilon_budget, "--dp-delta": state.delta}
    for flag, value in given.items():
        if value is not None and value != recorded[flag]:
            raise typer.BadParameter(
                f"{flag} {value:g} differs from the budget recorded in {state_dir} (epsilon "
                f"{state.epsilon_budget:g}, delta {state.delta:g}, {state.epsilon_spent:.4g} "
                f"spent); start with --dp-epsilon {state.epsilon_budget:g} --dp-delta "
                f"{state.delta:g}, or give a new --privacy-state folder for a new budget",
                param_hint=flag,
            )
