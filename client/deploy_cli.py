"""`edufl client keys init` and `edufl client start`: joining a federation as an institution."""

from __future__ import annotations

from pathlib import Path

import typer

from client.deploy import NodeOptions, check_credentials, check_export, follow, start_supernode
from privacy.keys import check_name, init_institution_keys
from shared_models import processes
from shared_models.cli_support import new_app, user_errors

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
        None, "--home", help="Node working folder (log, unpacked apps); default ~/.edufl/NAME."
    ),
    runtime_port: int = typer.Option(
        0, "--runtime-port", min=0, max=65535, help="Local Runtime API port; 0 picks a free one."
    ),
    insecure: bool = typer.Option(
        False, "--insecure", help="Plaintext, no node authentication: local tests only."
    ),
) -> None:
    """Join the federation: run a SuperNode that trains on this institution's export.

    Validates the export first (with DATA/mapping.toml, if present, as training will) and
    refuses an unusable one. The node connects to the server
    over TLS, checked against the consortium CA, and authenticates with the institution's key;
    it trains only when the server asks and sends back weights and aggregate metrics, never
    records. Runs until Ctrl-C; its log is shown here.

    Example:

    \b
      edufl client start --data demo/consortium/institution_01 --superlink 127.0.0.1:8000 \\
        --root-cert ca.pem --key uni-a/keys/uni-a
    """
    root_cert, key = check_credentials(root_cert, key, insecure)
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
    options = NodeOptions(
        data_dir=data,
        superlink=superlink,
        root_cert=root_cert,
        private_key=key,
        name=name,
        home=(home or Path.home() / ".edufl" / name).resolve(),
        runtime_port=runtime_port or processes.free_port(),
        spec=spec,
        insecure=insecure,
    )
    with processes.terminate_on_sigterm():
        child = start_supernode(options)
        try:
            typer.echo(f"node {name} started (pid {child.pid}); connecting to {superlink}")
            code = follow(child)
        except KeyboardInterrupt:
            typer.echo("stopping")
            code = 0
        finally:
            processes.stop(child)
    if code:
        raise typer.Exit(1)
