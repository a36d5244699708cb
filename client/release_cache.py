"""The updates a node released, kept so that a retried round re-sends instead of re-spending.

A server that crashed after its nodes trained round r, but before it committed the round,
resumes from round r-1's checkpoint and asks for round r again, with the same global weights.
Training again would spend the institution's privacy budget a second time for the same round.
Re-sending the very update already released costs nothing more (it is the same output), so the
node keeps its last released updates in its private state folder, keyed by run, round and a
digest of the global weights it started from: the same request gets the same reply, and the
ledger holds the round once. A request with other global weights is a new release and is
trained (and spent) as usual.

Files: ``STATE/released/<run>-r<round>.npz`` (weights, ``allow_pickle=False``) and ``.json``
(digest, aggregate metrics, the signed ledger entry). Only the latest few rounds are kept.
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared_models.atomic import write_atomic, write_text_atomic

logger = logging.getLogger(__name__)

RELEASED_DIR = "released"
#: Rounds kept per state folder; a retry only ever asks for the latest one or two.
KEEP = 3
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True)
class Release:
    """One update as it left the node."""

    weights: dict[str, np.ndarray]
    metrics: dict[str, Any]  # as sent: under DP only released values (`Reply.private`)
    entry: dict[str, Any]  # the round's signed ledger entry
    num_examples: int | None = None  # as sent (under DP the released count); None: not kept


class ReleaseCache:
    """``STATE/released/``: this node's latest released updates."""

    def __init__(self, state_dir: Path | str) -> None:
        self.dir = Path(state_dir) / RELEASED_DIR

    def lookup(self, run_id: str, server_round: int, digest: str) -> Release | None:
        """The update released for this run and round from the same global weights, if any.

        A damaged or mismatching file is ignored (logged): the round is then trained afresh.
        """
        stem = self._stem(run_id, server_round)
        meta_path, array_path = self.dir / f"{stem}.json", self.dir / f"{stem}.npz"
        if not meta_path.exists() or not array_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text("utf-8"))
            if meta.get("digest") != digest:
                return None
            with np.load(array_path, allow_pickle=False) as arrays:
                weights = {name: arrays[name] for name in arrays.files}
            sent = meta.get("num_examples")
            return Release(
                weights,
                dict(meta["metrics"]),
                dict(meta["entry"]),
                None if sent is None else int(sent),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring damaged released update %s (%s)", array_path, exc)
            return None

    def store(self, run_id: str, server_round: int, digest: str, release: Release) -> None:
        """Keep ``release`` (weights first, then the metadata that makes it visible)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = self._stem(run_id, server_round)
        buffer = io.BytesIO()
        np.savez(buffer, **release.weights)
        write_atomic(self.dir / f"{stem}.npz", lambda tmp: tmp.write_bytes(buffer.getvalue()))
        meta = {
            "digest": digest,
            "metrics": release.metrics,
            "entry": release.entry,
            "num_examples": release.num_examples,
        }
        write_text_atomic(self.dir / f"{stem}.json", json.dumps(meta, sort_keys=True))
        self._prune()

    def _prune(self) -> None:
        metas = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in metas[:-KEEP]:
            old.unlink(missing_ok=True)
            old.with_suffix(".npz").unlink(missing_ok=True)

    @staticmethod
    def _stem(run_id: str, server_round: int) -> str:
        return f"{_UNSAFE.sub('_', run_id)[:64]}-r{int(server_round)}"
