"""Versioned global-model checkpoints and the run's metrics log, written so a crash loses nothing.

Layout of a run directory::

    checkpoints/round-0003.weights    global weights after round 3 (shared_models.models.weights:
                                      safetensors, or torch's zip loaded with weights_only)
    checkpoints/round-0003.state      server optimizer state (FedAdam moments ...), if any
    checkpoints/round-0003.json       manifest: round, strategy, model, spec, metrics, hashes
    metrics.jsonl                     one JSON object per completed round

Every file is written to a temporary name and renamed into place. Per round the weights and the
metrics line are written first and the manifest last: the manifest commits the round. On start,
the metrics log is cut back to the last committed round, so a crash between the two can neither
repeat nor lose a round in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared_models.atomic import write_atomic
from shared_models.errors import EduflError
from shared_models.models.weights import load_tensors, load_weights, save_weights
from shared_models.user_files import describe_read_error, loads_json, read_text

logger = logging.getLogger(__name__)

METRICS_LOG = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FORMAT_VERSION = 1


class CheckpointError(EduflError, RuntimeError):
    """A checkpoint is missing, damaged or belongs to a different run."""


@dataclass(frozen=True)
class Checkpoint:
    """A committed round: its manifest and where its files are."""

    round: int
    manifest: dict[str, Any]
    weights_path: Path
    state_path: Path | None
    manifest_path: Path | None = None  # for messages: the file that named the others


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CheckpointStore:
    """Checkpoints and metrics log of one run directory."""

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINTS
        self.metrics_path = self.run_dir / METRICS_LOG

    def _stem(self, server_round: int) -> Path:
        return self.checkpoint_dir / f"round-{server_round:04d}"

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
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        stem = self._stem(server_round)
        weights_path = stem.with_suffix(".weights")
        save_weights(model, weights_path)  # itself written to a temporary name, then renamed
        state_path = None
        if state:
            state_path = stem.with_suffix(".state")
            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
            write_atomic(state_path, lambda tmp: torch.save(tensors, tmp))
        if metrics_record is not None:
            self.append_metrics(metrics_record)
        full = {
            **manifest,
            "format": FORMAT_VERSION,
            "round": server_round,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "weights": weights_path.name,
            "weights_sha256": _sha256(weights_path),
            "state": state_path.name if state_path else None,
            "state_sha256": _sha256(state_path) if state_path else None,
        }
        text = json.dumps(_finite(full), indent=2, sort_keys=True, default=_json_default)
        write_atomic(stem.with_suffix(".json"), lambda tmp: tmp.write_text(text + "\n", "utf-8"))
        logger.info("checkpoint of round %d written to %s", server_round, weights_path)
        return Checkpoint(server_round, full, weights_path, state_path, stem.with_suffix(".json"))

    def checkpoints(self) -> list[Checkpoint]:
        """Committed checkpoints, oldest first.

        Raises:
            CheckpointError: a manifest is unreadable or malformed; the message names it.
        """
        found = []
        for path in sorted(self.checkpoint_dir.glob("round-*.json")):
            try:
                manifest = loads_json(read_text(path))
            except (OSError, ValueError) as exc:
                reason = describe_read_error(exc) if isinstance(exc, OSError) else exc
                raise CheckpointError(
                    f"{path}: unreadable manifest ({reason}); restore it from a backup or "
                    "move the round's files out of the run folder"
                ) from None
            found.append(_checkpoint(path, manifest))
        return sorted(found, key=lambda c: c.round)

    def latest(self) -> Checkpoint | None:
        """The last committed round's checkpoint, or None in a new run directory."""
        found = self.checkpoints()
        return found[-1] if found else None

    def load(self, checkpoint: Checkpoint, model: nn.Module) -> dict[str, np.ndarray]:
        """Load the checkpoint's weights into ``model``; return its strategy state.

        Raises:
            CheckpointError: a file is missing or its hash differs from the manifest's.
        """
        named_in = checkpoint.manifest_path
        _check_file(
            checkpoint.weights_path, checkpoint.manifest.get("weights_sha256"), "weights", named_in
        )
        try:
            load_weights(model, checkpoint.weights_path)
        except ValueError as exc:  # WeightsError names the file
            raise CheckpointError(str(exc)) from None
        if checkpoint.state_path is None:
            return {}
        # Manifests written before state_sha256 existed carry no hash for the state.
        if "state_sha256" in checkpoint.manifest:
            expected = checkpoint.manifest["state_sha256"]
            _check_file(checkpoint.state_path, expected, "state tensors", named_in)
        try:
            tensors = load_tensors(checkpoint.state_path)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        return {k: v.numpy() for k, v in tensors.items()}

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
        self.run_dir.mkdir(parents=True, exist_ok=True)
        text = "".join(
            json.dumps(_finite(r), sort_keys=True, default=_json_default) + "\n" for r in records
        )
        write_atomic(self.metrics_path, lambda tmp: tmp.write_text(text, "utf-8"))


def _checkpoint(path: Path, manifest: Any) -> Checkpoint:
    """The checkpoint a manifest describes; its files must be plain names next to it."""
    problem = None
    if not isinstance(manifest, dict):
        problem = "not a JSON object"
    else:
        round_, weights, state = (manifest.get(k) for k in ("round", "weights", "state"))
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            problem = f"round must be a whole number >= 0, not {round_!r}"[:200]
        elif not _plain_name(weights):
            problem = f"weights must name a file next to the manifest, not {weights!r}"[:200]
        elif state is not None and not _plain_name(state):
            problem = f"state must name a file next to the manifest, not {state!r}"[:200]
    if problem is not None:
        raise CheckpointError(f"{path}: malformed manifest ({problem})")
    return Checkpoint(
        manifest["round"],
        manifest,
        path.with_name(manifest["weights"]),
        path.with_name(manifest["state"]) if manifest.get("state") else None,
        path,
    )


def _plain_name(name: Any) -> bool:
    """A file name without any folder part (a manifest must not point outside its folder)."""
    return (
        isinstance(name, str)
        and 0 < len(name.encode("utf-8", "surrogatepass")) <= 255  # NAME_MAX
        and name not in ("", ".", "..")
        and "\x00" not in name
        and Path(name).name == name
        and "\\" not in name
    )


def _check_file(path: Path, expected: Any, what: str, manifest: Path | None) -> None:
    named = f" (named in {manifest.name})" if manifest is not None else ""
    try:
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint {what} are missing{named}")
        digest = _sha256(path)
    except OSError as exc:
        raise CheckpointError(
            f"{path}: cannot read checkpoint {what}{named} ({exc.strerror})"
        ) from None
    if digest != expected:
        raise CheckpointError(
            f"{path}: {what} do not match the manifest{named} (damaged or replaced)"
        )


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None: strict JSON that every reader accepts."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    """NumPy scalars as numbers, paths as strings."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
