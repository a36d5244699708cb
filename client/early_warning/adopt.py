"""Adopting a federated result: the institution's own, calibrated model folder, kept in its home.

`edufl client adopt RUN_DIR|CHECKPOINT --data EXPORT` verifies the checkpoint (weights checksum,
data contract fingerprint against the institution's own spec, run id), pairs the global weights
with this institution's normalisation, calibrates the probabilities on its own validation split
(`client.early_warning.calibration`) and writes the model folder::

    HOME/models/20250101T120000Z-1a2b3c4d-r0005/   model.pt, model.json, calibration.json,
                                                    adoption.json (what was adopted, from where)
    HOME/models/LATEST                              the folder name of the latest adoption

The folder is built under a hidden name and renamed into place, then LATEST is replaced, so a
crash leaves either the previous adoption or the whole new one. `edufl client score | report`
use LATEST when ``--model`` is omitted; ``--model`` takes a model folder, its ``model.pt``, a
run folder or one checkpoint (`resolve_model`). Nothing here leaves the institution.

In a deployment the server delivers the final global model to every node after the last round;
the node verifies it and adopts it the same way (`adopt_delivery`, called by `client.app`), so
each institution's home holds the federation's model without a file copied by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.early_warning.calibration import CalibrationReport
from shared_models.atomic import write_text_atomic
from shared_models.data.contract import FeatureSpec
from shared_models.errors import DataContractError, PublicError
from shared_models.models.artifact import CARD_FILE, model_folder_of
from shared_models.models.checkpoints import (
    CHECKPOINTS,
    Checkpoint,
    CheckpointError,
    checkpoint_seed,
    is_checkpoint_path,
    list_checkpoints,
    read_checkpoint,
)
from shared_models.models.checkpoints import checkpoint_manifest as shared_checkpoint_manifest
from shared_models.protocol import Delivery, weights_sha256
from shared_models.user_files import loads_json, read_text

logger = logging.getLogger(__name__)

MODELS = "models"
LATEST = "LATEST"
ADOPTION_FILE = "adoption.json"
DELIVERED = "delivered"  # HOME/delivered/RUN/checkpoints: the final models servers delivered
HOME_ENV = "EDUFL_HOME"


def default_home() -> Path:
    """``$EDUFL_HOME``, else ``~/.edufl/client`` (a node passes its own ``--home``)."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".edufl" / "client")


@dataclass(frozen=True)
class Adoption:
    """One adopted federated result."""

    model_dir: Path
    run_id: str
    round: int
    calibration: CalibrationReport | None


