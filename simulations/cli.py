"""The `edufl` command, assembled from each package's own sub-commands."""

from __future__ import annotations

import typer

from client.cli import app as client_app
from privacy.cli import app as audit_app
from server.cli import app as server_app
from shared_models.cli_support import configure_logging, new_app
from simulations.channel_attack import channel_attack
from simulations.demo import demo
from simulations.reproduce.cli import reproduce
from simulations.simulate_cli import app as simulate_app
from simulations.train_cli import train

app = new_app(
    "edufl: federated, differentially private student-success models for university consortia.\n\n"
    "Examples:\n\n"
    "  edufl simulate synth demo/consortium          # the embedded synthetic consortium\n\n"
    "  edufl client validate demo/consortium/institution_01\n\n"
    "  edufl reproduce --list                         # the seed papers' experiments"
)
app.add_typer(client_app, name="client")
app.add_typer(simulate_app, name="simulate")
app.add_typer(server_app, name="server")
app.add_typer(audit_app, name="audit")
# The node-driving attack needs client and server: registered here, the one layer above both.
audit_app.command("channel-attack")(channel_attack)
app.command()(train)
app.command()(demo)
app.command()(reproduce)


@app.callback()
def _root(
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, show_default=False, help="-v info, -vv debug."
    ),
) -> None:
    configure_logging(verbose)


def main() -> None:
    from simulations.fast_exit import exit_process

    try:
        app(prog_name="edufl")
    except SystemExit as done:  # typer always ends this way, success included
        exit_process(done.code)  # without module teardown: seconds after torch and Ray


if __name__ == "__main__":
    main()
