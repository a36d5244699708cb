"""The Flower ``ServerApp`` of the consortium: ``server.app:app``.

It reads the federation config from Flower's run config (``flwr run --run-config`` or the app's
``pyproject.toml``; see `FederationConfig.to_run_config` for the keys), validates it, and runs
or resumes the federation. Everything else lives in `server.federation`.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.config import FederationConfig
from server.federation import run_federation
from shared_models.cli_support import show_each_record_once

logger = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config."""
    show_each_record_once()  # this process's root handler is Opacus' basicConfig
    config = FederationConfig.from_run_config(context.run_config)
    result = run_federation(grid, config, deliver=True)  # the nodes adopt the final model
    logger.info(
        "federation finished after round %d: %s%s",
        result.last_round,
        result.evaluate,
        " (computed from the nodes' noised releases; see metrics.jsonl)" if result.noised else "",
    )