def adopt(
    source: Path,
    data_dir: Path,
    spec: FeatureSpec,
    *,
    home: Path | None = None,
    out: Path | None = None,
    run_id: str | None = None,
    calibration: str = "auto",
    record_extra: Mapping[str, Any] | None = None,
) -> Adoption:
    """Adopt a run folder's final global model, or one checkpoint, for this institution.

    Args:
        source: a run folder, its ``checkpoints`` folder, or one ``round-NNNN.json`` (or
            ``.weights``).
        data_dir: this institution's labelled export (a past term): its train split fixes the
            normalisation, its validation split the calibration, its test split the reported
            calibration error. The splits are the node's own (the federation's seed).
        home: the institution's home; the adoption goes to ``home/models`` and becomes LATEST.
        out: write the model folder here instead (the home is left alone).
        run_id: the run the institution took part in; a checkpoint of another run is refused.
        calibration: ``auto``, ``isotonic``, ``sigmoid`` or ``identity``.
        record_extra: more facts for ``adoption.json`` (a delivery's checksum).

    Raises:
        DataContractError: no checkpoint, a damaged one, another contract or run, an export
            without both outcomes in its validation split, or ``out`` holds something else.
    """
    from client.early_warning.scoring import calibrate_model_dir
    from client.global_model import adopt_global_model

    manifest_path = checkpoint_manifest(Path(source))
    found = _verified(manifest_path, Path(source), run_id)
    the_run = str(found.manifest.get("run_id") or "")
    if out is not None:
        target = Path(out)
        if (
            target.exists()
            and not (target / CARD_FILE).is_file()
            and (not target.is_dir() or any(target.iterdir()))
        ):
            raise DataContractError(
                f"{target}: exists and is not a model folder; choose an empty or new --out"
            )
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        # The run id comes from the checkpoint (a server's text): never a path in a name.
        run_tag = re.sub(r"[^A-Za-z0-9_-]", "_", the_run[:8]) or "norun"
        target = (home or default_home()) / MODELS / f"{stamp}-{run_tag}-r"
        target = target.with_name(f"{target.name}{found.round:04d}")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        adopt_global_model(manifest_path, Path(data_dir), spec, stage)
        report = calibrate_model_dir(
            stage, Path(data_dir), spec, seed=checkpoint_seed(found), method=calibration
        )
        record = {
            "run_id": the_run,
            "round": found.round,
            "checkpoint": str(manifest_path.resolve()),
            "checkpoint_sha256": _sha256(manifest_path),
            "weights_sha256": found.manifest.get("weights_sha256"),
            "spec_fingerprint": spec.fingerprint,
            "data_dir": str(Path(data_dir).resolve()),
            "calibration": report.calibrator.method,
            "adopted": datetime.now(UTC).isoformat(timespec="seconds"),
            **(record_extra or {}),
        }
        write_text_atomic(stage / ADOPTION_FILE, json.dumps(record, indent=2) + "\n")
        _replace_folder(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if out is None:
        write_text_atomic(target.parent / LATEST, target.name + "\n")
    logger.info("adopted round %d of run %s into %s", found.round, the_run or "?", target)
    return Adoption(target, the_run, found.round, report)


class DeliveryRefused(DataContractError, PublicError):
    """A delivered final model that failed a check: it was not adopted.

    Public: each check reads only the message, the node's spec and its ledger.
    """


def adopt_delivery(
    weights: Mapping[str, Any],
    delivery: Delivery,
    data_dir: Path,
    spec: FeatureSpec,
    *,
    home: Path,
    ledger: Path | None,
) -> Adoption:
    """Verify the final global model the server delivered, then adopt it into ``home``.

    Checked before anything is written: the weights' checksum (`weights_sha256`), that they
    are finite, the contract fingerprint against this node's own spec, that this node's own
    ledger holds rounds of the run (it took part) and none after the delivered round (not an
    older model), and that the weights fit the model the delivery names. The weights are then
    kept as a checkpoint in ``HOME/delivered/RUN/checkpoints`` and adopted like any checkpoint
    (`adopt`: normalisation from the train split, calibration on the validation split; an
    export whose validation split cannot fit one is adopted uncalibrated, with a warning). The
    same delivery again (a server asking twice) returns the earlier adoption.

    Args:
        weights: name -> numpy array, as received.
        ledger: this node's ledger file (``PRIVACY_STATE/ledger.jsonl``); None: it keeps none.

    Raises:
        DeliveryRefused: a check failed; nothing was written and LATEST is unchanged.
        DataContractError: the checks passed but the adoption failed (the export).
    """
    import numpy as np

    from shared_models.models.checkpoints import write_checkpoint
    from shared_models.models.registry import build_model
    from shared_models.models.weights import assign_weights

    settings = delivery.settings
    what = f"the final model of run {settings.run_id} (round {settings.server_round})"
    keep = "; this node keeps its previous model"
    if weights_sha256(weights) != delivery.weights_sha256:
        raise DeliveryRefused(
            f"refused {what}: its weights do not match the checksum sent with them (damaged "
            f"or altered on the way){keep}"
        )
    if not all(np.isfinite(np.asarray(v, dtype=float)).all() for v in weights.values()):
        raise DeliveryRefused(f"refused {what}: its weights hold NaN or infinite values{keep}")
    if settings.spec_fingerprint != spec.fingerprint:
        raise DeliveryRefused(
            f"refused {what}: it was trained on contract {settings.spec_fingerprint[:12]}, not "
            f"this node's ({spec.name} {spec.version}, {spec.short_fingerprint}){keep}"
        )
    _check_took_part(ledger, settings.run_id, settings.server_round, what, keep)
    earlier = _delivered_before(home, delivery)
    if earlier is not None:
        logger.info("%s was adopted before, into %s", what, earlier)
        return Adoption(earlier, settings.run_id, settings.server_round, None)
    try:
        model = build_model(
            settings.model,
            spec.weeks,
            len(spec.dynamic),
            len(spec.static_names),
            settings.model_overrides,
        )
        assign_weights(model, weights)
    except (ValueError, TypeError) as exc:  # other names or shapes than the model named
        raise DeliveryRefused(
            f"refused {what}: its weights do not fit its model ({exc}){keep}"
        ) from None
    folder = home / DELIVERED / _safe_name(settings.run_id) / CHECKPOINTS
    manifest = {
        "model": settings.model,
        "model_overrides": settings.model_overrides,
        "task": settings.task,
        "seed": settings.seed,
        "spec_fingerprint": settings.spec_fingerprint,
        "spec": f"{spec.name} {spec.version}",
        "run_id": settings.run_id,
        "delivered_sha256": delivery.weights_sha256,
    }
    saved = write_checkpoint(folder, settings.server_round, model, manifest)
    assert saved.manifest_path is not None  # write_checkpoint always names it
    extra = {"delivered": True, "delivered_sha256": delivery.weights_sha256}
    try:
        return adopt(saved.manifest_path, data_dir, spec, home=home, record_extra=extra)
    except DataContractError as exc:
        # Mostly a validation split without both outcomes: an uncalibrated model still
        # scores; the institution may calibrate later with `edufl client adopt`.
        logger.warning("adopting %s with calibration failed (%s); trying without", what, exc)
        return adopt(
            saved.manifest_path,
            data_dir,
            spec,
            home=home,
            calibration="identity",
            record_extra=extra,
        )


def _check_took_part(
    ledger: Path | None, run_id: str, server_round: int, what: str, keep: str
) -> None:
    """Refuse a run this node's own ledger does not show it training in, or an older round."""
    from privacy.ledger.entries import LedgerError, parse_entries

    if ledger is None or not ledger.is_file():
        raise DeliveryRefused(
            f"refused {what}: this node keeps no ledger ({ledger or 'no privacy state'}), so "
            f"it cannot tell that it took part in the run{keep}; adopt the run's result by "
            "hand with `edufl client adopt RUN_DIR --data EXPORT`"
        )
    try:
        rounds = [e.round for e in parse_entries(ledger) if e.run_id == run_id]
    except LedgerError as exc:
        raise DeliveryRefused(
            f"refused {what}: this node's ledger is unreadable ({exc}){keep}"
        ) from None
    if not rounds:
        raise DeliveryRefused(
            f"refused {what}: this node did not take part in that run (its ledger {ledger} "
            f"holds no round of it){keep}"
        )
    if max(rounds) > server_round:
        raise DeliveryRefused(
            f"refused {what}: this node trained round {max(rounds)} of the run, so the model "
            f"is not the run's final one{keep}"
        )


def _delivered_before(home: Path, delivery: Delivery) -> Path | None:
    wanted = {
        "run_id": delivery.settings.run_id,
        "round": delivery.settings.server_round,
        "delivered_sha256": delivery.weights_sha256,
        "spec_fingerprint": delivery.settings.spec_fingerprint,
    }
    for record_path in sorted((home / MODELS).glob(f"*/{ADOPTION_FILE}"), reverse=True):
        try:
            record = loads_json(read_text(record_path))
        except (OSError, ValueError):
            continue
        if (
            isinstance(record, dict)
            and all(record.get(k) == v for k, v in wanted.items())
            and (record_path.parent / CARD_FILE).is_file()
        ):
            return record_path.parent
    return None


def _safe_name(text: str) -> str:
    """``text`` as a folder name: as it is when plain, else a digest (a server's text)."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        return text
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def latest_adopted(home: Path | None = None) -> Path:
    """The model folder of the latest adoption in ``home``.

    Raises:
        DataContractError: nothing adopted yet, or LATEST names a missing folder.
    """
    models = (home or default_home()) / MODELS
    pointer = models / LATEST
    if not pointer.is_file():
        raise DataContractError(
            f"no adopted model in {models}; run `edufl client adopt RUN_DIR --data EXPORT` "
            "first, or pass --model (a model folder, its model.pt, a run folder or a checkpoint)"
        )
    folder = models / read_text(pointer).strip()
    if not (folder / CARD_FILE).is_file():
        raise DataContractError(
            f"{pointer} names {folder.name}, which holds no model; adopt again "
            "(edufl client adopt) or pass --model"
        )
    return folder


def resolve_model(
    model: Path | None,
    data_dir: Path,
    spec: FeatureSpec,
    *,
    home: Path | None = None,
) -> Path:
    """The model folder that ``--model`` means (the latest adoption when it is None).

    A run folder or checkpoint is adopted with ``data_dir`` into ``home`` first, unless the
    same checkpoint was already adopted there from the same export.

    Raises:
        DataContractError: the path is none of the four forms, or its adoption fails.
    """
    if model is None:
        return latest_adopted(home)
    path = Path(model)
    folder = model_folder_of(path)
    if folder is not None:
        if not (folder / CARD_FILE).is_file():
            raise DataContractError(
                f"{path}: no {CARD_FILE} beside it; a model folder holds both files"
            )
        return folder
    if is_checkpoint_path(path):
        manifest = checkpoint_manifest(path)
        again = _previous_adoption(home or default_home(), manifest, data_dir, spec)
        if again is not None:
            logger.info("%s was adopted before: using %s", manifest, again)
            return again
        return adopt(path, data_dir, spec, home=home).model_dir
    raise DataContractError(
        f"{path}: not a model — pass a model folder (model.json + model.pt), its model.pt, a "
        "federated run folder (checkpoints/round-*.json) or one checkpoint (round-NNNN.json)"
        if path.exists()
        else f"{path}: no such file or folder"
    )


def checkpoint_manifest(source: Path) -> Path:
    """The manifest a run folder, checkpoints folder or checkpoint file stands for.

    Raises:
        DataContractError: none there.
    """
    if (source / CARD_FILE).is_file():
        raise DataContractError(
            f"{source}: a model folder, already adopted; score with --model {source}"
        )
    return shared_checkpoint_manifest(source)


def _verified(manifest_path: Path, source: Path, run_id: str | None) -> Checkpoint:
    """The checkpoint, after the run-id checks (checksum and contract: `adopt_global_model`)."""
    try:
        found = read_checkpoint(manifest_path)
        siblings = list_checkpoints(manifest_path.parent) if source.is_dir() else [found]
    except CheckpointError as exc:
        raise DataContractError(str(exc)) from None
    runs = {str(c.manifest.get("run_id") or "") for c in siblings}
    if len(runs) > 1:
        raise DataContractError(
            f"{manifest_path.parent}: checkpoints of {len(runs)} different runs "
            f"({', '.join(sorted(r[:8] or '?' for r in runs))}); pass the checkpoint to adopt "
            "(round-NNNN.json) or move the other run's files out"
        )
    found_id = str(found.manifest.get("run_id") or "")
    if run_id is not None and found_id != run_id:
        raise DataContractError(
            f"{manifest_path}: belongs to run {found_id or '(none recorded)'}, not {run_id}; "
            "check the run id your node logged, or adopt the right run folder"
        )
    return found


def _previous_adoption(
    home: Path, manifest: Path, data_dir: Path, spec: FeatureSpec
) -> Path | None:
    wanted = {
        "checkpoint_sha256": _sha256(manifest),
        "data_dir": str(Path(data_dir).resolve()),
        "spec_fingerprint": spec.fingerprint,
    }
    for record_path in sorted((home / MODELS).glob(f"*/{ADOPTION_FILE}"), reverse=True):
        try:
            record = loads_json(read_text(record_path))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and all(record.get(k) == v for k, v in wanted.items()):
            return record_path.parent
    return None


def _replace_folder(stage: Path, target: Path) -> None:
    """Rename ``stage`` to ``target``; an older model folder there is swapped out, then deleted."""
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(stage, target)
    except OSError:
        if old.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
