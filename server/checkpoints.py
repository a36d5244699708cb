"""A run folder's checkpoint store and metrics log, written so a crash loses nothing.

Layout of a run directory (the checkpoint format is `shared_models.models.checkpoints`)::

    checkpoints/round-0003.{weights,state,json}   the global model after round 3, committed
                                                  by its manifest
    metrics.jsonl                                 one JSON object per completed round

Files are private to the server's user: 0600, in a ``checkpoints`` folder made 0700 before
anything is written to it (a run folder edufl creates is 0700 too; one that exists keeps its
mode). Every file is written to a temporary name and renamed into place. Per round the weights
and the metrics line are written first and the manifest last: the manifest commits the round.
On start, the metrics log is cut back to the last committed round, so a crash between the two
can neither repeat nor lose a round in the log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from shared_models.atomic import write_text_atomic
from shared_models.models.checkpoints import (
    CHECKPOINTS,
    Checkpoint,
    CheckpointError,
    json_text,
    list_checkpoints,
    load_checkpoint,
    write_checkpoint,
)
from shared_models.user_files import describe_read_error, loads_json, read_text

__all__ = ["METRICS_LOG", "Checkpoint", "CheckpointError", "CheckpointStore"]

logger = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"
#: Modes of what a run folder holds: the global model is the consortium's, not the world's.
PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700


class CheckpointStore:
    """Checkpoints and metrics log of one run directory."""

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINTS
        self.metrics_path = self.run_dir / METRICS_LOG

    def save(
        self,
        server_round: int,
        model: nn.Module,
        manifest: Mapping[str, Any],
        *,
        state: Mapping[str, np.ndarray] | None = None,
        metrics_record: Mapping[str, Any] | None = None,
    ) -> Checkpoint:
        """Commit round ``server_round``: weights, optional state, metrics line, then manifest.

        Args:
            server_round: the round just completed (1-based).
            model: a model holding the round's global weights.
            manifest: run facts to record (strategy, model, spec fingerprint, metrics ...).
            state: server-side strategy state to restore on resume.
            metrics_record: the round's line for ``metrics.jsonl``.
        """

        def log_the_round() -> None:  # before the manifest commits the round: see the docstring
            if metrics_record is not None:
                self.append_metrics(metrics_record)

        self._private_folders()
        checkpoint = write_checkpoint(
            self.checkpoint_dir,
            server_round,
            model,
            manifest,
            state=state,
            before_commit=log_the_round,
        )
        # Written with the umask's mode, in a folder nobody else can enter: narrowed now.
        for path in (checkpoint.weights_path, checkpoint.state_path, checkpoint.manifest_path):
            if path is not None:
                os.chmod(path, PRIVATE_FILE)
        logger.info("checkpoint of round %d written to %s", server_round, checkpoint.weights_path)
        return checkpoint

    def checkpoints(self) -> list[Checkpoint]:
        """Committed checkpoints, oldest first.

        Raises:
            CheckpointError: a manifest is unreadable or malformed; the message names it.
        """
        return list_checkpoints(self.checkpoint_dir)

    def latest(self) -> Checkpoint | None:
        """The last committed round's checkpoint, or None in a new run directory."""
        found = self.checkpoints()
        return found[-1] if found else None

    def load(self, checkpoint: Checkpoint, model: nn.Module) -> dict[str, np.ndarray]:
        """Load the checkpoint's weights into ``model``; return its strategy state.

        Raises:
            CheckpointError: a file is missing or its hash differs from the manifest's.
        """
        return load_checkpoint(checkpoint, model)

    # --- metrics log --------------------------------------------------------------------------

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every line of ``metrics.jsonl`` (empty when there is none).

        Raises:
            CheckpointError: the log is unreadable or a line is not a round's JSON object.
        """
        if not self.metrics_path.is_file():
            return []
        try:
            lines = read_text(self.metrics_path).splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{self.metrics_path}: unreadable metrics log ({describe_read_error(exc)})"
            ) from None
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = loads_json(line)
            except ValueError as exc:
                record = exc
            round_ = record.get("round", 0) if isinstance(record, dict) else None
            if not isinstance(round_, int) or isinstance(round_, bool):
                raise CheckpointError(
                    f"{self.metrics_path} line {number}: not a round's metrics record; the "
                    "checkpoints hold the run: delete this line (or the log) to go on"
                )
            records.append(record)
        return records

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Add one line to the log (the whole file is rewritten and renamed into place)."""
        self._write_metrics([*self.read_metrics(), dict(record)])

    def trim_metrics(self, last_round: int) -> int:
        """Drop log lines of rounds after ``last_round`` (never committed); returns how many."""
        records = self.read_metrics()
        kept = [r for r in records if int(r.get("round", 0)) <= last_round]
        if len(kept) != len(records):
            self._write_metrics(kept)
            logger.warning(
                "dropped %d metrics line(s) of uncommitted rounds after round %d",
                len(records) - len(kept),
                last_round,
            )
        return len(records) - len(kept)

    def _write_metrics(self, records: list[dict[str, Any]]) -> None:
        self.run_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        text = "".join(json_text(r) + "\n" for r in records)
        write_text_atomic(self.metrics_path, text, mode=PRIVATE_FILE)

    def _private_folders(self) -> None:
        """The run folder (if new) and its ``checkpoints`` folder (always) made 0700."""
        self.run_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        if self.checkpoint_dir.stat().st_mode & 0o077:
            self.checkpoint_dir.chmod(PRIVATE_DIR)
